"""Continuous batching: a fixed set of rows, each refilled with the next prompt when it finishes.

    for index, gen in generate_continuous(params, prompts, config, batch_size=32, max_new_tokens=512):
        ...  # results arrive in the order rows finish

For many prompts with unequal answer lengths (regenerating training data, offline evaluation).
`decode.generate` runs a batch until its longest row ends, so rows that finished early idle until
then; here finished rows are harvested between chunks of rounds and prefilled in place with the
next prompts. Rows never interact (each has its own cache length, positions and PRNG key), so every
result equals generating that prompt alone. Shapes stay static: one cache capacity for all prompts,
refills in groups of a fixed size, prompt lengths bucketed as in `decode.start`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jetspec_jax.cache import UNROLL_ROWS
from jetspec_jax.decode import cache_capacity, decode, prompt_bucket, results, start
from jetspec_jax.errors import UserError
from jetspec_jax.step import DecodeConfig, DecodeState, map_rows

CHUNK_ROUNDS = 16  # rounds between host checks for finished rows


@functools.partial(jax.jit, donate_argnames=("state",))
def replace_rows(state: DecodeState, new: DecodeState, rows: jax.Array) -> DecodeState:
    """Rows `rows` (R,) of `state` become the R rows of `new` (same capacity). Repeated indices
    must carry identical rows.

    One dynamic_update_slice per row and leaf (R is static and small), which XLA performs in place
    on the donated state; a scatter (`.at[rows].set`) copied the whole cache on CPU. Past
    UNROLL_ROWS rows the unrolled program would take long to compile, so the scatter is used.
    """
    def put(a, b):
        if b.shape[0] > UNROLL_ROWS:
            return a.at[rows].set(b)
        zeros = (jnp.zeros((), jnp.int32),) * (a.ndim - 1)
        for j in range(b.shape[0]):
            a = jax.lax.dynamic_update_slice(a, b[j:j + 1], (rows[j], *zeros))
        return a

    return map_rows(put, state, new)


def generate_continuous(params, prompts, config: DecodeConfig, *, batch_size: int, max_new_tokens: int,
                        temperature=0.0, seeds=None, stop_ids=(), refill_size: int | None = None,
                        chunk_rounds: int = CHUNK_ROUNDS):
    """Yield (prompt index, Generation) for every prompt, in the order rows finish.

    prompts: lists of token ids. seeds: one per prompt (default 0). refill_size: rows prefilled
    together (default batch_size // 4): refilling waits until that many rows are free, unless
    fewer prompts are left. Each result equals `generate` on that prompt alone with its seed.
    """
    if not prompts:
        return
    if batch_size < 1:
        raise UserError("batch size must be >= 1")
    seeds = [0] * len(prompts) if seeds is None else list(seeds)
    refill = max(1, min(batch_size, refill_size or batch_size // 4))
    capacity = cache_capacity(config, prompt_bucket(max(len(p) for p in prompts)), max_new_tokens)
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, stop_ids=stop_ids, capacity=capacity)

    def prefill(indices):
        return start(params, [prompts[i] for i in indices], config, seed=[seeds[i] for i in indices], **kw)

    queue = list(range(len(prompts)))
    first = queue[:batch_size]
    first += first[:1] * (batch_size - len(first))  # fewer prompts than rows: duplicates, never harvested
    state = prefill(first)
    occupant = list(first[: len(queue)]) + [None] * max(0, batch_size - len(queue))
    queue = queue[batch_size:]
    while any(o is not None for o in occupant):
        state = decode(params, state, jnp.int32(chunk_rounds), config=config)
        done = np.asarray(jax.device_get(state.done))
        finished = [r for r, o in enumerate(occupant) if o is not None and done[r]]
        if finished:
            gens = results(state)
            for r in finished:
                yield occupant[r], gens[r]
                occupant[r] = None
        free = [r for r, o in enumerate(occupant) if o is None]
        while queue and free and (len(free) >= refill or len(queue) <= len(free)):
            take = min(refill, len(free), len(queue))
            rows, idx = free[:take], queue[:take]
            free, queue = free[take:], queue[take:]
            pad = refill - take  # repeat the first row: identical writes to the same index
            new = prefill(idx + idx[:1] * pad)
            state = replace_rows(state, new, jnp.asarray(rows + rows[:1] * pad, jnp.int32))
            for r, i in zip(rows, idx):
                occupant[r] = i

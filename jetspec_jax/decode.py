"""Prefill and the decoding loop: every round of a generation inside one `jax.lax.while_loop`.

    result = generate(params, prompts, config, max_new_tokens=64)

Shapes are bucketed so that new prompts, lengths, seeds and temperatures reuse compiled programs:
the padded prompt length is a power of two (>= 16) and the cache capacity a multiple of
`CAPACITY_STEP`; the batch size and `DecodeConfig` are the only other static inputs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jetspec_jax import program_cache
from jetspec_jax.errors import UserError
from jetspec_jax.head import DraftHead, init_head_cache
from jetspec_jax.model import Transformer, init_cache
from jetspec_jax.sampling import validate_sampling
from jetspec_jax.sharding import (as_mesh, constrain_state, traced_on, padded_batch, place_replicated, place_rows,
                                shard_params, to_host)
from jetspec_jax.step import (DecodeConfig, DecodeState, SamplingParams, map_rows, speculative_step,
                              with_draft_table)

MIN_PROMPT_BUCKET = 16
CAPACITY_STEP = 256
MAX_STOP_IDS = 8
# Prompts longer than this are prefilled in chunks of it: no (B, P, P) mask or score matrix, the
# largest attention temporaries are O(chunk x P). Prompt buckets are powers of two, so a longer
# bucket is a whole number of chunks.
PREFILL_CHUNK = 512


def prompt_bucket(length: int) -> int:
    """Padded prompt length: the next power of two, at least MIN_PROMPT_BUCKET."""
    return max(MIN_PROMPT_BUCKET, 1 << max(0, length - 1).bit_length())


def cache_capacity(config: DecodeConfig, padded_prompt: int, max_new_tokens: int) -> int:
    """Slots per row: prompt, new tokens, and one round of scratch (tree or draft block)."""
    scratch = max(config.budget, config.head.block_size if config.head else 1) + 1
    need = padded_prompt + max_new_tokens + scratch
    return -(-need // CAPACITY_STEP) * CAPACITY_STEP


@functools.partial(jax.jit, static_argnames=("config", "capacity", "mesh", "chunk"))
def prefill(params, prompt, prompt_lens, max_new, sampling: SamplingParams, *, config: DecodeConfig,
            capacity: int, mesh=None, chunk: int = PREFILL_CHUNK) -> DecodeState:
    """Run the target over the prompts and build the state of the first round.

    prompt (B, P) int32 right-padded; prompt_lens (B,) int32 >= 1; max_new (B,) int32.
    All prompt tokens but the last go into the caches; the last one is the first round's root.
    mesh: a `jax.sharding.Mesh` to lay the state out on (see sharding.py), or None.
    chunk: prompts longer than this run through the target `chunk` tokens at a time (P must then
    be a multiple of it); each chunk attends to the cache of the ones before it.
    """
    with traced_on(mesh):
        return _prefill(params, prompt, prompt_lens, max_new, sampling, config=config, capacity=capacity, mesh=mesh,
                        chunk=chunk)


def _target_prefill(params, prompt, config: DecodeConfig, capacity: int, chunk: int):
    """The target over the whole prompt -> (tapped features (B, P, F) or None, cache)."""
    b, p = prompt.shape
    model = Transformer(config.target)
    cache = init_cache(config.target, b, capacity)
    size = min(p, chunk)
    if p % size:
        raise ValueError(f"a {p}-token prompt bucket is not a whole number of {size}-token chunks")
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((size, size), bool)), (b, size, size))

    def run(cache, start):
        tokens = jax.lax.dynamic_slice_in_dim(prompt, start, size, axis=1)
        positions = jnp.broadcast_to(start + jnp.arange(size, dtype=jnp.int32), (b, size))
        cache = cache.replace(lengths=jnp.full((b,), start, jnp.int32))
        _, features, cache = model.apply({"params": params}, tokens, positions, cache, causal, taps=config.taps,
                                         with_logits=False)
        return cache, features

    if size == p:
        cache, features = run(cache, jnp.int32(0))
        return features, cache
    cache, features = jax.lax.scan(run, cache, jnp.arange(0, p, size, dtype=jnp.int32))  # (P / C, B, C, F)
    if features is not None:
        features = jnp.swapaxes(features, 0, 1).reshape(b, p, -1)
    return features, cache


def _prefill(params, prompt, prompt_lens, max_new, sampling, *, config, capacity, mesh, chunk):
    b, p = prompt.shape
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    committed = (prompt_lens - 1).astype(jnp.int32)
    features, cache = _target_prefill(params["target"], prompt, config, capacity, chunk)
    head_cache = None
    if config.head is not None:
        head_cache = DraftHead(config.head).apply(
            {"params": params["head"]}, features, positions,
            init_head_cache(config.head, b, capacity), method=DraftHead.append_context)
        head_cache = head_cache.replace(lengths=committed)
    state = DecodeState(
        target_cache=cache.replace(lengths=committed),
        head_cache=head_cache,
        root=jnp.take_along_axis(prompt, committed[:, None], axis=1)[:, 0],
        tokens=jnp.zeros((b, capacity), jnp.int32),
        history=jnp.zeros((b, capacity), jnp.int32).at[:, :p].set(prompt[:, :capacity]),
        num_new=jnp.zeros((b,), jnp.int32),
        max_new=max_new.astype(jnp.int32),
        done=max_new <= 0,
        rounds=jnp.zeros((b,), jnp.int32),
        accept_lengths=jnp.zeros((b, capacity), jnp.int32),
        sampling=sampling,
    )
    return state if mesh is None else constrain_state(state, config, mesh)


@functools.partial(jax.jit, static_argnames=("config", "mesh"), donate_argnames=("state",))
def decode(params, state: DecodeState, max_rounds, *, config: DecodeConfig, mesh=None) -> DecodeState:
    """Run rounds until every row is done or `max_rounds` (an array: no recompiles) have run.

    mesh: the Mesh the state is laid out on (None: unsharded); the loop carry keeps that layout.
    """
    params = with_draft_table(params, config)  # once per call, not once per round

    def cond(carry):
        state, i = carry
        return (i < max_rounds) & ~jnp.all(state.done)

    def body(carry):
        state, i = carry
        state, _ = speculative_step(params, state, config)
        if mesh is not None:
            state = constrain_state(state, config, mesh)
        return state, i + 1

    with traced_on(mesh):
        state, _ = jax.lax.while_loop(cond, body, (state, jnp.int32(0)))
    return state


@dataclasses.dataclass
class Generation:
    """One row's result, on the host."""

    ids: list  # new token ids (stop id included when generation stopped on one)
    accept_lengths: list  # tokens emitted per round
    stopped: bool  # ended on a stop id (False: hit max_new_tokens)

    @property
    def rounds(self) -> int:
        return len(self.accept_lengths)


def make_sampling(batch, temperature=0.0, top_k=0, top_p=1.0, seed=0, stop_ids=()) -> SamplingParams:
    """Per-row sampling arrays from scalars or per-row sequences; validates ranges."""
    validate_sampling(temperature, top_k, top_p)  # before the int cast hides a fractional top-k
    t = np.broadcast_to(np.asarray(temperature, np.float32), (batch,))
    k = np.broadcast_to(np.asarray(top_k, np.int32), (batch,))
    p = np.broadcast_to(np.asarray(top_p, np.float32), (batch,))
    stop = list(dict.fromkeys(int(s) for s in stop_ids))
    if len(stop) > MAX_STOP_IDS:
        raise UserError(f"at most {MAX_STOP_IDS} stop ids are supported, got {len(stop)}")
    seeds = np.broadcast_to(np.asarray(seed, np.uint32), (batch,))
    if jax.config.jax_default_prng_impl == "threefry2x32":
        # jax.random.key(s) of a 32-bit seed is the threefry key [0, s] (tested): built on the host,
        # it needs no compiled program. Host arrays go over with device_put for the same reason.
        keys = jax.random.wrap_key_data(np.stack([np.zeros_like(seeds), seeds], axis=-1))
    else:
        keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
    put = lambda x, dtype: jax.device_put(np.ascontiguousarray(x, dtype))  # noqa: E731
    return SamplingParams(
        temperature=put(t, np.float32), top_k=put(k, np.int32), top_p=put(p, np.float32), key=keys,
        stop_ids=put(stop + [-1] * (MAX_STOP_IDS - len(stop)), np.int32),
    )


@dataclasses.dataclass(frozen=True)
class PrefillInputs:
    """What `prefill` is called with: the padded arrays and the static values that, with the
    params and the DecodeConfig, decide the compiled programs (prompt shape, capacity, mesh)."""

    arrays: tuple  # prompt (B, P), prompt_lens (B,), max_new (B,), SamplingParams
    capacity: int
    mesh: object

    @property
    def program_key(self) -> tuple:
        """Equal keys <-> the same compiled prefill and decoding loop."""
        return (self.arrays[0].shape, self.capacity, self.mesh)


def start(params, prompts, config: DecodeConfig, **kwargs) -> DecodeState:
    """Validate and pad the prompts (lists of token ids), then prefill. Returns the first state.

    Keyword arguments as `prefill_inputs`.
    """
    inputs = prefill_inputs(prompts, config, **kwargs)
    return prefill(params, *inputs.arrays, config=config, capacity=inputs.capacity, mesh=inputs.mesh)


@dataclasses.dataclass(frozen=True)
class Programs:
    """Prefill and the decoding loop compiled ahead of time for one `PrefillInputs.program_key`.

    `prefill(params, inputs)` -> the first state; `decode(params, state, max_rounds)` -> the state
    after at most max_rounds more rounds (the state is donated), as `decode.prefill` / `decode.decode`.
    """

    prefill_program: object  # program_cache.Program (or jax.stages.Compiled): called as the jitted function
    decode_program: object

    def prefill(self, params, inputs: PrefillInputs) -> DecodeState:
        return self.prefill_program(params, *inputs.arrays)

    def decode(self, params, state: DecodeState, max_rounds) -> DecodeState:
        return self.decode_program(params, state, jnp.asarray(max_rounds, jnp.int32))


def compile_programs(params, inputs: PrefillInputs, config: DecodeConfig) -> Programs:
    """Compile prefill and the decoding loop for these inputs' shapes without running either
    (`jit(...).lower(...).compile()`, through the persistent compilation cache when it is on, and
    through `program_cache` when that is on: a second run then neither traces nor lowers)."""
    pre_fn = jax.jit(functools.partial(prefill, config=config, capacity=inputs.capacity, mesh=inputs.mesh))
    pre = program_cache.compile("prefill", pre_fn, (params, *inputs.arrays),
                                key=(config, inputs.capacity, PREFILL_CHUNK, inputs.mesh))
    loop_fn = jax.jit(functools.partial(decode, config=config, mesh=inputs.mesh), donate_argnums=(1,))
    loop = program_cache.compile("decode", loop_fn, (params, pre.out_info, jnp.int32(0)),
                                 key=(config, inputs.mesh),
                                 donate=(1,))
    return Programs(pre, loop)


def prefill_inputs(prompts, config: DecodeConfig, *, max_new_tokens: int, temperature=0.0,
                   top_k=0, top_p=1.0, seed=0, stop_ids=(), capacity: int | None = None,
                   mesh=None) -> PrefillInputs:
    """Validate and pad the prompts (lists of token ids) into `prefill`'s inputs, on the host.

    capacity: cache slots per row; by default the bucket these prompts need. A larger fixed value
    lets states of different prompt batches share one compiled loop (see `batcher.py`).
    mesh: a Mesh (params already placed with `sharding.shard_params`): the batch is padded to a
    multiple of dp with copies of the first prompt that have max_new 0 (done from the start;
    `results` returns them last, as empty rows) and sharded over dp.
    """
    if not prompts:
        raise UserError("no prompts given")
    if max_new_tokens < 1:
        raise UserError("max-new-tokens must be >= 1")
    vocab = config.target.vocab_size
    for row in prompts:
        if len(row) == 0:
            raise UserError("empty prompt: give at least one token")
        bad = [t for t in row if not 0 <= int(t) < vocab]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
    longest = max(len(r) for r in prompts)
    padded = prompt_bucket(longest)
    need = cache_capacity(config, padded, max_new_tokens)
    if capacity is None:
        capacity = need
    elif capacity < need:
        raise UserError(f"a cache of {capacity} slots cannot hold a {longest}-token prompt "
                        f"and {max_new_tokens} new tokens ({need} needed)")
    limit = config.target.max_position_embeddings
    if longest + max_new_tokens + config.budget > limit:
        raise UserError(
            f"prompt ({longest} tokens) + max-new-tokens ({max_new_tokens}) exceeds the model's "
            f"context of {limit} tokens")
    mesh = as_mesh(mesh)
    real = len(prompts)
    batch = padded_batch(real, mesh)
    rows = list(prompts) + [prompts[0]] * (batch - real)
    prompt = np.zeros((batch, padded), np.int32)
    for i, row in enumerate(rows):
        prompt[i, : len(row)] = row
    lens = np.asarray([len(r) for r in rows], np.int32)
    max_new = np.where(np.arange(batch) < real, max_new_tokens, 0).astype(np.int32)
    sampling = make_sampling(real, temperature, top_k, top_p, seed, stop_ids)
    if batch > real:  # padding rows repeat row 0's values
        sampling = map_rows(lambda x: jnp.concatenate([x, jnp.repeat(x[:1], batch - real, axis=0)]), sampling)
    if mesh is not None:
        prompt, lens, max_new = place_rows((prompt, lens, max_new), mesh)
        sampling = map_rows(lambda x: place_rows(x, mesh), sampling)
        sampling = sampling.replace(stop_ids=place_replicated(sampling.stop_ids, mesh))
    else:
        prompt, lens, max_new = jax.device_put((prompt, lens, max_new))
    return PrefillInputs((prompt, lens, max_new, sampling), capacity, mesh)


def results(state: DecodeState) -> list:
    """Host-side results of every row (with several processes, every process gets all rows)."""
    tokens, num_new, rounds, acc, stop = to_host(
        (state.tokens, state.num_new, state.rounds, state.accept_lengths, state.sampling.stop_ids))
    out = []
    for b in range(tokens.shape[0]):
        ids = tokens[b, : num_new[b]].tolist()
        stopped = bool(ids) and ids[-1] in set(stop.tolist()) - {-1}
        out.append(Generation(ids=ids, accept_lengths=acc[b, : rounds[b]].tolist(), stopped=stopped))
    return out


def generate(params, prompts, config: DecodeConfig, *, max_new_tokens: int, temperature=0.0,
             top_k=0, top_p=1.0, seed=0, stop_ids=(), mesh=None) -> list:
    """Generate for a batch of prompts (lists of token ids) in one jitted loop; returns Generations.

    params: {"target": ..., "head": ...}. Lossless: greedy output equals the target's own greedy
    decoding; sampled output follows the target's processed distribution exactly.
    mesh: None, a `jax.sharding.Mesh` or a spec such as "dp=2,tp=4" (see sharding.py): params are
    placed in their shardings (a no-op when `shard_params` already did) and the batch is split
    over dp; the results are the same.
    """
    mesh = as_mesh(mesh)
    if mesh is not None:
        params = shard_params(params, config, mesh)
    state = start(params, prompts, config, max_new_tokens=max_new_tokens, temperature=temperature,
                  top_k=top_k, top_p=top_p, seed=seed, stop_ids=stop_ids, mesh=mesh)
    state = decode(params, state, jnp.int32(max_new_tokens), config=config, mesh=mesh)
    return results(state)[: len(prompts)]

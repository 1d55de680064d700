"""Host-side driver around the jitted loop: chunks of rounds, streaming text, stop strings, timing.

The device loop (`decode.decode`) knows token ids only. Stop *strings* depend on detokenized text,
so they are checked here between chunks of rounds; a row whose text contains one is truncated there
and marked done before the next chunk.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp

from jetspec_jax.decode import compile_programs, prefill_inputs, results
from jetspec_jax.sharding import as_mesh, place_rows, shard_params, to_host
from jetspec_jax.step import DecodeConfig, prepare_params

CHUNK_ROUNDS = 8


@dataclasses.dataclass
class RowResult:
    ids: list
    text: str | None
    accept_lengths: list
    seconds: float  # prefill + decoding
    decode_seconds: float | None = None  # decoding alone (the rounds after prefill)

    @property
    def stats(self) -> dict:
        n = len(self.ids)
        out = {
            "rounds": len(self.accept_lengths),
            "accept_lengths": self.accept_lengths,
            "new_tokens": n,
            "seconds": round(self.seconds, 4),
            "tokens_per_second": round(n / self.seconds, 2) if self.seconds > 0 else None,
        }
        if self.decode_seconds is not None:
            out["decode_seconds"] = round(self.decode_seconds, 4)
            out["decode_tokens_per_second"] = round(n / self.decode_seconds, 2) if self.decode_seconds > 0 else None
        return out


def _cut_at_stop(text: str, stop_strings) -> int | None:
    hits = [text.find(s) for s in stop_strings if s and s in text]
    return min(hits) if hits else None


def _ids_for_text_prefix(tokenizer, ids, n_chars):
    """Fewest leading ids whose decoded text covers the first n_chars characters."""
    for n in range(len(ids) + 1):
        if len(tokenizer.decode(ids[:n])) >= n_chars:
            return n
    return len(ids)


class Runner:
    """Runs batches of prompts through prefill + chunked decoding, compiling once per shape.

    mesh: None, a `jax.sharding.Mesh` or a spec such as "dp=2,tp=4": the params are placed in
    their shardings once, here, and every batch is padded to a multiple of dp (see sharding.py).
    """

    def __init__(self, params, config: DecodeConfig, tokenizer=None, *, chunk_rounds=CHUNK_ROUNDS,
                 mesh=None):
        self.mesh = as_mesh(mesh)
        if self.mesh is not None:
            params = shard_params(params, config, self.mesh)
        else:  # the CPU kernel's layouts, built once here rather than per call
            params = prepare_params(params, config)
        self.params, self.config, self.tokenizer = params, config, tokenizer
        self.chunk_rounds = chunk_rounds
        self._programs = {}  # PrefillInputs.program_key -> decode.Programs
        self.compile_seconds = 0.0  # spent in `_warm_up` (near zero when the persistent cache has the programs)

    def _warm_up(self, prompts, kwargs):
        """The programs for these prompts (batch, prompt bucket, cache capacity): compiled ahead
        of time without computing anything, outside the timed region, the first time a shape is
        seen (the time goes to `compile_seconds`); a batch of a known shape compiles nothing.
        Returns (Programs, PrefillInputs)."""
        inputs = prefill_inputs(prompts, self.config, mesh=self.mesh, **kwargs)
        if inputs.program_key not in self._programs:
            t0 = time.perf_counter()
            self._programs[inputs.program_key] = compile_programs(self.params, inputs, self.config)
            self.compile_seconds += time.perf_counter() - t0
        return self._programs[inputs.program_key], inputs

    def run(self, prompts, *, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, seed=0,
            stop_ids=(), stop_strings=(), on_text=None):
        """prompts: lists of token ids. on_text(row, new_text) streams decoded text as it comes.

        Returns one RowResult per prompt.
        """
        kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p, seed=seed, stop_ids=stop_ids)
        programs, inputs = self._warm_up(prompts, kwargs)
        t0 = time.perf_counter()
        state = jax.block_until_ready(programs.prefill(self.params, inputs))
        t_decode = time.perf_counter()
        shown = [""] * len(prompts)
        cut = [None] * len(prompts)  # token counts fixed by a stop string
        while True:
            state = programs.decode(self.params, state, self.chunk_rounds)
            done = to_host(state.done)
            if self.tokenizer is not None and (stop_strings or on_text):
                state = self._check_text(state, shown, cut, stop_strings, on_text)
                done = to_host(state.done)
            if done.all():
                break
        t_end = time.perf_counter()
        seconds, decode_seconds = t_end - t0, t_end - t_decode
        out = []
        for b, gen in enumerate(results(state)[: len(prompts)]):  # rows past them pad the batch
            ids = gen.ids if cut[b] is None else gen.ids[: cut[b]]
            text = None
            if self.tokenizer is not None:
                text = self.tokenizer.decode(ids)
                stop_at = _cut_at_stop(text, stop_strings)
                text = text if stop_at is None else text[:stop_at]
            out.append(RowResult(ids=ids, text=text, accept_lengths=gen.accept_lengths, seconds=seconds,
                                 decode_seconds=decode_seconds))
        return out

    def _check_text(self, state, shown, cut, stop_strings, on_text):
        """Stream new text; stop rows whose text reached a stop string."""
        gens = results(state)[: len(shown)]
        stop_rows = []
        for b, gen in enumerate(gens):
            if cut[b] is not None:
                continue
            text = self.tokenizer.decode(gen.ids)
            stop_at = _cut_at_stop(text, stop_strings)
            if stop_at is not None:
                cut[b] = _ids_for_text_prefix(self.tokenizer, gen.ids, stop_at)
                text = text[:stop_at]
                stop_rows.append(b)
            elif text.endswith("\ufffd"):
                text = text[: len(text.rstrip("\ufffd"))]  # wait for the rest of a multi-byte char
            if on_text and len(text) > len(shown[b]) and text.startswith(shown[b]):
                on_text(b, text[len(shown[b]):])
                shown[b] = text
        if stop_rows:
            done = state.done.at[jnp.asarray(stop_rows)].set(True)
            state = state.replace(done=place_rows(done, self.mesh))  # keep the decode layout
        return state

"""Timing the production loop: compile counting, one timed generation, the machine it ran on.

The headline numbers come from the real fused program: `decode.start` (prefill) and
`decode.decode` (every round in one `while_loop`), timed separately with `block_until_ready`.
Compilation is kept out of the timed part by a warm-up per (config, batch size, prompt bucket),
and checked: every timed call runs inside `CompileCounter`, which counts XLA backend compilations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import subprocess
import time

import jax
import jax.numpy as jnp

from jetspec_jax.decode import decode, prompt_bucket, results, start
from jetspec_jax.step import DecodeConfig

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles = [0]  # process-wide count of backend compilations
_listening = [False]


def _on_duration(event, _secs, **_):
    if event == COMPILE_EVENT:
        _compiles[0] += 1


@contextlib.contextmanager
def count_compiles():
    """Counts XLA compilations inside the block: `with count_compiles() as c: ...; c["n"]`."""
    if not _listening[0]:
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        _listening[0] = True
    before = _compiles[0]
    counter = {"n": 0}
    try:
        yield counter
    finally:
        counter["n"] = _compiles[0] - before


@dataclasses.dataclass
class Timed:
    """One timed generation of a batch of prompts (batch 1: of one prompt)."""

    ids: list  # new token ids of row 0
    accept_lengths: list  # tokens emitted per round (target forwards after prefill) by row 0
    prefill_s: float
    decode_s: float
    compiles: int  # compilations during the timed part (0 when warm-up did its job)
    rows: list = dataclasses.field(default_factory=list)  # every row's decode.Generation

    @property
    def seconds(self) -> float:
        return self.prefill_s + self.decode_s


class FusedRunner:
    """Warm-up once per (config, batch size, prompt bucket), then time `start` and `decode` separately."""

    def __init__(self, params, *, max_new_tokens: int, stop_ids=()):
        self.params, self.max_new, self.stop_ids = params, max_new_tokens, tuple(stop_ids)
        self._warm = set()
        self.warmup_compiles = 0

    def _start(self, prompts, config):
        return start(self.params, prompts, config, max_new_tokens=self.max_new, stop_ids=self.stop_ids)

    def warm_up(self, prompts, config: DecodeConfig) -> None:
        """Compile prefill and the loop for this batch's shape; runs two rounds to touch them."""
        key = (config, len(prompts), prompt_bucket(max(len(ids) for ids in prompts)))
        if key in self._warm:
            return
        with count_compiles() as c:
            state = self._start(prompts, config)
            jax.block_until_ready(decode(self.params, state, jnp.int32(2), config=config))
        self.warmup_compiles += c["n"]
        self._warm.add(key)

    def run(self, ids, config: DecodeConfig, repeats: int = 1) -> Timed:
        """Best of `repeats` timed generations (greedy) of one prompt; ids from the last."""
        return self.run_batch([ids], config, repeats)

    def run_batch(self, prompts, config: DecodeConfig, repeats: int = 1) -> Timed:
        """Best of `repeats` timed generations (greedy) of a batch of prompts in one fused loop."""
        self.warm_up(prompts, config)
        best, compiles = None, 0
        for _ in range(max(1, repeats)):
            with count_compiles() as c:
                t0 = time.perf_counter()
                state = jax.block_until_ready(self._start(prompts, config))
                t1 = time.perf_counter()
                state = jax.block_until_ready(
                    decode(self.params, state, jnp.int32(self.max_new), config=config))
                t2 = time.perf_counter()
            compiles += c["n"]
            rows = results(state)
            timed = Timed(rows[0].ids, rows[0].accept_lengths, t1 - t0, t2 - t1, 0, rows)
            if best is None or timed.seconds < best.seconds:
                best = timed
        best.compiles = compiles
        return best


def machine() -> dict:
    """CPU model, cores, load averages and `uptime`, plus the JAX backend."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        uptime = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "uptime": uptime,
        "jax_backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }

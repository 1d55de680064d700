"""Why decoding on CPU runs its products through kernels/cpu_matmul: M-row products, timed.

    python scripts/bench_cpu_matmul.py [--rows 1,2,3,4,5,8,9,12,13,16,17 --reps 5]

A stack of the feed-forward products of SmolLM2-135M's 30 layers (gate_up 576x3072, down
1536x576, float32: 318 MB of weights, the bulk of a decoding step), jitted in a loop of 16 steps,
for M rows at once (M = 1: an AR step; M = N: verifying a tree of N nodes; more: a prefill chunk),
in three forms measured in the same run, alternating: XLA's dot (`JETSPEC_CPU_MATMUL=0` in the
library), the kernel on the (K, N) weights as loaded ("kn", up to MAX_ROWS rows, XLA beyond) and
on the packed weights (`cpu_matmul.pack`, what `step.prepare_params` gives decoding). Prints ms per
step, the weight bandwidth it implies and each time relative to XLA's one-row step (the AR step's
products), best of --reps. A tree round pays that relative cost before it accepts any token.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jetspec_jax.benchmark.measure import machine
from jetspec_jax.kernels import cpu_matmul


def stepper(product):
    @jax.jit
    def run(ws, x):
        def body(_, x):
            for gu, dn in ws:
                h = product(x, gu)
                f = h.shape[-1] // 2
                x = x + product(jax.nn.silu(h[:, :f]) * h[:, f:], dn) * 0.1
            return x * 0.5
        return jax.lax.fori_loop(0, 16, body, x)
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,2,3,4,5,8,9,12,13,16,17,64,128")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args(argv)
    if not cpu_matmul.enabled():
        print("error: the CPU kernel cannot run here (llvmlite missing, JETSPEC_CPU_MATMUL=0, or not LP64 Linux/macOS)")
        return 1
    rng = np.random.default_rng(0)
    r = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32) * 0.02)  # noqa: E731
    ws = [(r(a.hidden, 2 * a.ffn), r(a.ffn, a.hidden)) for _ in range(a.layers)]
    mbytes = sum(x.size for pair in ws for x in pair) * 4 / 1e6
    packed = [tuple(cpu_matmul.pack(w) for w in pair) for pair in ws]
    packed_step = stepper(lambda x, w: cpu_matmul.matmul(x, w, "packed"))
    forms = {"xla": stepper(lambda x, w: x @ w), "kn": stepper(cpu_matmul.matmul),
             "packed": lambda _, x: packed_step(packed, x)}
    info = machine()
    print(f"{info['cpu']}, {info['cores']} cores, load {info['load_avg']}; {a.layers} layers, {mbytes:.0f} MB of weights; "
          f"the kernel takes up to {cpu_matmul.MAX_ROWS} rows as loaded, {cpu_matmul.PACKED_MAX_ROWS} packed (more: XLA's dot)")
    rows = [int(m) for m in a.rows.split(",")]
    best = {}
    for m in rows:
        x = jnp.ones((m, a.hidden), jnp.float32)
        for fn in forms.values():
            jax.block_until_ready(fn(ws, x))  # compile
        for _ in range(a.reps):  # forms alternate, so drifts in load hit both
            for name, fn in forms.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(ws, x))
                ms = (time.perf_counter() - t0) / 16 * 1e3
                best[name, m] = min(best.get((name, m), float("inf")), ms)
    base = best["xla", rows[0]] if rows[0] == 1 else None
    print(f"{'rows':>4}" + "".join(f"  {name + ' ms':>9} {'GB/s':>5} {'x AR':>5}" for name in forms)
          + "  kn/xla  packed/xla")
    for m in rows:
        cells = []
        for name in forms:
            ms = best[name, m]
            rel = f"{ms / base:5.2f}" if base else "    -"
            cells.append(f"  {ms:9.2f} {mbytes / ms:5.1f} {rel}")
        print(f"{m:4d}" + "".join(cells) + f"  {best['kn', m] / best['xla', m]:6.2f}  {best['packed', m] / best['xla', m]:10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Why the layers fuse q/k/v and gate/up (layout.py): one decoding step's matrix products, timed.

    python scripts/bench_fused_matvec.py [--layers 30 --hidden 576 --ffn 1536 --kv 192 --reps 5]

A stack of decoder-layer matrix-vector products at SmolLM2-135M's shapes (no attention, one token,
float32), jitted inside a 64-step loop, in three forms measured in the same run: 7 separate
products per layer (q, k, v, o, gate, up, down), 4 fused products (qkv, o, gate_up, down), and the
fused layers under `lax.scan` instead of unrolled. Prints ms per step, the weight bandwidth it
implies and the ratio to the separate form (best of --reps).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jetspec_jax.benchmark.measure import machine


def _norm(x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)


def layer_separate(x, w, d, kv):
    h = _norm(x)
    q, k, v = h @ w["q"], h @ w["k"], h @ w["v"]
    a = q * jnp.tile(k, d // kv) + jnp.tile(v, d // kv)  # stands in for attention
    x = x + a @ w["o"]
    h = _norm(x)
    return x + (jax.nn.silu(h @ w["g"]) * (h @ w["u"])) @ w["dn"]


def layer_fused(x, w, d, kv):
    h = _norm(x)
    qkv = h @ w["qkv"]
    q, k, v = qkv[:, :d], qkv[:, d:d + kv], qkv[:, d + kv:]
    a = q * jnp.tile(k, d // kv) + jnp.tile(v, d // kv)
    x = x + a @ w["o"]
    h = _norm(x)
    gu = h @ w["gu"]
    f = gu.shape[-1] // 2
    return x + (jax.nn.silu(gu[:, :f]) * gu[:, f:]) @ w["dn"]


def stepper(layer, d, kv, scan=False):
    @jax.jit
    def run(ws, x):
        def body(_, x):
            if scan:
                x, _ = jax.lax.scan(lambda x, w: (layer(x, w, d, kv), None), x, ws)
            else:
                for w in ws:
                    x = layer(x, w, d, kv)
            return x * 0.5
        return jax.lax.fori_loop(0, 64, body, x)
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--kv", type=int, default=192, help="KV width (KV heads x head dim)")
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args(argv)
    d, f, kv, n = a.hidden, a.ffn, a.kv, a.layers
    rng = np.random.default_rng(0)
    r = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32) * 0.02)  # noqa: E731
    separate = [dict(q=r(d, d), k=r(d, kv), v=r(d, kv), o=r(d, d), g=r(d, f), u=r(d, f), dn=r(f, d)) for _ in range(n)]
    fused = [dict(qkv=jnp.concatenate([w["q"], w["k"], w["v"]], 1), o=w["o"],
                  gu=jnp.concatenate([w["g"], w["u"]], 1), dn=w["dn"]) for w in separate]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *fused)
    mbytes = sum(x.size for x in jax.tree.leaves(separate)) * 4 / 1e6
    x = jnp.ones((1, d), jnp.float32)
    forms = [("separate (7 products)", stepper(layer_separate, d, kv), separate),
             ("fused (4 products)", stepper(layer_fused, d, kv), fused),
             ("fused, lax.scan", stepper(layer_fused, d, kv, scan=True), stacked)]
    info = machine()
    print(f"{info['cpu']}, {info['cores']} cores, load {info['load_avg']}; {n} layers, {mbytes:.0f} MB of weights")
    for _, fn, ws in forms:
        jax.block_until_ready(fn(ws, x))  # compile
    best = {name: float("inf") for name, _, _ in forms}
    for _ in range(a.reps):  # forms alternate, so drifts in load hit all of them
        for name, fn, ws in forms:
            t0 = time.perf_counter()
            jax.block_until_ready(fn(ws, x))
            best[name] = min(best[name], (time.perf_counter() - t0) / 64 * 1e3)
    base = best[forms[0][0]]
    for name, ms in best.items():
        print(f"{name:24s} {ms:6.2f} ms/step  {mbytes / ms:5.1f} GB/s  {base / ms:4.2f}x separate")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

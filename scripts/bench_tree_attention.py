"""Time tree attention: the Pallas kernel against the XLA reference, at Qwen3-8B head shapes.

    python scripts/bench_tree_attention.py [--out DIR]       # on a GPU; DIR defaults to $OUT or ./out
    python scripts/bench_tree_attention.py --smoke           # tiny shapes, interpret mode (CPU check)

One layer's attention: B = 1, 32 query / 8 KV heads, head_dim 128, bfloat16, one cache of fixed
size (as in serving) of which lengths + N slots are used. "GB/s" is the K/V bytes that must be read,
2 * Hkv * (lengths + N) * D * 2 bytes, over the time: the useful HBM bandwidth (the XLA reference
actually reads the whole cache, so its figure undercounts its traffic). Times are device time per
call, from `iters` calls chained inside one jit (no host dispatch in between). Every configuration
is checked against the reference before it is timed. Writes tree_attention_bench.{json,md} to DIR.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jetspec_jax.kernels.tree_attn import BlockSizes, tree_attention_pallas, tree_attention_reference

PALLAS_CONFIGS = {
    "pallas": BlockSizes(),
    "pallas-split8": BlockSizes(kv_splits=8),
    "pallas-rows128": BlockSizes(block_rows=128, block_k=32),
}


@dataclasses.dataclass(frozen=True)
class Shape:
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    dtype: str = "bfloat16"


def chain_tree_mask(n: int) -> np.ndarray:
    """Causal mask (N, N). Any tree costs the same: both implementations read every tree key and
    compute every score whatever the mask says."""
    return np.tril(np.ones((n, n), bool))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _repeat(fn, iters, q, *rest):
    # Each call takes the previous output as its queries (same shape and dtype), so XLA can neither
    # hoist nor drop any of the `iters` calls, and no host dispatch sits between them.
    return lax.fori_loop(0, iters, lambda _, q: fn(q, *rest), q)


def time_call(fn, args, iters: int) -> float:
    """Median device seconds per call over 5 launches of `iters` chained calls."""
    jax.block_until_ready(_repeat(fn, iters, *args))
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(_repeat(fn, iters, *args))
        samples.append((time.perf_counter() - start) / iters)
    return statistics.median(samples)


def implementations(interpret: bool):
    """name -> function with the reference's signature; built once so compiled code is reused."""
    impls = {"xla": tree_attention_reference}
    for name, blocks in PALLAS_CONFIGS.items():
        impls[name] = functools.partial(tree_attention_pallas, block_sizes=blocks, interpret=interpret)
    return impls


def bench_case(impls, cache_k, cache_v, q_all, prefix: int, n: int, shape: Shape, iters: int):
    q = q_all[:, :n]
    lengths = jnp.array([prefix], jnp.int32)
    tree_mask = jnp.asarray(chain_tree_mask(n))[None]
    args = (q, cache_k, cache_v, lengths, tree_mask)
    kv_bytes = 2 * shape.num_kv_heads * (prefix + n) * shape.head_dim * jnp.dtype(shape.dtype).itemsize
    with jax.default_matmul_precision("highest"):
        expected = jax.jit(tree_attention_reference)(*args).astype(jnp.float32)
    rows = []
    for name, fn in impls.items():
        row = dict(impl=name, prefix=prefix, n=n)
        try:
            row["max_abs_err"] = float(jnp.max(jnp.abs(jax.jit(fn)(*args).astype(jnp.float32) - expected)))
            seconds = time_call(fn, args, iters)
        except Exception as e:  # noqa: BLE001 -- a GPU run is scarce: record the failure, time the rest
            row["error"] = f"{type(e).__name__}: {e}"[:2000]
            print(f"prefix {prefix:6d} N {n:4d} {name:15s} FAILED {row['error'][:300]}", flush=True)
        else:
            row.update(us=seconds * 1e6, kv_gb_per_s=kv_bytes / seconds / 1e9)
            print(
                f"prefix {prefix:6d} N {n:4d} {name:15s} {row['us']:10.1f} us {row['kv_gb_per_s']:8.1f} GB/s"
                f" err {row['max_abs_err']:.2e}",
                flush=True,
            )
        rows.append(row)
    return rows


def markdown(rows, meta) -> str:
    lines = [
        f"Tree attention, one layer: {meta['shape']}, cache size {meta['cache_size']}, on {meta['device']} "
        f"(jax {meta['jax']}, {meta['date']})."
        + (" Interpret mode: these times say nothing about the GPU." if meta["interpret"] else ""),
        "",
        "| prefix | N | impl | time (us) | K/V GB/s | speed-up vs xla | max abs err |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    xla = {(r["prefix"], r["n"]): r["us"] for r in rows if r["impl"] == "xla" and "us" in r}
    for r in rows:
        if "error" in r:
            cells = (r["prefix"], r["n"], r["impl"], "failed (see JSON)", "", "", "")
        else:
            speedup = f"{xla[r['prefix'], r['n']] / r['us']:.2f}x" if (r["prefix"], r["n"]) in xla else ""
            cells = (r["prefix"], r["n"], r["impl"], f"{r['us']:.1f}", f"{r['kv_gb_per_s']:.1f}", speedup)
            cells += (f"{r['max_abs_err']:.1e}",)
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    if meta["skipped_past_deadline"]:
        lines += ["", f"Not run (past the time limit): {meta['skipped_past_deadline']}"]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "./out"))
    parser.add_argument("--prefix", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--budget", type=int, nargs="+", default=[1, 64, 128, 256], help="tree sizes N")
    parser.add_argument("--iters", type=int, default=50, help="chained calls per timed launch")
    parser.add_argument("--deadline-s", type=float, default=300, help="skip the remaining cases after this long")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes with interpret=True: checks the script on CPU")
    args = parser.parse_args()

    shape, interpret = Shape(), False
    if args.smoke:
        shape, interpret = Shape(num_heads=4, num_kv_heads=2, head_dim=16, dtype="float32"), True
        args.prefix, args.budget, args.iters = [0, 40], [1, 16], 1
    cache_size = max(args.prefix) + max(args.budget)
    rng = np.random.default_rng(0)
    kv_shape = (1, shape.num_kv_heads, cache_size, shape.head_dim)
    cache_k = jnp.asarray(rng.standard_normal(kv_shape), shape.dtype)
    cache_v = jnp.asarray(rng.standard_normal(kv_shape), shape.dtype)
    q_all = jnp.asarray(rng.standard_normal((1, max(args.budget), shape.num_heads, shape.head_dim)), shape.dtype)

    impls = implementations(interpret)
    start, rows, skipped = time.perf_counter(), [], []
    for prefix in args.prefix:
        for n in args.budget:
            if time.perf_counter() - start > args.deadline_s:
                skipped.append(dict(prefix=prefix, n=n))
                continue
            rows += bench_case(impls, cache_k, cache_v, q_all, prefix, n, shape, args.iters)

    device = jax.devices()[0]
    meta = dict(
        device=f"{device.platform}: {device.device_kind}",
        jax=jax.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        shape=f"B=1, {shape.num_heads}/{shape.num_kv_heads} heads, head_dim {shape.head_dim}, {shape.dtype}",
        cache_size=cache_size,
        interpret=interpret,
        pallas_configs={name: dataclasses.asdict(b) for name, b in PALLAS_CONFIGS.items()},
        skipped_past_deadline=skipped,
    )
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tree_attention_bench.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    (out / "tree_attention_bench.md").write_text(markdown(rows, meta))
    print(f"wrote {out / 'tree_attention_bench.md'}; skipped past the deadline: {skipped or 'none'}")
    failed = [r for r in rows if "error" in r]
    if failed:
        raise SystemExit(f"{len(failed)} configurations failed; see {out / 'tree_attention_bench.json'}")


if __name__ == "__main__":
    main()

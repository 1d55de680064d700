"""Time one verification forward of N tree tokens against one AR step, at Qwen3-8B shape.

    python scripts/bench_verify.py [--out DIR]        # on a GPU; DIR defaults to $OUT or ./out
    python scripts/bench_verify.py --smoke            # tiny float32 model on CPU: checks the script

The whole target model (`jetspec_jax.model.Transformer`: 36 layers, d 4096, 32/8 heads, head_dim 128,
ffn 12288, vocab 151936, qk-norm, untied head) with random bfloat16 weights, B = 1. Each call is
one jitted forward with the KV cache donated, writing its N rows at `lengths` and returning float32
logits (B, N, V): N = 1 is an AR step, N > 1 verifies a random tree (ancestor-or-self mask of a
random tree, positions = prefix + depth). Draft head, acceptance and commit are not included.

Every (N, attention implementation) pair compiles once; all prefixes reuse that program, since one
cache of fixed size (as in serving) holds them all. The XLA attention reads the whole cache whatever
the prefix; the Pallas kernel reads only the used slots. A time is the median over `samples` of
(`iters` calls issued back to back, then one block_until_ready) / iters: device throughput, with
host dispatch overlapped as in a decoding loop. Each case first runs once on a fresh random cache;
those logits are compared across implementations (same inputs). Cases run in priority order (AR,
then N = 128, ...) and stop cleanly at --deadline-s; results are rewritten after every case, so a
run killed from outside still leaves what it measured. Writes verify_bench.{json,md} to DIR.
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

from jetspec_jax.benchmark.synthetic import normal, random_like
from jetspec_jax.config import ModelConfig
from jetspec_jax.model import Transformer, init_cache, init_params

QWEN3_8B = ModelConfig(
    vocab_size=151936, hidden_size=4096, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
    intermediate_size=12288, rope_theta=1_000_000.0, rms_norm_eps=1e-6, qk_norm=True, qkv_bias=False,
    tie_embeddings=False, max_position_embeddings=40960, dtype="bfloat16",
)
TINY = ModelConfig(
    vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
    intermediate_size=128, qk_norm=True, dtype="float32",  # bf16 matmuls crawl on XLA CPU
)
HBM_BYTES_PER_S = 4.8e12  # H200 spec sheet: the floor column is only meaningful there
GOAL_N, GOAL_RATIO = 128, 1.15  # issue 4: a verification round at N = 128 within 1.15x an AR step
REFERENCE_IMPL = "xla"


def random_params(cfg: ModelConfig, seed: int):
    """Random weights at cfg's shapes without running Flax init on 8B parameters (synthetic.py)."""
    shapes = jax.eval_shape(functools.partial(init_params, cfg.replace(attention_impl="xla")), jax.random.key(0))
    return random_like(shapes, seed)


@functools.partial(jax.jit, static_argnums=(0, 1))
def random_cache(cfg: ModelConfig, capacity: int, key, prefix):
    """A cache of `capacity` slots holding `prefix` committed tokens; every slot is random K/V.

    The zeros `init_cache` builds are overwritten inside the jit, so they never materialize.
    """
    cache = init_cache(cfg, 1, capacity)
    noise = lambda i, x: normal(jax.random.fold_in(key, i), x.shape, x.dtype, 1.0)  # noqa: E731
    return cache.replace(
        k=tuple(noise(2 * i, x) for i, x in enumerate(cache.k)),
        v=tuple(noise(2 * i + 1, x) for i, x in enumerate(cache.v)),
        lengths=jnp.full((1,), prefix, jnp.int32),
    )


def random_tree(n: int, rng: np.random.Generator):
    """Node i > 0 hangs under a random earlier node -> ancestor-or-self mask (N, N) bool, depth (N,).

    Worked example, parents = [-1, 0, 0, 1]: mask rows 0: {0}, 1: {0,1}, 2: {0,2}, 3: {0,1,3}.
    Both attention implementations compute every tree score whatever the mask, so any tree of N
    nodes costs the same; the shape only sets the positions (prefix + depth).
    """
    mask, depth = np.eye(n, dtype=bool), np.zeros(n, np.int32)
    for i in range(1, n):
        parent = rng.integers(0, i)
        mask[i] |= mask[parent]
        depth[i] = depth[parent] + 1
    return mask, depth


def _forward(model, params, tokens, positions, tree_mask, cache):
    logits, _, cache = model.apply({"params": params}, tokens, positions, cache, tree_mask)
    return logits, cache


def compile_forward(cfg: ModelConfig, params, inputs, cache):
    """-> (forward compiled with the cache donated, dict of compile facts).

    `triton_kernel`: whether the program calls a Pallas Triton kernel. "pallas" silently falls back
    to XLA on NotImplementedError, so a GPU result for "pallas" only counts if this is true.
    """
    forward = jax.jit(functools.partial(_forward, Transformer(cfg)), donate_argnums=(4,))
    start = time.perf_counter()
    lowered = forward.lower(params, *inputs, cache)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return compiled, dict(lower_s=lowered_at - start, compile_s=time.perf_counter() - lowered_at,
                          triton_kernel="xla.gpu.triton" in lowered.as_text())


def time_calls(forward, params, inputs, cache, samples: int, iters: int):
    """-> (per-call seconds of each sample, cache). Calls are chained through the donated cache."""
    for _ in range(2):  # warm-up
        logits, cache = forward(params, *inputs, cache)
    jax.block_until_ready((logits, cache))
    per_call = []
    for _ in range(samples):
        start = time.perf_counter()
        for _ in range(iters):
            logits, cache = forward(params, *inputs, cache)
        jax.block_until_ready((logits, cache))
        per_call.append((time.perf_counter() - start) / iters)
    return per_call, cache


@dataclasses.dataclass(frozen=True)
class Bench:
    """Settings shared by every case."""

    cfg: ModelConfig  # attention_impl is set per case
    capacity: int  # cache slots, the same for every prefix so that one program serves them all
    prefixes: tuple[int, ...]
    samples: int
    iters: int
    seed: int
    param_bytes: int


def run_case(bench: Bench, params, n: int, impl: str):
    """Compile the forward for (N, impl) and time it at every prefix -> (rows, {prefix: logits}).

    logits (1, N, V) float32 are those of the first call on a fresh cache: the same inputs for every
    implementation, so they can be compared.
    """
    cfg = bench.cfg.replace(attention_impl=impl)
    rng = np.random.default_rng(bench.seed + n)  # the same tokens and tree for every implementation
    mask, depth = random_tree(n, rng)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, n)), jnp.int32)
    tree_mask = jnp.asarray(mask)[None]
    kv_row_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
    compiled, facts = None, {}
    rows, logits_by_prefix = [], {}
    for prefix in bench.prefixes:
        inputs = (tokens, jnp.asarray(prefix + depth, jnp.int32)[None], tree_mask)
        cache = random_cache(bench.cfg, bench.capacity, jax.random.key(bench.seed + 1), prefix)
        if compiled is None:
            compiled, facts = compile_forward(cfg, params, inputs, cache)
        logits, cache = compiled(params, *inputs, cache)
        logits_by_prefix[prefix] = logits
        per_call, cache = time_calls(compiled, params, inputs, cache, bench.samples, bench.iters)
        floor_bytes = bench.param_bytes + kv_row_bytes * (prefix + n)
        rows.append(dict(
            impl=impl, prefix=prefix, n=n, ms=1e3 * statistics.median(per_call), ms_min=1e3 * min(per_call),
            samples_ms=[1e3 * s for s in per_call], hbm_floor_ms=1e3 * floor_bytes / HBM_BYTES_PER_S,
            finite=bool(jnp.isfinite(logits).all()), **facts,
        ))
        del cache
    return rows, logits_by_prefix


def compare(logits, reference):
    """Same inputs, two attention implementations -> agreement of their logits (B, N, V)."""
    diff = float(jnp.max(jnp.abs(logits - reference)))
    scale = float(jnp.max(jnp.abs(reference)))
    top1 = float(jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(reference, -1)))
    return dict(max_abs_diff_vs_xla=diff, max_abs_logit_xla=scale, top1_agreement_vs_xla=top1)


def add_ratios(rows):
    """ratio_vs_ar: over the same implementation's AR step at the same prefix; ratio_vs_best_ar:
    over the fastest AR step measured at that prefix (what a deployment would compare against)."""
    ar = {(r["impl"], r["prefix"]): r["ms"] for r in rows if r["n"] == 1 and "ms" in r}
    for r in rows:
        if "ms" in r and (r["impl"], r["prefix"]) in ar:
            r["ratio_vs_ar"] = r["ms"] / ar[r["impl"], r["prefix"]]
            r["ratio_vs_best_ar"] = r["ms"] / min(ms for (_, p), ms in ar.items() if p == r["prefix"])


def markdown(rows, meta) -> str:
    lines = [
        f"One forward at {meta['model']}, B=1, cache of {meta['capacity']} slots, on {meta['device']} "
        f"(jax {meta['jax']}, {meta['date']}). Median ms per call over {meta['samples']} samples of "
        f"{meta['iters']} chained calls; N=1 is the AR step; 'vs AR' divides by the same "
        f"implementation's AR step at the same prefix. HBM floor = (weights + used K/V) / 4.8 TB/s."
        + (" Smoke run on CPU: these times say nothing about the GPU." if meta["smoke"] else ""),
        "",
        "| impl | prefix | N | ms/call | min ms | vs AR | HBM floor ms | compile s | max abs diff vs xla "
        "| top-1 agree |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    columns = (("ms", ".3f"), ("ms_min", ".3f"), ("ratio_vs_ar", ".3f"), ("hbm_floor_ms", ".3f"),
               ("compile_s", ".1f"), ("max_abs_diff_vs_xla", ".2e"), ("top1_agreement_vs_xla", ".3f"))
    for r in sorted(rows, key=lambda r: (r["impl"], r["prefix"], r["n"])):
        cells = [r["impl"], r["prefix"], r["n"]]
        if "error" in r:
            cells += ["failed (see JSON)"] + [""] * (len(columns) - 1)
        else:
            cells += [format(r[key], spec) if key in r else "" for key, spec in columns]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    goal = [r for r in rows if r["n"] == GOAL_N and "ratio_vs_ar" in r]
    lines += ["", f"Goal: N={GOAL_N} verification <= {GOAL_RATIO}x an AR step."]
    for r in sorted(goal, key=lambda r: (r["impl"], r["prefix"])):
        verdict = "met" if r["ratio_vs_ar"] <= GOAL_RATIO else "not met"
        lines.append(f"- {r['impl']}, prefix {r['prefix']}: {r['ratio_vs_ar']:.3f}x its own AR step ({verdict}); "
                     f"{r['ratio_vs_best_ar']:.3f}x the fastest AR step")
    if not goal:
        lines.append(f"- no N={GOAL_N} case with its AR step was measured")
    if meta["skipped_past_deadline"]:
        lines += ["", f"Not run (past the time limit): {meta['skipped_past_deadline']}"]
    fallback = sorted({r["n"] for r in rows if r["impl"] == "pallas" and r.get("triton_kernel") is False})
    if fallback:
        lines += ["", f"Warning: no Triton kernel in the 'pallas' program at N = {fallback}: XLA ran instead."]
    return "\n".join(lines) + "\n"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "./out"))
    parser.add_argument("--prefix", type=int, nargs="+", default=[1024, 4096], help="committed tokens")
    parser.add_argument("--budget", type=int, nargs="+", default=[128, 256, 64, 16],
                        help="tree sizes N, in the order they run (N = 1 always runs first)")
    parser.add_argument("--impl", nargs="+", default=["pallas", "xla"], help="attention_impl values")
    parser.add_argument("--num-layers", type=int, default=None, help="override the layer count (faster compiles)")
    parser.add_argument("--samples", type=int, default=7)
    parser.add_argument("--iters", type=int, default=5, help="calls per sample, issued back to back")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deadline-s", type=float, default=600,
                        help="start no case that would likely end past this many seconds")
    parser.add_argument("--smoke", action="store_true", help="tiny float32 model, xla and pallas_interpret, on CPU")
    args = parser.parse_args()
    if args.smoke:
        args.prefix, args.budget, args.impl = [8, 40], [128, 16], ["pallas_interpret", "xla"]
        args.samples, args.iters = 3, 2
    return args


def sweep(bench: Bench, params, budgets, impls, deadline_s: float, write_results):
    """Run every (N, impl) case in order, skipping those that would likely end past the deadline.

    -> (rows, skipped). `write_results(rows, skipped)` runs after every case.
    """
    rows, skipped, last_case_s, start = [], [], 0.0, time.perf_counter()
    for n in budgets:
        logits = {}
        for impl in impls:
            case_start = time.perf_counter()
            if case_start - start + last_case_s > deadline_s:
                skipped.append(dict(impl=impl, n=n))
                print(f"skip {impl} N={n}: past the deadline", flush=True)
                continue
            try:
                case_rows, logits[impl] = run_case(bench, params, n, impl)
            except Exception as e:  # noqa: BLE001 -- a GPU run is scarce: record the failure, time the rest
                error = f"{type(e).__name__}: {e}"[:2000]
                case_rows = [dict(impl=impl, n=n, prefix=p, error=error) for p in bench.prefixes]
                print(f"{impl:16s} N {n:4d} FAILED {error[:300]}", flush=True)
            for r in case_rows:
                if "ms" in r:
                    print(f"{impl:16s} N {n:4d} prefix {r['prefix']:6d} {r['ms']:9.3f} ms/call "
                          f"(compile {r['compile_s']:.1f} s)", flush=True)
            rows += case_rows
            last_case_s = time.perf_counter() - case_start
            if REFERENCE_IMPL in logits:  # same inputs, same fresh cache: the logits must agree
                for r in rows:
                    if r["n"] == n and r["impl"] in logits and r["impl"] != REFERENCE_IMPL:
                        r.update(compare(logits[r["impl"]][r["prefix"]], logits[REFERENCE_IMPL][r["prefix"]]))
            write_results(rows, skipped)
    return rows, skipped


def failures(rows, smoke: bool) -> list[str]:
    where = lambda r: f"{r['impl']} N={r['n']} prefix {r['prefix']}"  # noqa: E731
    found = [f"{where(r)}: {r['error'][:200]}" for r in rows if "error" in r]
    found += [f"{where(r)}: non-finite logits" for r in rows if r.get("finite") is False]
    if smoke:  # float32 on CPU: the Pallas kernel inside the model must match XLA tightly
        found += [f"{where(r)}: max abs diff {r['max_abs_diff_vs_xla']:.2e} vs xla" for r in rows
                  if r.get("max_abs_diff_vs_xla", 0.0) > 1e-4 * max(1.0, r.get("max_abs_logit_xla", 1.0))]
    return found


def main():
    args = parse_args()
    start = time.perf_counter()
    cfg = TINY if args.smoke else QWEN3_8B
    if args.num_layers:
        cfg = cfg.replace(num_layers=args.num_layers)
    budgets = [1] + [n for n in dict.fromkeys(args.budget) if n != 1]
    capacity = -(-(max(args.prefix) + max(budgets)) // 128) * 128  # a bit more than any case uses
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    params = jax.block_until_ready(random_params(cfg, args.seed))
    bench = Bench(cfg, capacity, tuple(args.prefix), args.samples, args.iters, args.seed,
                  param_bytes=sum(x.nbytes for x in jax.tree.leaves(params)))
    device = jax.devices()[0]
    meta = dict(
        model=f"{'tiny smoke model' if args.smoke else 'Qwen3-8B shape'} ({cfg.num_layers} layers, {cfg.dtype})",
        config=dataclasses.asdict(cfg), device=f"{device.platform}: {device.device_kind}",
        backend=jax.default_backend(), jax=jax.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        capacity=capacity, param_bytes=bench.param_bytes, samples=args.samples, iters=args.iters,
        smoke=args.smoke, params_ready_s=time.perf_counter() - start, skipped_past_deadline=[],
    )
    print(f"params: {bench.param_bytes / 1e9:.2f} GB in {meta['params_ready_s']:.1f} s; cache {capacity} slots")

    def write_results(rows, skipped):
        add_ratios(rows)
        meta["skipped_past_deadline"] = skipped
        (out / "verify_bench.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        (out / "verify_bench.md").write_text(markdown(rows, meta))

    remaining_s = args.deadline_s - (time.perf_counter() - start)
    rows, skipped = sweep(bench, params, budgets, args.impl, remaining_s, write_results)
    write_results(rows, skipped)
    print(markdown(rows, meta))
    print(f"wrote {out / 'verify_bench.md'} in {time.perf_counter() - start:.0f} s")
    if found := failures(rows, args.smoke):
        raise SystemExit("bench_verify failed:\n" + "\n".join(found))


if __name__ == "__main__":
    main()

"""Time the whole decoding loop at Qwen3-8B shape: rounds of draft, verify, accept, commit.

    python scripts/bench_loop.py [--out DIR]     # on a GPU; DIR defaults to $OUT or ./out
    python scripts/bench_loop.py --smoke         # tiny float32 models on CPU: checks the script

The target (Qwen3-8B shape, `jetspec_jax.lowering.QWEN3_8B`) and the published JetSpec head layout
(5 layers tapping 5 target layers, block size 16; `lowering.QWEN3_8B_HEAD`) get random bf16 weights
(`jetspec_jax.benchmark.synthetic`), so the head's drafts are noise: about one token is accepted per
round, and what this measures is the cost of a round at each tree size N, not a speed-up. N = 1 is
plain AR decoding (no head); N > 1 is a best-first tree of width 8 and depth 15 (`qwen3_8b_config`),
`attention_impl="auto"` (the Pallas kernel on GPU).

Each case compiles prefill and the loop ahead of time (`decode.compile_programs`, the CLI's
warm-up), then runs those programs for `--repeats` generations of a random `--prompt-len`-token
prompt (one row, `--max-new-tokens` new tokens, no stop ids) and keeps the fastest decoding time (prefill excluded).
Cases run in priority order and stop cleanly at --deadline-s; results are rewritten after every case.
Writes loop_bench.{json,md} to DIR.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import time

import jax
import numpy as np

from jetspec_jax.benchmark.synthetic import random_like
from jetspec_jax.config import ModelConfig
from jetspec_jax.decode import compile_programs, prefill_inputs, results
from jetspec_jax.head import HeadConfig
from jetspec_jax.lowering import abstract_params, qwen3_8b_config
from jetspec_jax.step import DecodeConfig
from jetspec_jax.tree import TreeConfig

SMOKE_TARGET = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                           head_dim=16, intermediate_size=128, qk_norm=True)
SMOKE_HEAD = HeadConfig(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
                        intermediate_size=128, vocab_size=256, num_target_layers=2, mask_token_id=255,
                        block_size=16, target_layer_ids=(0, 1))


def case_config(n: int, smoke: bool) -> DecodeConfig:
    """N = 1: AR with the target alone; N > 1: the head and a best-first tree of N nodes."""
    if smoke:
        tree = TreeConfig(budget=n, width=8, depth=15)
        return DecodeConfig(target=SMOKE_TARGET) if n == 1 else DecodeConfig(SMOKE_TARGET, SMOKE_HEAD, tree)
    config = qwen3_8b_config(budget=max(n, 2))
    return DecodeConfig(target=config.target) if n == 1 else config


def run_case(n: int, params_for, args) -> dict:
    config = case_config(n, args.smoke)
    params = params_for(config)
    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(0, config.target.vocab_size, args.prompt_len).tolist()
    inputs = prefill_inputs([prompt], config, max_new_tokens=args.max_new_tokens)
    t0 = time.perf_counter()
    programs = compile_programs(params, inputs, config)
    compile_s = time.perf_counter() - t0
    best = None
    for _ in range(args.repeats):  # the programs just compiled: no compile inside the timed region
        state = jax.block_until_ready(programs.prefill(params, inputs))
        t0 = time.perf_counter()
        state = jax.block_until_ready(programs.decode(params, state, args.max_new_tokens))
        seconds = time.perf_counter() - t0
        gen = results(state)[0]
        if best is None or seconds < best[0]:
            best = (seconds, gen)
    seconds, gen = best
    rounds, tokens = len(gen.accept_lengths), len(gen.ids)
    return dict(n=n, compile_s=compile_s, decode_s=seconds, rounds=rounds, new_tokens=tokens,
                tau=tokens / max(rounds, 1), round_ms=1e3 * seconds / max(rounds, 1),
                tokens_per_s=tokens / seconds if seconds > 0 else None)


def markdown(rows, meta) -> str:
    lines = [
        f"Decoding loop at {meta['model']}, B=1, a {meta['prompt_len']}-token random prompt, "
        f"{meta['max_new_tokens']} new tokens, on {meta['device']} (jax {meta['jax']}, {meta['date']}). "
        "Random weights: the head's drafts are noise, so tau is about 1 and tok/s is the cost of a "
        "round, not a speed-up. Fastest of the repeats; prefill excluded."
        + (" Smoke run on CPU: these times say nothing about the GPU." if meta["smoke"] else ""),
        "",
        "| N | rounds | new tokens | tau | ms/round | vs AR round | tok/s | compile s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ar = next((r["round_ms"] for r in rows if r["n"] == 1 and "round_ms" in r), None)
    for r in sorted(rows, key=lambda r: r["n"]):
        if "error" in r:
            lines.append(f"| {r['n']} | failed: {r['error'][:120]} | | | | | | |")
            continue
        ratio = f"{r['round_ms'] / ar:.2f}" if ar else ""
        lines.append(f"| {r['n']} | {r['rounds']} | {r['new_tokens']} | {r['tau']:.2f} | {r['round_ms']:.2f} | "
                     f"{ratio} | {r['tokens_per_s']:.1f} | {r['compile_s']:.1f} |")
    if meta["skipped_past_deadline"]:
        lines += ["", f"Not run (past the time limit): N = {meta['skipped_past_deadline']}"]
    return "\n".join(lines) + "\n"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "./out"))
    parser.add_argument("--budget", type=int, nargs="+", default=[1, 64, 256, 16],
                        help="tree sizes N, in the order they run (1 = AR)")
    parser.add_argument("--prompt-len", type=int, default=1000)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deadline-s", type=float, default=600,
                        help="start no case that would likely end past this many seconds")
    parser.add_argument("--smoke", action="store_true", help="tiny float32 models on CPU")
    args = parser.parse_args()
    if args.smoke:
        args.prompt_len, args.max_new_tokens = min(args.prompt_len, 40), min(args.max_new_tokens, 16)
    return args


def main():
    args = parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = jax.devices()[0]
    meta = dict(
        model="tiny smoke models" if args.smoke else "Qwen3-8B shape with the published 5-layer head (bf16)",
        device=f"{device.platform}: {device.device_kind}", jax=jax.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        prompt_len=args.prompt_len, max_new_tokens=args.max_new_tokens, repeats=args.repeats,
        smoke=args.smoke, skipped_past_deadline=[],
    )
    cache = {}  # one random target (and head) for every case: 16 GB of bf16 at Qwen3-8B shape

    def params_for(config):
        if "target" not in cache:
            cache["target"] = jax.block_until_ready(random_like(abstract_params(case_config(16, args.smoke))["target"],
                                                                args.seed))
        params = {"target": cache["target"]}
        if config.head is not None:
            if "head" not in cache:
                cache["head"] = random_like(abstract_params(config)["head"], args.seed + 1)
            params["head"] = cache["head"]
        return params

    rows, begin, last = [], time.perf_counter(), 0.0
    for n in dict.fromkeys(args.budget):
        case_start = time.perf_counter()
        if case_start - begin + last > args.deadline_s:
            meta["skipped_past_deadline"].append(n)
            print(f"skip N={n}: past the deadline", flush=True)
            continue
        try:
            row = run_case(n, params_for, args)
            print(f"N {n:4d}: {row['round_ms']:8.2f} ms/round, tau {row['tau']:.2f}, {row['tokens_per_s']:.1f} tok/s "
                  f"(compile {row['compile_s']:.1f} s)", flush=True)
        except Exception as e:  # noqa: BLE001 -- a GPU run is scarce: record the failure, time the rest
            row = dict(n=n, error=f"{type(e).__name__}: {e}"[:2000])
            print(f"N {n:4d} FAILED {row['error'][:300]}", flush=True)
        rows.append(row)
        last = time.perf_counter() - case_start
        (out / "loop_bench.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        (out / "loop_bench.md").write_text(markdown(rows, meta))
    print(f"wrote {out / 'loop_bench.md'}")
    failed = [r for r in rows if "error" in r]
    if failed:
        raise SystemExit(f"{len(failed)} cases failed; see {out / 'loop_bench.json'}")


if __name__ == "__main__":
    main()

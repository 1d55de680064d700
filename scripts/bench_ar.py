"""AR decoding speed of SmolLM2-135M-Instruct: ours (JAX) against HF transformers (torch), one run.

    python scripts/bench_ar.py [--reps 5] [--max-new-tokens 128] [--json out.json]

Both engines get the same chat-template prompt ids and generate exactly `max-new-tokens` tokens
greedily in float32 (no stop on EOS, so the work is the same): ours through `Runner` (prefill plus
the jitted decoding loop in host-synced chunks, as `python -m jetspec_jax.generate` runs it), theirs
through `model.generate` on the same GGUF file. Each timed call covers prefill and all new tokens.
One untimed warm-up call per engine (compilation, allocator warm-up), then `reps` rounds that
alternate the engines, so drifts in machine load hit both alike; the table reports medians. The
machine (CPU model, cores, load averages before and after) and the date go into the output.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time

from jetspec_jax.benchmark.measure import machine

PROMPT = "Write a short poem about the sea."
MODEL = "smollm2-135m"


class Ours:
    name = "jetspec-jax"

    def __init__(self, model):
        from jetspec_jax.runner import Runner
        from jetspec_jax.step import DecodeConfig

        self.runner = Runner({"target": model.params}, DecodeConfig(target=model.config))

    def generate(self, ids, max_new):
        (row,) = self.runner.run([ids], max_new_tokens=max_new)  # no stop ids: exactly max_new tokens
        return row.ids


class Transformers:
    name = "transformers"

    def __init__(self, gguf_path):
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging

        logging.disable_progress_bar()
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval()

    def generate(self, ids, max_new):
        x = self.torch.tensor([ids])
        with self.torch.inference_mode():
            out = self.model.generate(
                x, attention_mask=self.torch.ones_like(x), max_new_tokens=max_new, min_new_tokens=max_new,
                do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0)
        return out[0, len(ids):].tolist()


def time_call(engine, ids, max_new):
    t0 = time.perf_counter()
    new = engine.generate(ids, max_new)
    return time.perf_counter() - t0, new


def common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def run(args) -> dict:
    import jax
    import torch
    import transformers

    from jetspec_jax.loading import load_model, resolve_model

    started = datetime.datetime.now().astimezone()
    before = machine()
    model = load_model(MODEL)
    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    engines = [Ours(model), Transformers(resolve_model(MODEL))]
    outputs, seconds = {}, {e.name: [] for e in engines}
    for e in engines:  # warm-up: compiles ours, warms torch's allocator and kernels
        time_call(e, ids, args.max_new_tokens)
    for _ in range(args.reps):
        for e in engines:
            t, outputs[e.name] = time_call(e, ids, args.max_new_tokens)
            seconds[e.name].append(t)
    rows = {}
    for e in engines:
        med = statistics.median(seconds[e.name])
        rows[e.name] = {"tokens_per_second": round(args.max_new_tokens / med, 2), "median_seconds": round(med, 4),
                        "seconds": [round(s, 4) for s in seconds[e.name]]}
    ours, theirs = (outputs[e.name] for e in engines)
    return {
        "date": started.isoformat(timespec="seconds"),
        "command": "python scripts/bench_ar.py " + " ".join(args.argv),
        "model": MODEL, "prompt": args.prompt, "prompt_tokens": len(ids),
        "max_new_tokens": args.max_new_tokens, "reps": args.reps, "dtype": "float32", "decoding": "greedy",
        "machine": {**before, "load_avg_after": machine()["load_avg"], "torch_threads": torch.get_num_threads(),
                    "jax_backend": jax.default_backend()},
        "versions": {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "results": rows,
        "ratio": round(rows[engines[0].name]["tokens_per_second"] / rows[engines[1].name]["tokens_per_second"], 3),
        "same_tokens": common_prefix(ours, theirs),  # leading new tokens on which both engines agree
    }


def table(result) -> str:
    m = result["machine"]
    lines = [
        f"{result['date']}  {m['cpu']}, {m['cores']} cores, load {m['load_avg']} -> {m['load_avg_after']}",
        f"prompt {result['prompt_tokens']} tokens, {result['max_new_tokens']} new tokens, greedy float32, "
        f"median of {result['reps']}",
        f"{'engine':<14}{'tok/s':>8}{'median s':>10}  all runs (s)",
    ]
    for name, r in result["results"].items():
        lines.append(f"{name:<14}{r['tokens_per_second']:>8.2f}{r['median_seconds']:>10.3f}  {r['seconds']}")
    lines.append(f"ratio ours/transformers: {result['ratio']:.2f}x; "
                 f"identical leading tokens: {result['same_tokens']}/{result['max_new_tokens']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5, help="timed rounds per engine (median reported)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--prompt", default=PROMPT, help="user message (the chat template is applied)")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    args = p.parse_args(argv)
    args.argv = argv
    result = run(args)
    print(table(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

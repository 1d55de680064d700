"""Mean accepted length (tau) of trained draft heads over a budget sweep, on the evaluation sets.

    python scripts/eval_tau.py --head causal=runs/heads/smollm2-135m-causal/head \
        --head bidir=runs/heads/smollm2-135m-bidir/head --out docs/tau

For each evaluation set (MATH-500, HumanEval, MT-Bench first turns; the head never trained on
them) the first --num-prompts questions go through the chat template, then the real jitted
speculative loop (`decode.generate`, one batch per set) at every budget: 1 = the chain of the
head's full depth, N > 1 = a best-first tree of N nodes. Greedy. tau = tokens emitted / rounds,
pooled over the prompts of a set; every output is checked equal to greedy AR of the target alone
(exit 1 if one differs). Writes tau.json, tau.md and tau.png to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

from tqdm import tqdm

from jetspec_jax.benchmark.measure import machine
from jetspec_jax.benchmark.sources import prompt_sets_from_names
from jetspec_jax.decode import generate
from jetspec_jax.errors import UserError
from jetspec_jax.head import check_head_fits
from jetspec_jax.layers import pack_linears
from jetspec_jax.loading import load_model
from jetspec_jax.loading.head_io import load_head_dir
from jetspec_jax.model import for_cpu_decoding
from jetspec_jax.step import DecodeConfig
from jetspec_jax.tree import TreeConfig, lookup_nodes, parse_lookup

EVAL_SETS = ("math500", "humaneval", "mtbench")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--head", action="append", required=True, metavar="NAME=DIR",
                   help="a head to evaluate (repeatable), e.g. causal=runs/heads/x/head")
    p.add_argument("--sets", default=",".join(EVAL_SETS))
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--budgets", default="1,8,16,32,64,128")
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--lookup", default="0",
                   help="prompt-lookup nodes per tree, comma-separated: each head runs with each "
                        "(named HEAD+lookupL when L > 0), e.g. 0,3; 'all' = every node but the root "
                        "(N-1; the chain's full depth); a budget too small for L is left out")
    p.add_argument("--ngrams", default="on",
                   help="with a head that ships an answer n-gram table (ngrams.safetensors): 'on' (the "
                        "lookup branch of rows without a match in the text comes from it, as decoding "
                        "does), 'off' (named HEAD+lookupL-ngrams), or on,off")
    p.add_argument("--out", default="docs/tau")
    return p.parse_args(argv)


def tree_for(budget: int, depth: int, width: int, lookup: int | str = 0) -> TreeConfig | None:
    """The tree of a budget (1 = the chain of the head's full depth) with `lookup` forced nodes
    ('all': every node but the root); None when the budget cannot hold them."""
    nodes = depth + 1 if budget == 1 else budget
    lookup = lookup_nodes(lookup, nodes, depth)
    if lookup >= nodes or lookup > depth:
        return None
    if budget == 1:
        return TreeConfig(budget=nodes, width=1, depth=depth, kind="chain", lookup=lookup)
    return TreeConfig(budget, width, depth, lookup=lookup)


def parse_ngrams(spec: str) -> list:
    values = list(dict.fromkeys(x.strip() for x in spec.split(",") if x.strip()))
    if not values or set(values) - {"on", "off"}:
        raise UserError(f"--ngrams must be on, off or on,off, got {spec!r}")
    return values


def parse_lookups(spec: str) -> list:
    try:
        return [parse_lookup(x) for x in spec.split(",") if x.strip()]
    except ValueError as e:
        raise UserError(f"--lookup: {e}") from None


def evaluate(argv=None) -> int:
    args = parse_args(argv)
    parse_ngrams(args.ngrams)
    heads = {}
    for spec in args.head:
        name, _, path = spec.partition("=")
        if not path:
            raise UserError(f"--head wants NAME=DIR, got {spec!r}")
        head_cfg, head_params = load_head_dir(path)
        head_params = pack_linears(head_params)  # the CPU kernel's layout, as Runner decodes (same outputs)
        for lookup in parse_lookups(args.lookup):
            for ngrams in parse_ngrams(args.ngrams) if lookup and head_cfg.ngram_orders else ["on"]:
                label = name if lookup == 0 else f"{name}+lookup{lookup}" + ("-ngrams" if ngrams == "off" else "")
                cfg = head_cfg if ngrams == "on" else head_cfg.replace(ngram_orders=())  # table left unused
                heads[label] = (cfg, head_params, lookup)
    model = load_model(args.model)
    target = for_cpu_decoding(model.config, model.params)
    for cfg, _, _ in heads.values():
        check_head_fits(cfg, model.config)
    budgets = [int(b) for b in args.budgets.split(",")]
    sets = prompt_sets_from_names(args.sets.split(","), model.tokenizer, args.num_prompts)
    rows, mismatches = [], []
    runs = [(h, b, tree) for h, (cfg, _, lookup) in heads.items() for b in budgets
            if (tree := tree_for(b, cfg.block_size - 1, args.width, lookup)) is not None]
    bar = tqdm(total=len(sets) * (1 + len(runs)), desc="tau", file=sys.stderr)
    for set_name, prompts in sets.items():
        ids = [p.ids for p in prompts]
        ar = generate({"target": target}, ids, DecodeConfig(target=model.config),
                      max_new_tokens=args.max_new_tokens, stop_ids=model.eos_ids)
        bar.update()
        for head_name, budget, tree in runs:
            cfg, head_params, _ = heads[head_name]
            params = {"target": target, "head": head_params}
            config = DecodeConfig(model.config, cfg, tree)
            t0 = time.perf_counter()
            out = generate(params, ids, config, max_new_tokens=args.max_new_tokens, stop_ids=model.eos_ids)
            seconds = time.perf_counter() - t0
            for p, g, ref in zip(prompts, out, ar):
                if g.ids != ref.ids:
                    mismatches.append({"set": set_name, "prompt": p.index, "head": head_name, "budget": budget})
            tokens, rounds = sum(len(g.ids) for g in out), sum(g.rounds for g in out)
            rows.append({"set": set_name, "head": head_name, "budget": budget,
                         "nodes": config.budget, "tau": tokens / rounds, "tokens": tokens,
                         "rounds": rounds, "seconds_incl_compile": round(seconds, 2),
                         "per_prompt_tau": [round(len(g.ids) / g.rounds, 3) for g in out]})
            bar.set_postfix_str(f"{set_name} {head_name} N={budget} tau={tokens / rounds:.2f}")
            bar.update()
    bar.close()
    report = {
        "meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "command": "python scripts/eval_tau.py " + shlex.join(sys.argv[1:] if argv is None else argv),
                 "machine": machine(),
                 "model": args.model, "heads": dict(s.partition("=")[::2] for s in args.head),
                 "lookup": args.lookup,
                 "num_prompts": args.num_prompts, "max_new_tokens": args.max_new_tokens,
                 "width": args.width, "greedy": True},
        "rows": rows, "mismatches": mismatches,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tau.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "tau.md").write_text(markdown(report, budgets, list(heads), list(sets)))
    plot(report, budgets, list(heads), list(sets), out / "tau.png")
    sys.stdout.write(markdown(report, budgets, list(heads), list(sets)))
    if mismatches:
        print(f"FAILED: {len(mismatches)} speculative outputs differ from greedy AR", file=sys.stderr)
        return 1
    return 0


def _tau(report, set_name, head, budget):
    """tau of one run, None when that budget could not hold the head's lookup nodes."""
    return next((r["tau"] for r in report["rows"] if (r["set"], r["head"], r["budget"]) == (set_name, head, budget)),
                None)


def markdown(report, budgets, heads, sets) -> str:
    m = report["meta"]
    lines = [f"tau (tokens per round, greedy) of {', '.join(heads)} on {m['model']}: first "
             f"{m['num_prompts']} prompts per set, {m['max_new_tokens']} new tokens, width {m['width']}; "
             f"budget 1 = chain. {m['date']}, `{m['command']}`.", "",
             "| set | head | " + " | ".join(f"N={b}" if b > 1 else "chain" for b in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    for s in sets:
        for h in heads:
            lines.append(f"| {s} | {h} | " + " | ".join(_cell(_tau(report, s, h, b)) for b in budgets) + " |")
    ok = "all equal to greedy AR" if not report["mismatches"] else f"{len(report['mismatches'])} MISMATCHES"
    lines += ["", f"Outputs: {ok}.", ""]
    return "\n".join(lines)


def _cell(tau) -> str:
    return "-" if tau is None else f"{tau:.2f}"


def plot(report, budgets, heads, sets, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.4), sharey=True, squeeze=False)
    for ax, s in zip(axes[0], sets):
        for h in heads:
            taus = [_tau(report, s, h, b) for b in budgets]
            ax.plot([i for i, t in enumerate(taus) if t is not None], [t for t in taus if t is not None],
                    marker="o", label=h)
        ax.set_xticks(range(len(budgets)), ["chain" if b == 1 else str(b) for b in budgets])
        ax.set_title(s)
        ax.set_xlabel("budget (nodes)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("tau (tokens / round)")
    axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    try:
        return evaluate(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`python -m jetspec_jax.bench`: tau, tokens/s and where a round's time goes, for AR, chain and
tree decoding over a budget sweep; every speculative output checked equal to greedy AR; HF
transformers and the `dflash` reference loop timed on the same prompt ids.

    python -m jetspec_jax.bench --draft HEAD_DIR --prompt-sets math500,mtbench --num-prompts 10
    python -m jetspec_jax.bench --model DIR --draft HEAD_DIR --prompt-ids-file prompts.jsonl
    python -m jetspec_jax.bench --draft HEAD_DIR --batch-sizes 1,4,16

Writes results.json, report.md and bench.png to --out (default runs/bench/<timestamp>), prints
the markdown report on stdout and progress on stderr. Exit status 0; 1 when a speculative (or
batched) output differs from greedy AR (the mismatches are printed); 2 on bad input (one `error:`
line).
Greedy decoding, batch 1, one prompt at a time: every engine (and the instrumented time split, on
the first --split-prompts prompts of each set) runs a prompt before the next prompt starts, so
slow drifts in machine load hit all engines alike. With --batch-sizes, after a set's prompts our
configs also run on consecutive groups of B prompts in one fused loop per group (each group with
every config before the next group), every row checked equal to batch-1 greedy AR.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import shlex
import sys
from pathlib import Path

from jetspec_jax.cli import default_head_path
from jetspec_jax.errors import UserError
from jetspec_jax.prompts import PROMPT_SETS

MODES = ("ar", "chain", "tree")
PEER_NAMES = ("hf", "dflash")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(message)


def _int_list(text, low: int = 1):
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < low:
        raise argparse.ArgumentTypeError(f"expected integers >= {low}, got {text!r}")
    return values


def _lookup_list(text):
    from jetspec_jax.tree import parse_lookup

    try:
        return list(dict.fromkeys(parse_lookup(x) for x in text.split(",") if x.strip()))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _name_list(choices):
    def parse(text):
        names = [x.strip() for x in text.split(",") if x.strip() and x.strip() != "none"]
        bad = [n for n in names if n not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad[0]!r}; choose from {', '.join(choices)}")
        return list(dict.fromkeys(names))
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m jetspec_jax.bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="registered name, HF directory or .gguf")
    p.add_argument("--draft", default=None,
                   help="draft head directory, or 'none' (default: the head registered for --model; "
                        "without one only ar runs)")
    p.add_argument("--prompt-sets", type=_name_list(tuple(PROMPT_SETS)),
                   default=["math500", "gsm8k", "humaneval", "mbpp", "mtbench"],
                   help="comma-separated prompt sets (chat template applied)")
    p.add_argument("--prompt-ids-file", default=None,
                   help="JSONL of prompt / messages / prompt_ids lines with an optional 'set' field; "
                        "replaces --prompt-sets (no download)")
    p.add_argument("--num-prompts", type=int, default=10, help="first K prompts of each set")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--modes", type=_name_list(MODES), default=list(MODES),
                   help="which of ar, chain, tree to run (ar always runs: it is the equality reference)")
    p.add_argument("--budgets", type=_int_list, default=[1, 8, 16, 32, 64, 128],
                   help="node budgets N of the sweep; 1 = the chain of the head's full depth")
    p.add_argument("--width", type=int, default=4, help="tree width W (top-W per depth)")
    p.add_argument("--tree-kind", choices=("best_first", "top2gap"), default="best_first")
    p.add_argument("--lookup", type=_lookup_list, default=[0],
                   help="prompt-lookup nodes per tree, comma-separated (0: off; 'all': every node "
                        "but the root); each tree of the sweep runs with each value that fits, e.g. 0,2,all")
    p.add_argument("--ngrams", type=_name_list(("on", "off")), default=["on"],
                   help="with a head that ships an answer n-gram table: on (rows whose text has no "
                        "match take the lookup branch from it, as decoding does), off, or on,off")
    p.add_argument("--peers", type=_name_list(PEER_NAMES), default=list(PEER_NAMES),
                   help="hf, dflash or none: other implementations timed on the same ids")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch intra-op threads for the peers (default: torch's own; on a shared, "
                        "loaded machine 1 can be several times faster)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per prompt (best kept)")
    p.add_argument("--batch-sizes", type=_int_list, default=[1],
                   help="comma-separated batch sizes B; for each B > 1 our configs also decode the "
                        "prompts of each set in groups of B (the last group padded by repeating its "
                        "prompts; padding not counted); tok/s compared with batch 1")
    p.add_argument("--split-prompts", type=int, default=2,
                   help="prompts per set for the instrumented time split (0: skip it)")
    p.add_argument("--out", default=None, help="output folder (default runs/bench/<timestamp>)")
    return p


def load_head(args, model, notes):
    """(head dir, (HeadConfig, params)) or (None, None) with the reason in `notes`."""
    from jetspec_jax.head import check_head_fits
    from jetspec_jax.loading.head_io import load_head_dir

    path = args.draft if args.draft is not None else default_head_path(args.model)
    if path == "none":
        return None, None
    if path is None:
        notes.append(f"no draft head: {args.model} has no registered default head; pass --draft DIR "
                     "to measure chain and tree (running ar only)")
        return None, None
    cfg, params = load_head_dir(path)
    check_head_fits(cfg, model.config)
    return path, (cfg, params)


def sweep_configs(args, target, head_cfg) -> list:
    """[(label, mode, budget, DecodeConfig)]: ar first, then the budget sweep."""
    from jetspec_jax.step import DecodeConfig
    from jetspec_jax.tree import TreeConfig, lookup_nodes

    out = [("ar", "ar", 1, DecodeConfig(target=target))]
    if head_cfg is None:
        return out
    depth = head_cfg.block_size - 1
    seen = set()
    for budget, option in itertools.product(dict.fromkeys(args.budgets), args.lookup):
        lookup = lookup_nodes(option, depth + 1 if budget == 1 else budget, depth)
        if (budget, lookup) in seen:  # 'all' may name a count also asked for
            continue
        seen.add((budget, lookup))
        for ngrams in args.ngrams if lookup and head_cfg.ngram_orders else ["on"]:
            tag = (f" lookup={lookup}" if lookup else "") + (" ngrams=off" if ngrams == "off" else "")
            head = head_cfg if ngrams == "on" else head_cfg.replace(ngram_orders=())  # table left unused
            try:
                if budget == 1 and "chain" in args.modes:
                    tree = TreeConfig(depth + 1, 1, depth, kind="chain", lookup=lookup)
                    out.append((f"chain{tag}", "chain", depth + 1, DecodeConfig(target, head, tree)))
                elif budget > 1 and "tree" in args.modes and lookup < budget:
                    tree = TreeConfig(budget, args.width, depth, kind=args.tree_kind, lookup=lookup)
                    out.append((f"tree N={budget}{tag}", "tree", budget, DecodeConfig(target, head, tree)))
            except ValueError as e:
                raise UserError(str(e)) from None
    if len(out) == 1 and set(args.modes) - {"ar"}:
        raise UserError(f"--modes {','.join(args.modes)} with --budgets "
                        f"{','.join(map(str, args.budgets))} leaves nothing to run "
                        "(budget 1 is the chain, budgets > 1 are trees)")
    return out


def _check(args):
    if not args.ngrams:
        raise UserError("--ngrams must name on, off or both")
    for name, low in (("num-prompts", 1), ("max-new-tokens", 1), ("width", 1), ("repeats", 1),
                      ("split-prompts", 0), ("torch-threads", 1)):
        value = getattr(args, name.replace("-", "_"))
        if value is not None and value < low:
            raise UserError(f"--{name} must be >= {low}")


def load_sets(args, tokenizer, prompt_sets):
    from jetspec_jax.benchmark.sources import PromptIds, prompt_sets_from_file, prompt_sets_from_names

    if prompt_sets is not None:
        return {name: [PromptIds(i, list(ids)) for i, ids in enumerate(rows[: args.num_prompts])]
                for name, rows in prompt_sets.items()}
    if args.prompt_ids_file:
        return prompt_sets_from_file(args.prompt_ids_file, tokenizer, args.num_prompts)
    return prompt_sets_from_names(args.prompt_sets, tokenizer, args.num_prompts)


def run(argv=None, prompt_sets=None) -> int:
    """The harness. `prompt_sets` ({name: [token id lists]}) replaces the prompt options."""
    from tqdm import tqdm

    from jetspec_jax.benchmark import measure, report
    from jetspec_jax.benchmark.peers import load_peers
    from jetspec_jax.benchmark.sweep import Sweep
    from jetspec_jax.loading import load_model, resolve_model
    from jetspec_jax.step import prepare_params

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    _check(args)
    started, machine, notes = datetime.datetime.now(), measure.machine(), []
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731

    model = load_model(args.model)
    head_dir, head = load_head(args, model, notes)
    configs = sweep_configs(args, model.config, head[0] if head else None)
    sets = load_sets(args, model.tokenizer, prompt_sets)
    params = {"target": model.params} | ({"head": head[1]} if head else {})
    # As Runner does: the CPU kernel's layouts, once (every config shares the target and the head)
    decode_configs = [c[-1] for c in configs]
    params = prepare_params(params, next((c for c in decode_configs if c.head is not None), decode_configs[0]))
    peers = load_peers(args.peers, resolve_model(args.model), head_dir, notes,
                       torch_threads=args.torch_threads)
    for n in notes:
        say(f"note: {n}")

    runner = measure.FusedRunner(params, max_new_tokens=args.max_new_tokens, stop_ids=model.eos_ids)
    sweep = Sweep(params, configs, peers, runner, args, model.eos_ids, say)
    sizes = [b for b in dict.fromkeys(args.batch_sizes) if b > 1]
    total = sum(len(ps) * (len(configs) + len(peers)) + min(len(ps), args.split_prompts) * len(configs)
                + sum(-(-len(ps) // b) for b in sizes) * len(configs) for ps in sets.values())
    with tqdm(total=total, desc="bench", unit="run", file=sys.stderr, disable=None) as bar:
        for name, prompts in sets.items():
            for i, p in enumerate(prompts):
                # Every engine on this prompt before the next one: load drifts hit all alike.
                split = sweep.split(name, p) if i < args.split_prompts else ()
                for label in itertools.chain(sweep.ours(name, p), sweep.others(name, p), split):
                    bar.set_postfix_str(f"{name}#{p.index} {label}")
                    bar.update()
            for label in itertools.chain.from_iterable(sweep.batched(name, prompts, b) for b in sizes):
                bar.set_postfix_str(f"{name} {label}")
                bar.update()

    shown = len(notes)
    result = assemble(args, argv, sweep, notes, sets, head_dir, head, started, machine)
    for n in notes[shown:]:
        say(f"warning: {n}")
    out_dir = Path(args.out or Path("runs") / "bench" / started.strftime("%Y%m%d-%H%M%S"))
    paths = report.write(result, out_dir)
    sys.stdout.write(report.markdown(result))
    say("wrote " + ", ".join(str(p) for p in paths.values()))
    if result["compiles"]["timed"]:
        say(f"warning: {result['compiles']['timed']} compilations happened inside timed runs")
    if sweep.mismatches:
        say(f"FAILED: {len(sweep.mismatches)} speculative outputs differ from greedy AR")
        return 1
    return 0


def assemble(args, argv, sweep, notes, sets, head_dir, head, started, machine) -> dict:
    """The results.json document."""
    from jetspec_jax.benchmark import measure, report

    per_set = [report.summarize(r) for r in sweep.runs.values()]
    pooled = report.pooled(per_set)
    for run_ in pooled:
        if run_["label"] in sweep.splits:
            split, rows = sweep.splits[run_["label"]]
            fused_round = sum(r["decode_s"] for r in rows) / max(1, sum(r["rounds"] for r in rows))
            run_["split"] = split.summary(fused_round)
            if not split.ids_match:
                notes.append(f"the instrumented pass of {run_['label']} emitted other ids than the "
                             "fused loop: its restatement of the round has drifted from step.py")
    checked = sum(1 for r in per_set for row in r["prompts"] if row.get("equal_to_ar") is not None)
    batched = [report.summarize(r) for r in sweep.batched_runs.values()]
    by_batch = report.vs_batch_1(per_set + pooled, batched + report.pooled(batched))
    return {
        "meta": {
            "date": started.isoformat(timespec="seconds"),
            "command": "python -m jetspec_jax.bench " + shlex.join(argv),
            "machine": machine, "machine_after": measure.machine(),
            "model": args.model, "draft": head_dir, "max_new_tokens": args.max_new_tokens,
            "num_prompts": args.num_prompts, "budgets": args.budgets, "width": args.width,
            "tree_kind": args.tree_kind, "repeats": args.repeats, "split_prompts": args.split_prompts,
            "batch_sizes": args.batch_sizes,
            "torch_threads": _torch_threads() if sweep.peers else None,
            "head": None if head is None else {k: getattr(head[0], k) for k in (
                "block_size", "num_layers", "causal", "target_layer_ids", "mask_token_id")},
        },
        "notes": notes,
        "prompts": {name: [{"index": p.index, "prompt_tokens": len(p.ids)} for p in ps]
                    for name, ps in sets.items()},
        "runs": per_set,
        "pooled": pooled,
        "speedup": report.speedups(per_set + pooled),
        **({"batched": by_batch} if by_batch else {}),
        "equality": {"checked": checked, "mismatches": sweep.mismatches, "ok": not sweep.mismatches},
        "peer_agreement": sweep.agreement,
        "compiles": {"warmup": sweep.runner.warmup_compiles,
                     "timed": sum(r.get("compiles_timed", 0) for r in per_set + batched),
                     "split_timed": sum(s.compiles for s, _ in sweep.splits.values())},
    }


def _torch_threads():
    import torch

    return torch.get_num_threads()


def main(argv=None) -> int:
    try:
        return run(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

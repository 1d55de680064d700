"""Compare draft heads on the held-out validation split, from the feature cache (no decoding).

    python scripts/val_heads.py --config configs/smollm2-135m-taps5.yaml \
        --head shipped=jetspec_jax/heads/smollm2-135m-causal --head new=runs/heads/smollm2-135m-taps5/head

For every head: depth-1 top-1 accuracy, and tau (tokens per target forward, bonus included) of the
full-depth chain and of best-first trees of 4, 8 and 16 nodes (width 4), measured exactly as a
greedy round would accept on the target's own stored answers (`jetspec_jax/train/validate.py`).
The validation split is the one training never reads (`features.is_validation`). A head must tap
layers the cache holds. Prints a markdown table; --json writes the numbers.

    --lookup L   also trees of the same budgets in which L nodes ('all': N-1) are a prompt-lookup chain (as
                 `--lookup` decodes: the continuation of the earlier text sharing the longest suffix with the prompt and
                 answer up to the anchor; where nothing matches, the head's own tree of N nodes)
    --by-set     one row per prompt set of the split as well (squad and summarize answers quote
                 their passage; MT-Bench-like prose is naturalqs, squad and summarize)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from jetspec_jax.errors import UserError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="training config with a features section")
    p.add_argument("--head", action="append", required=True, metavar="NAME=DIR")
    p.add_argument("--max-sequences", type=int, default=None, help="first K validation sequences")
    p.add_argument("--lookup", default="0", metavar="L",
                   help="also trees with L prompt-lookup nodes ('all': every node but the root)")
    p.add_argument("--by-set", action="store_true", help="also a row per prompt set")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    from jetspec_jax.tree import parse_lookup

    try:
        args.lookup = parse_lookup(args.lookup)
    except ValueError as e:
        print(f"error: --lookup: {e}", file=sys.stderr)
        return 2
    if args.lookup != "all" and args.lookup >= 4:
        print("error: --lookup must be in [0, 3] (below the smallest budget, 4) or 'all'", file=sys.stderr)
        return 2
    try:
        rows = run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    taus = [f"tau_{n}" for n in (4, 8, 16)] + ([f"tau_{n}_lookup" for n in (4, 8, 16)] if args.lookup else [])
    heads = [f"tau N={k.split('_')[1]}" + (f" +{args.lookup} lookup" if k.endswith("lookup") else "") for k in taus]
    print("| head | set | taps | draft vocab | anchors | acc@1 | tau chain | " + " | ".join(heads) + " |")
    print("|---" * (7 + len(taus)) + "|")
    for r in rows:
        for group, v in r["val"].items():
            print(f"| {r['name']} | {group} | {r['taps']} | {r['vocab']} | {v['anchors']} | {v['acc1']:.3f} "
                  f"| {v['tau_chain']:.3f} | " + " | ".join(f"{v[k]:.3f}" for k in taus) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def run(args) -> list:
    from jetspec_jax.train.validate import coverage, open_validation, scoring_head, validate

    split = open_validation(args.config, args.max_sequences)
    rows = []
    for item in args.head:
        name, _, path = item.partition("=")
        head_cfg, params, vocab, objective = scoring_head(path, split.model.config)
        t0 = time.perf_counter()
        sets = split.sets() if args.by_set else None
        result = validate(params, split.model.params, vocab, objective, split.batches(head_cfg.target_layer_ids),
                          lookup=args.lookup, groups=sets)
        if sets is None:
            result = {"all": result}
        print(f"{name}: {result} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        d2t = None if vocab is None else np.asarray(vocab["d2t"])
        rows.append({"name": name, "path": path, "taps": list(head_cfg.target_layer_ids),
                     "vocab": head_cfg.draft_vocab_size or head_cfg.vocab_size,
                     "vocab_coverage": None if d2t is None else round(coverage(split.data, split.indices, d2t), 4),
                     "val": result})
    return rows


if __name__ == "__main__":
    sys.exit(main())

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
    from jetspec_jax.head import check_head_fits
    from jetspec_jax.loading import load_model
    from jetspec_jax.loading.head_io import load_head_dir
    from jetspec_jax.train.config import read_config
    from jetspec_jax.train.feature_store import FeatureStore
    from jetspec_jax.train.features import CacheSpec, is_validation
    from jetspec_jax.train.objective import ObjectiveConfig
    from jetspec_jax.train.shards import read_sequences
    from jetspec_jax.train.validate import coverage, validate, vocab_tables

    cfg = read_config(args.config)
    if cfg.features is None:
        raise UserError(f"{args.config} has no features section")
    model = load_model(cfg.target)
    data = read_sequences(cfg.data.dir)
    f = cfg.features
    store = FeatureStore.open(f.dir, CacheSpec.of(cfg, model.config.hidden_size), data)
    val = np.array([i for i in store.cached() if is_validation(data.keys[i])], np.int64)
    if args.max_sequences:
        val = val[: args.max_sequences]
    if not len(val):
        raise UserError(f"{f.dir}: no validation sequence is cached yet")
    rows = []
    for item in args.head:
        name, _, path = item.partition("=")
        head_cfg, params = load_head_dir(path)
        check_head_fits(head_cfg, model.config)
        params = dict(params)
        d2t = params.pop("d2t", None)
        vocab = None if d2t is None else vocab_tables(np.asarray(d2t), model.config.vocab_size)
        objective = ObjectiveConfig(target=model.config, head=head_cfg)
        batches = (store.batch(data, val[i : i + 4], cfg.train.max_length, head_cfg.target_layer_ids)
                   for i in range(0, len(val), 4))
        t0 = time.perf_counter()
        sets = [data.keys[i].split("/")[0] for i in val] if args.by_set else None
        result = validate(params, model.params, vocab, objective, batches, lookup=args.lookup, groups=sets)
        if sets is None:
            result = {"all": result}
        print(f"{name}: {result} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        rows.append({"name": name, "path": path, "taps": list(head_cfg.target_layer_ids),
                     "vocab": head_cfg.draft_vocab_size or head_cfg.vocab_size,
                     "vocab_coverage": None if d2t is None else round(coverage(data, val, np.asarray(d2t)), 4),
                     "val": result})
    return rows


if __name__ == "__main__":
    sys.exit(main())

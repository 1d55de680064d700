"""Compare draft heads on the held-out validation split, from the feature cache (no decoding).

    python scripts/val_heads.py --config configs/smollm2-135m-taps5.yaml \
        --head shipped=jetspec_jax/heads/smollm2-135m-causal --head new=runs/heads/smollm2-135m-taps5/head

For every head: depth-1 top-1 accuracy, and tau (tokens per target forward, bonus included) of the
full-depth chain and of best-first trees of 4, 8 and 16 nodes (width 4), measured exactly as a
greedy round would accept on the target's own stored answers (`jetspec_jax/train/validate.py`).
The validation split is the one training never reads (`features.is_validation`). A head must tap
layers the cache holds. Prints a markdown table; --json writes the numbers.
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
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    try:
        rows = run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("| head | taps | draft vocab | anchors | acc@1 | tau chain | tau N=4 | tau N=8 | tau N=16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        v = r["val"]
        print(f"| {r['name']} | {r['taps']} | {r['vocab']} | {v['anchors']} | {v['acc1']:.3f} | {v['tau_chain']:.3f} "
              f"| {v['tau_4']:.3f} | {v['tau_8']:.3f} | {v['tau_16']:.3f} |")
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
        result = validate(params, model.params, vocab, objective, batches)
        print(f"{name}: {result} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        rows.append({"name": name, "path": path, "taps": list(head_cfg.target_layer_ids),
                     "vocab": head_cfg.draft_vocab_size or head_cfg.vocab_size,
                     "vocab_coverage": None if d2t is None else round(coverage(data, val, np.asarray(d2t)), 4),
                     "val": result})
    return rows


if __name__ == "__main__":
    sys.exit(main())

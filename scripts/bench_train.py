"""Training throughput, anchor blocks per second: the target run inside every step (the old path)
against the feature cache with a reduced draft vocabulary, in one run on the same sequences.

    python scripts/bench_train.py --config configs/smollm2-135m-taps5.yaml --steps 4

Old path: the head config of `--old-config` (default: the stage-4 config: one tap, full vocabulary,
32 anchors per sequence), the frozen target forward inside each step. New path: `--config` (taps
read from its feature cache, its draft vocabulary and anchors per sequence). Both train from the
same random init on the same batches of cached training sequences; the first step of each
(compilation) is not timed; the two paths alternate step by step so drifts in machine load hit
both. Prints a markdown table: anchor blocks per second, and scored rows per second (anchor x depth
pairs with a label: a config with `train.block_rows` scores fewer depths per block). When the two
configs differ in `train.batch_size`, each step draws the larger batch and the smaller takes its
first sequences.

    python scripts/bench_train.py --old-config configs/smollm2-135m-stage8.yaml \
        --config configs/smollm2-135m-stage9.yaml --steps 4    # whole blocks vs block_rows 8

`--config` may be given several times: every path runs on the same batches, step by step in turn,
and the table gives each one's time per step relative to the first (`--old-config`), which is how
the ablation (docs/ablation) sets each arm's steps for equal training compute.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", help="a config to time (repeatable; default: "
                   "configs/smollm2-135m-taps5.yaml)")
    p.add_argument("--old-config", default="configs/smollm2-135m-causal-r4.yaml")
    p.add_argument("--steps", type=int, default=4, help="timed steps per path (after one untimed)")
    args = p.parse_args(argv)

    from jetspec_jax.head import init_head_params
    from jetspec_jax.loading import load_model
    from jetspec_jax.train.config import read_config
    from jetspec_jax.train.feature_store import FeatureStore
    from jetspec_jax.train.features import CacheSpec, is_validation
    from jetspec_jax.train.shards import read_sequences
    from jetspec_jax.train.step import init_train_state, train_step
    from jetspec_jax.train.trainer import head_config, step_config
    from jetspec_jax.train.validate import draft_vocabulary, vocab_tables

    new_cfgs = [read_config(c) for c in (args.config or ["configs/smollm2-135m-taps5.yaml"])]
    new_cfg, old_cfg = new_cfgs[0], read_config(args.old_config)
    model = load_model(new_cfg.target)
    data = read_sequences(new_cfg.data.dir)
    f = new_cfg.features
    store = FeatureStore.open(f.dir, CacheSpec.of(new_cfg, model.config.hidden_size), data)
    pool = np.array([i for i in store.cached() if not is_validation(data.keys[i])])
    paths = {}
    for cfg in (old_cfg, *new_cfgs):
        name = f"{Path(cfg.path).stem}: " + ("target in the step" if cfg.features is None else "feature cache")
        head = head_config(cfg.head, model.config)
        step_spec = step_config(cfg, head, model.config)
        vocab = None
        if head.draft_vocab_size:
            vocab = vocab_tables(draft_vocabulary(data, pool, model.config.vocab_size, head.draft_vocab_size),
                                 model.config.vocab_size)
        state = init_train_state(step_spec, init_head_params(head, jax.random.PRNGKey(0)))
        paths[name] = dict(cfg=cfg, head=head, spec=step_spec, vocab=vocab, state=state, seconds=[], anchors=0,
                           rows=0)

    rng = np.random.default_rng(0)
    for step in range(args.steps + 1):
        drawn = rng.choice(pool, size=max(c.train.batch_size for c in (old_cfg, *new_cfgs)), replace=False)
        for name, pth in paths.items():
            t = pth["cfg"].train
            indices = drawn[: t.batch_size]
            batch = store.batch(data, indices, min(t.max_length, f.max_length), pth["head"].target_layer_ids)
            cached = None
            if pth["cfg"].features is not None:
                cached = {"features": batch.features, "topk_ids": batch.topk_ids, "topk_logp": batch.topk_logp}
            t0 = time.perf_counter()
            pth["state"], metrics = train_step(pth["state"], model.params, batch.tokens, batch.lengths,
                                               batch.prompt_lens, cached, pth["vocab"], spec=pth["spec"])
            metrics = jax.device_get(metrics)
            if step:  # step 0 compiles
                pth["seconds"].append(time.perf_counter() - t0)
                pth["anchors"] += int(metrics["depth_rows"][0])
                pth["rows"] += int(metrics["rows"])
            print(f"{name}: step {step} {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    print("| path | head layers | taps | draft vocab | seqs x anchors/seq | block rows | s/step (median) "
          "| x first | anchor blocks/s | scored rows/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    first = None
    for name, pth in paths.items():
        t, spent = pth["cfg"].train, sum(pth["seconds"])
        median = statistics.median(pth["seconds"])
        first = first or median
        print(f"| {name} | {pth['head'].num_layers} | {list(pth['head'].target_layer_ids)} "
              f"| {pth['head'].draft_vocab_size or pth['head'].vocab_size} "
              f"| {t.batch_size} x {t.anchors_per_seq} | {pth['spec'].objective.rows} "
              f"| {median:.2f} | {median / first:.2f} | {pth['anchors'] / spent:.1f} | {pth['rows'] / spent:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

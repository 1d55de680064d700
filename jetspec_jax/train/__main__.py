"""Train a JetSpec draft head on the target's own answers.

    python -m jetspec_jax.train --config configs/NAME.yaml [--stage data|train|all]

The data stage has the target answer the training prompts (resumable); the train stage trains
the draft head on those answers (resumable from its checkpoints) and exports it in HF format.
Bad input prints one `error: ...` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import signal
import sys

from jetspec_jax.errors import UserError

STAGES = ("data", "features", "train", "all")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage dump
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m jetspec_jax.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="training config YAML (see configs/)")
    p.add_argument("--stage", choices=STAGES, default="all",
                   help="data: regenerate responses; features: cache the target's taps (needs a "
                   "features section); train: train the head; all: each in turn (default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from jetspec_jax.loading import load_model
    from jetspec_jax.train.config import read_config
    from jetspec_jax.train.data import chat_prompts, regenerate
    from jetspec_jax.train.trainer import head_config, train

    cfg = read_config(args.config)
    model = load_model(cfg.target)
    head_cfg = head_config(cfg.head, model.config)  # refuse a head that cannot fit before any work
    progress = not args.no_progress
    if args.stage in ("data", "all"):
        d = cfg.data
        prompts = chat_prompts(model.tokenizer, d.prompt_sets, d.limit)
        kept = [p for p in prompts if len(p[1]) <= d.max_prompt_tokens]
        if len(kept) < len(prompts):
            print(f"skipping {len(prompts) - len(kept)} of {len(prompts)} prompts longer than "
                  f"data.max_prompt_tokens={d.max_prompt_tokens}", file=sys.stderr)
        regenerate(model, kept, d.dir, batch_size=d.batch_size,
                   max_new_tokens=d.max_new_tokens, temperature=d.temperature, seed=d.seed,
                   manifest={"target": cfg.target, "prompt_sets": list(d.prompt_sets)}, progress=progress)
    if args.stage in ("features", "all") and cfg.features is not None:
        from jetspec_jax.train.features import CacheSpec, build_feature_cache
        from jetspec_jax.train.shards import read_sequences

        f = cfg.features
        spec = CacheSpec.of(cfg, model.config.hidden_size)
        bad = [i for i in f.taps if not 0 <= i < model.config.num_layers]
        if bad:
            raise UserError(f"features.taps {bad} outside the target's layers 0..{model.config.num_layers - 1}")
        n = build_feature_cache(model, read_sequences(cfg.data.dir), f.dir, spec, shard_size=f.shard_size,
                                batch_size=f.batch_size, limit=f.limit, first_sets=f.first_sets, progress=progress)
        print(f"{n} sequences cached in {f.dir}", file=sys.stderr)
    elif args.stage == "features":
        raise UserError(f"{args.config} has no features section")
    if args.stage in ("train", "all"):
        train(cfg, model=model, progress=progress)
        print(f"head ({head_cfg.num_layers} layers, block {head_cfg.block_size}) saved to "
              f"{cfg.train.output_dir}/head", file=sys.stderr)


def _interruptible() -> None:
    """Ctrl-C and SIGTERM stop the run through KeyboardInterrupt, so finished work is saved. A
    job started in the background by a non-interactive shell inherits SIGINT ignored; undo that."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, stop)


def main(argv=None) -> int:
    try:
        run(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    _interruptible()
    sys.exit(main())

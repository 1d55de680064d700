"""Build the answer n-gram table of a head (jetspec_jax/ngrams.py) from the target's training answers.

    python scripts/build_ngrams.py --data data/smollm2-135m --head jetspec_jax/heads/smollm2-135m-causal

Reads the answers of a training data directory (the `data` stage of `jetspec_jax.train`: the
target's own greedy answers), leaves out the validation split (`features.is_validation`, so that
`scripts/val_heads.py` and `scripts/lookup_rules.py` still measure on answers the table never saw),
and writes `ngrams.safetensors` into the head directory (atomically). Decoding with that head then
fills the prompt-lookup branch of rows whose text has no match from the table.
"""

from __future__ import annotations

import argparse
import sys
import time

from jetspec_jax.errors import UserError

ORDERS = "1,2,3,4,5,6,8,10,12,16"  # 1 to 3: the back-off band (ngrams.LONG)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="data directory of answers (jetspec_jax.train --stage data)")
    p.add_argument("--head", required=True, help="head directory to write ngrams.safetensors into")
    p.add_argument("--orders", default=ORDERS, help=f"context lengths, comma-separated (default {ORDERS})")
    p.add_argument("--min-count", type=int, default=1, help="n-grams seen fewer times are left out (default 1)")
    args = p.parse_args(argv)
    try:
        summary = run(args)
    except (UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary)
    return 0


def table_from_data(data_dir, orders, min_count: int):
    """The table of the training answers in `data_dir` -> (table dict, one-line summary)."""
    from jetspec_jax.ngrams import build_table
    from jetspec_jax.train.features import is_validation
    from jetspec_jax.train.shards import read_sequences

    if not orders or min(orders) < 1 or max(orders) > 64:
        raise UserError("--orders must lie in 1..64")
    if min_count < 1:
        raise UserError("--min-count must be >= 1")
    data = read_sequences(data_dir)
    train = [i for i, key in enumerate(data.keys) if not is_validation(key)]
    if not train:
        raise UserError(f"{data_dir}: no training answers")
    start = time.perf_counter()
    table = build_table([(data.tokens[i], data.prompt_lens[i]) for i in train], orders, min_count)
    if not len(table["keys"]):
        raise UserError("no n-gram is seen often enough (lower --min-count)")
    tokens = sum(len(data.tokens[i]) - int(data.prompt_lens[i]) for i in train)
    return table, (f"{len(table['keys'])} n-grams of orders {sorted(orders)} from {len(train)} answers "
                   f"({tokens} tokens; validation split left out) in {time.perf_counter() - start:.1f} s")


def parse_orders(text: str) -> list:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--orders must be comma-separated integers, got {text!r}") from None


def run(args) -> str:
    from jetspec_jax.loading.head_io import load_head_dir, save_ngrams

    cfg, _ = load_head_dir(args.head)
    table, summary = table_from_data(args.data, parse_orders(args.orders), args.min_count)
    save_ngrams(args.head, table, cfg.vocab_size)
    return f"{args.head}: {summary}"


if __name__ == "__main__":
    sys.exit(main())

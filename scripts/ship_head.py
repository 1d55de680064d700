"""Ship a trained head in the package: weights stored in bfloat16, with its answer n-gram table.

    python scripts/ship_head.py --head runs/heads/smollm2-135m-stage12/head --data data/smollm2-135m \
        --to jetspec_jax/heads/smollm2-135m-causal

Stores the head's weights in bfloat16, as published DFlash / JetSpec heads are: half the file, and
on the validation split the rounded SmolLM2 head drafts exactly as the float32 one (tau of every tree
equal to 3 decimals, 16665 anchors; docs/training.md section 13); decoding computes in float32 either
way. Then builds the answer n-gram table of the training answers in --data (`build_ngrams.py`,
validation split left out) and writes both into --to in one atomic replacement.
"""

from __future__ import annotations

import argparse
import sys

from build_ngrams import ORDERS, parse_orders, table_from_data

from jetspec_jax.errors import UserError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--head", required=True, help="trained head directory (jetspec_jax.train output)")
    p.add_argument("--data", required=True, help="the training data directory of its answers")
    p.add_argument("--to", required=True, help="head directory to write (replaced atomically)")
    p.add_argument("--orders", default=ORDERS, help=f"n-gram context lengths (default {ORDERS})")
    p.add_argument("--min-count", type=int, default=1)
    args = p.parse_args(argv)
    try:
        from jetspec_jax.loading.head_io import load_head_dir, save_head_dir
        from jetspec_jax.ngrams import without_ngrams

        cfg, params = without_ngrams(*load_head_dir(args.head, dtype="bfloat16"))
        table, summary = table_from_data(args.data, parse_orders(args.orders), args.min_count)
        params = {**params, "ngram_keys": table["keys"], "ngram_next": table["next"]}
        save_head_dir(args.to, cfg.replace(ngram_orders=tuple(table["orders"].tolist())), params, overwrite=True)
    except (UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.to}: bfloat16 weights; {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a regenerated data directory holds, per prompt set (the figures docs/training.md quotes).

    python scripts/data_stats.py data/smollm2-135m

Per set: answers stored, response tokens, mean answer length, and the share of answers that hit
max_new_tokens instead of ending on end-of-turn.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from jetspec_jax.errors import UserError
from jetspec_jax.train.shards import read_manifest, read_sequences


def stats(directory) -> list[dict]:
    """One row per prompt set and a total row."""
    data = read_sequences(directory)
    sets = np.array([k.rsplit("/", 1)[0] for k in data.keys])
    response = np.array([len(t) - p for t, p in zip(data.tokens, data.prompt_lens)])
    rows = []
    for name in [*dict.fromkeys(sets.tolist()), "total"]:
        pick = np.ones(len(sets), bool) if name == "total" else sets == name
        n = int(pick.sum())
        rows.append({"set": name, "answers": n, "response_tokens": int(response[pick].sum()),
                     "mean_length": float(response[pick].mean()) if n else 0.0,
                     "hit_limit": float((~data.stopped[pick]).mean()) if n else 0.0})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir")
    args = p.parse_args(argv)
    try:
        manifest = read_manifest(args.data_dir)
        rows = stats(args.data_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.data_dir}: target {manifest.get('target')}, max_new_tokens {manifest.get('max_new_tokens')}, "
          f"temperature {manifest.get('temperature')}")
    print("| set | answers | response tokens | mean length | hit the limit |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['set']} | {r['answers']} | {r['response_tokens']:,} | {r['mean_length']:.0f} | "
              f"{r['hit_limit']:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

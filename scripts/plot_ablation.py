"""Draw the ablation's validation figures (docs/ablation) from `scripts/val_heads.py --json` files.

    python scripts/plot_ablation.py --group "from scratch"=runs/ablation/val-scratch.json \
        --group "from the shipped head"=runs/ablation/val-layers.json --out docs/ablation/ablation.png

One panel per group (the heads of a group were measured on the same anchors, in one val_heads run;
groups are not comparable with each other): for every head, depth-1 accuracy and tau (tokens per
target forward) of the chain and of trees of 4, 8 and 16 nodes, as grouped bars.
"""

from __future__ import annotations

import argparse
import json
import sys

MEASURES = (("acc1", "acc@1"), ("tau_chain", "tau chain"), ("tau_4", "tau N=4"), ("tau_8", "tau N=8"),
            ("tau_16", "tau N=16"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--group", action="append", required=True, metavar="TITLE=JSON")
    p.add_argument("--out", required=True, help="the PNG to write")
    args = p.parse_args(argv)
    groups = []
    for item in args.group:
        title, sep, path = item.partition("=")
        if not sep:
            print(f"error: --group {item!r}: expected TITLE=JSON", file=sys.stderr)
            return 2
        try:
            with open(path, encoding="utf-8") as f:
                rows = json.load(f)
            groups.append((title, [(r["name"], r["val"]["all"]) for r in rows]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"error: {path}: not a val_heads.py --json file ({e})", file=sys.stderr)
            return 2

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.2), squeeze=False)
    for ax, (title, heads) in zip(axes[0], groups):
        width = 0.8 / len(heads)
        for i, (name, val) in enumerate(heads):
            xs = [j + (i - (len(heads) - 1) / 2) * width for j in range(len(MEASURES))]
            bars = ax.bar(xs, [val[key] for key, _ in MEASURES], width, label=name)
            ax.bar_label(bars, fmt="%.2f", fontsize=6, rotation=90, padding=2)
        ax.set_xticks(range(len(MEASURES)), [label for _, label in MEASURES])
        ax.set_title(title)
        ax.set_ylim(0, 1.15 * max(val[key] for _, val in heads for key, _ in MEASURES))
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

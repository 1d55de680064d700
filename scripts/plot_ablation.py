"""Draw the ablation's validation figures (docs/ablation) from `scripts/val_heads.py --json` files.

    python scripts/plot_ablation.py --group "from scratch"=runs/ablation/val-scratch.json \
        --group "from the shipped head"=runs/ablation/val-layers.json --out docs/ablation/ablation.png

One panel per group (the heads of a group were measured on the same anchors, in one val_heads run;
groups are not comparable with each other). The group's first head is its reference: for every other
head, the change against it of depth-1 accuracy and of tau (tokens per target forward) of the chain
and of trees of 4, 8 and 16 nodes, as grouped bars labelled with the change; the reference's own
values are under each measure.
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

    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 3.8 * len(groups)), squeeze=False)
    for ax, (title, heads) in zip(axes[:, 0], groups):
        (ref_name, ref), others = heads[0], heads[1:]
        width = 0.8 / max(len(others), 1)
        for i, (name, val) in enumerate(others):
            xs = [j + (i - (len(others) - 1) / 2) * width for j in range(len(MEASURES))]
            bars = ax.bar(xs, [val[key] - ref[key] for key, _ in MEASURES], width, label=name)
            ax.bar_label(bars, fmt="%+.3f", fontsize=6, padding=2)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(MEASURES)), [f"{label}\n({ref_name}: {ref[key]:.3f})" for key, label in MEASURES],
                      fontsize=8)
        ax.set_ylabel(f"change against {ref_name}")
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.15)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# The head ablation of docs/ablation (issue 15, item 6), end to end: train every arm (each resumes
# where it stopped), measure each group on the validation split, draw the figure.
#
#   bash scripts/ablation.sh            # ~2 h on the 2-core development machine, idle
#
# Needs the feature cache of configs/smollm2-135m-stage11.yaml (docs/training.md, stage 2e and its
# extensions) and the shipped head (the layers arms start from it). The arms' steps are committed in
# their configs; they came from the cost per step measured by
#   python scripts/bench_train.py --old-config configs/ablation/scratch-taps5.yaml \
#       --config configs/ablation/scratch-k4096.yaml --config configs/ablation/scratch-kfull.yaml --steps 3
#   python scripts/bench_train.py --old-config configs/ablation/layers1.yaml \
#       --config configs/ablation/layers2.yaml --config configs/ablation/layers3.yaml --steps 3
# (docs/ablation/probe-*.md): steps = 120 / (time per step relative to the group's first arm).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=runs/ablation  # the arms' output_dir (their configs)
mkdir -p "$OUT"

for arm in scratch-taps5 scratch-taps1 scratch-taps3 scratch-k4096 scratch-kfull layers1 layers2 layers3; do
  echo "== $arm $(date -u +%H:%M:%S)" >&2
  "$PY" -m jetspec_jax.train --config "configs/ablation/$arm.yaml" --stage train --no-progress
done

"$PY" scripts/val_heads.py --config configs/ablation/scratch-taps5.yaml \
  --head taps5-k8192=runs/ablation/scratch-taps5/head --head taps1=runs/ablation/scratch-taps1/head \
  --head taps3=runs/ablation/scratch-taps3/head --head k4096=runs/ablation/scratch-k4096/head \
  --head kfull=runs/ablation/scratch-kfull/head --json "$OUT/val-scratch.json"
"$PY" scripts/val_heads.py --config configs/ablation/layers1.yaml --by-set \
  --head shipped=jetspec_jax/heads/smollm2-135m-causal --head layers1=runs/ablation/layers1/head \
  --head layers2=runs/ablation/layers2/head --head layers3=runs/ablation/layers3/head \
  --json "$OUT/val-layers.json"
"$PY" scripts/plot_ablation.py \
  --group "from scratch, 1 layer, equal training time: taps and draft vocabulary=$OUT/val-scratch.json" \
  --group "from the shipped head, equal training time: head layers=$OUT/val-layers.json" --out "$OUT/ablation.png"

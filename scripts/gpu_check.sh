#!/usr/bin/env bash
# One call on a lent GPU machine (see DESIGN.md section 7), from the repository root:
#   scripts/gpu_check.sh            # results under ${OUT:-./out}
# 1. the tree-attention kernel tests compiled with Triton (pytest -m gpu);
# 2. the tree-attention timing sweep (scripts/bench_tree_attention.py).
# Each step has its own time limit (4 + 3 minutes at worst, about 3 expected); both always run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# The machine starts bare and offline: instead of installing, expose this checkout as
# `jetspec_jax` with `kernels/` mapped to `jetspec_jax.kernels` (the pyproject package-dir layout).
if ! "$PY" -c "import jetspec_jax.kernels" 2>/dev/null; then
  SHIM="$(mktemp -d)"
  mkdir "$SHIM/jetspec_jax"
  ln -s "$PWD"/jetspec_jax/* "$SHIM/jetspec_jax/"
  ln -s "$PWD/kernels" "$SHIM/jetspec_jax/kernels"
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/gpu_env.txt" 2>&1
# Without a GPU backend every gpu test would be skipped and the run would look green: stop instead.
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices()); assert jax.default_backend() == 'gpu'" \
  2>&1 | tee -a "$OUT/gpu_env.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu_check: JAX sees no GPU" >&2; exit 1; }

timeout 240 "$PY" -m pytest -m gpu tests/test_tree_attention.py -q -rs --durations=5 -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.txt"
tests_rc=${PIPESTATUS[0]}

timeout 180 "$PY" scripts/bench_tree_attention.py --out "$OUT" --deadline-s 120 2>&1 | tee "$OUT/bench_tree_attention.log"
bench_rc=${PIPESTATUS[0]}

# TODO(full-model timing): the verification-step sweep at Qwen3-8B shapes (issue owner) goes here,
# with its own `timeout` so the whole call stays under ~8 minutes.

echo "gpu_check: tests rc=$tests_rc, bench rc=$bench_rc; results in $OUT"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]

#!/usr/bin/env bash
# One call on a lent GPU machine (see DESIGN.md section 7), from the repository root:
#   scripts/gpu_check.sh            # results under ${OUT:-./out}
# 1. the tree-attention kernel tests compiled with Triton (pytest -m gpu);
# 2. the tree-attention timing sweep (scripts/bench_tree_attention.py);
# 3. one verification forward vs one AR step at Qwen3-8B shape (scripts/bench_verify.py).
# Each step has its own time limit (150 + 120 + 180 s = 7.5 minutes at worst); all three always run.
# What each output file holds, and how to call this on the device tool: docs/gpu.md.
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

timeout 150 "$PY" -m pytest -m gpu tests/test_tree_attention.py -q -rs --durations=5 -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.txt"
tests_rc=${PIPESTATUS[0]}

timeout 120 "$PY" scripts/bench_tree_attention.py --out "$OUT" --deadline-s 90 2>&1 | tee "$OUT/bench_tree_attention.log"
bench_rc=${PIPESTATUS[0]}

# Whole model: each (N, attention impl) compiles the 36-layer forward once, so compiles dominate;
# the script starts no case it expects to end past --deadline-s and rewrites its results after
# every case, so the hard `timeout` (30 s later) still leaves what was measured.
timeout 180 "$PY" scripts/bench_verify.py --out "$OUT" --deadline-s 150 2>&1 | tee "$OUT/bench_verify.log"
verify_rc=${PIPESTATUS[0]}

echo "gpu_check: tests rc=$tests_rc, attention bench rc=$bench_rc, verify bench rc=$verify_rc; results in $OUT"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$verify_rc" -eq 0 ]

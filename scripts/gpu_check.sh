#!/usr/bin/env bash
# One call on a lent GPU machine (see DESIGN.md section 7), from the repository root:
#   scripts/gpu_check.sh            # results under ${OUT:-./out}
# 1. the tree-attention kernel tests compiled with Triton (pytest -m gpu);
# 2. the tree-attention timing sweep (scripts/bench_tree_attention.py);
# 3. one verification forward vs one AR step at Qwen3-8B shape (scripts/bench_verify.py);
# 4. the whole decoding loop at Qwen3-8B shape with the published head layout, N = 1, 64, 256, 16
#    (scripts/bench_loop.py).
# Each step has its own time limit (120 + 90 + 120 + 140 s = 7.8 minutes at worst); all four always
# run. Every step's output goes to one log, gpu_check.log, so that the check writes 8 files.
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

LOG="$OUT/gpu_check.log"
: >"$LOG"
step() { echo "=== $*" >>"$LOG"; }

step "kernel tests: pytest -m gpu tests/test_tree_attention.py"
timeout 120 "$PY" -m pytest -m gpu tests/test_tree_attention.py -q -rs --durations=5 -p no:cacheprovider 2>&1 | tee -a "$LOG"
tests_rc=${PIPESTATUS[0]}

step "kernel timing: scripts/bench_tree_attention.py"
timeout 90 "$PY" scripts/bench_tree_attention.py --out "$OUT" --deadline-s 65 2>&1 | tee -a "$LOG"
bench_rc=${PIPESTATUS[0]}

# Whole model: each case compiles the 36-layer program once, so compiles dominate; the scripts
# start no case they expect to end past --deadline-s and rewrite their results after every case,
# so the hard `timeout` (25-30 s later) still leaves what was measured.
step "model timing: scripts/bench_verify.py"
timeout 120 "$PY" scripts/bench_verify.py --out "$OUT" --deadline-s 95 2>&1 | tee -a "$LOG"
verify_rc=${PIPESTATUS[0]}

step "decoding loop: scripts/bench_loop.py"
timeout 140 "$PY" scripts/bench_loop.py --out "$OUT" --deadline-s 110 2>&1 | tee -a "$LOG"
loop_rc=${PIPESTATUS[0]}

echo "gpu_check: tests rc=$tests_rc, attention bench rc=$bench_rc, verify bench rc=$verify_rc, loop bench rc=$loop_rc; results in $OUT" | tee -a "$LOG"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$verify_rc" -eq 0 ] && [ "$loop_rc" -eq 0 ]

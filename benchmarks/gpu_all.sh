#!/usr/bin/env bash
# Every GPU row of benchmarks/README.md, in one go (~10 minutes on an H100/H200).
# Writes JSON (and a log) under $OUT (default: benchmarks/results/gpu).
# Run from the repository root:  bash benchmarks/gpu_all.sh
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
cd benchmarks
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import jax, optax, flax; print('jax', jax.__version__, jax.devices(), 'optax', optax.__version__, 'flax', flax.__version__)"
  # Each step has its own time limit so that one slow step cannot eat the rest.
  timeout 240 $PY bench_update.py --full --steps 50 --repeats 10 --warm-train 0 --json "$OUT/bench_update.json"
  # Warm states (needs scikit-learn): the update at states real training reaches.
  timeout 120 $PY bench_update.py --models --steps 50 --repeats 10 --json "$OUT/bench_update_warm.json"
  timeout 60  $PY bench_rotation.py --full --steps 50 --repeats 10 --json "$OUT/bench_rotation.json"
  timeout 120 $PY bench_train_step.py --full --steps 20 --repeats 10 --json "$OUT/bench_train_step.json"
  timeout 60  $PY bench_sum_forms.py --full --steps 50 --repeats 10 --json "$OUT/bench_sum_forms.json"
  timeout 90  $PY bench_torch.py --full --steps 50 --repeats 10 --json "$OUT/bench_torch.json"
} 2>&1 | tee "$OUT/gpu_all.log"

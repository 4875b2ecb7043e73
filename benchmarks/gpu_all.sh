#!/usr/bin/env bash
# Every GPU row of benchmarks/README.md, in one go (~15 minutes on an H100/H200:
# more than one lent session holds; name the steps to split it across sessions),
# or only the steps named:  bash benchmarks/gpu_all.sh [update_resnet50
# update_gpt2_small graphs profile warm warm_wide train sums rotation torch cond]
# Writes JSON (and a log) under $OUT (default: benchmarks/results/gpu); the lent
# device returns at most 8 files a call (the cond step writes two JSON files).
# Run from the repository root.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
STEPS=${*:-update_resnet50 update_gpt2_small graphs profile warm warm_wide train sums rotation torch cond}
cd benchmarks
# Each step has its own time limit so that one slow step cannot eat the rest.
step() {  # step NAME SECONDS SCRIPT ARGS...
  local name=$1 limit=$2
  shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  echo "== $name (limit ${limit}s, $(date +%T))"
  timeout "$limit" $PY "$@" || echo "== $name: exit $? (124: time limit)"
}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import jax, optax, flax; print('jax', jax.__version__, jax.devices(), 'optax', optax.__version__, 'flax', flax.__version__)"
  step cond 90 bench_cond_sync.py --json "$OUT/bench_cond_sync.json"
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" \
    step cond 90 bench_cond_sync.py --json "$OUT/bench_cond_sync_no_graphs.json"
  for model in resnet50 gpt2_small; do
    step "update_$model" 240 bench_update.py --full --models $model --steps 50 --repeats 10 --warm-train 0 --json "$OUT/bench_update_$model.json"
  done
  # The loop around the careful branch with CUDA graphs that hold loops and
  # conditionals on the device (no host read of the predicate, if XLA does so).
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL" \
    step graphs 150 bench_update.py --full --models resnet50 --steps 50 --repeats 10 --warm-train 0 --only lx.layca_sgd 'lx.layca_sgd (ablation: no switch)' 'floor: two-pass closed form' --json "$OUT/bench_update_resnet50_graphs.json"
  # Kernels that ran per step, and the wall time of back-to-back calls.
  step profile 240 profile_update.py --full --steps 10 --json "$OUT/profile_update.json"
  # Warm states (needs scikit-learn): the update at states real training reaches.
  step warm 120 bench_update.py --models --steps 50 --repeats 10 --json "$OUT/bench_update_warm.json"
  # A 1024-wide MLP: sparse units the sample misses, the refined branch.
  step warm_wide 90 bench_update.py --models --steps 50 --repeats 10 --warm-width 1024 --warm-optimizers 'lx.layca_sgd(momentum=0.9)' --warm-units neuron --json "$OUT/bench_update_warm1024.json"
  step train 120 bench_train_step.py --full --steps 20 --repeats 10 --json "$OUT/bench_train_step.json"
  step sums 60 bench_sum_forms.py --full --steps 50 --repeats 10 --json "$OUT/bench_sum_forms.json"
  step rotation 120 bench_rotation.py --full --steps 50 --repeats 10 --json "$OUT/bench_rotation.json"
  step torch 150 bench_torch.py --full --steps 50 --repeats 10 --json "$OUT/bench_torch.json"
} 2>&1 | tee -a "$OUT/gpu_all.log"

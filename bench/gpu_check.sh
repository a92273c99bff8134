#!/usr/bin/env bash
# The CUDA checks, for a machine with a GPU; about 5 minutes on one H200, bounded at 8 by timeouts.
#
#     bash bench/gpu_check.sh [OUT_DIR]      # OUT_DIR (default: gpu-check/) gets every step's log
#
# 1. bench/gpu_check.py: every Gramian aggregator's layer-wise engine against the plain passes on
#    CUDA (float64), one epoch of every method (float32), and AMP bfloat16 / float16 with the scaler;
# 2. bench/balancers.py on CUDA: the balancer step table with the allocator's peak memory;
# 3. a sweep with --gpus-per-trial 0.25: four trials sharing the GPU.
# Exit status: the number of steps that failed. Record what it prints in docs/benchmarks.md.
set -u
cd "$(dirname "$0")/.."
out=${1:-gpu-check}
mkdir -p "$out"
py=${PYTHON:-python}
export RAY_USAGE_STATS_ENABLED=0 WANDB_MODE=offline
failed=0

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log it, count a failure
    local name=$1 seconds=$2
    shift 2
    echo "== $name (at most ${seconds} s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee "$out/$name.log"
    local status=${PIPESTATUS[0]}
    echo "== $name: exit $status after $((SECONDS - start)) s"
    [ "$status" -eq 0 ] || failed=$((failed + 1))
}

"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run this on a machine with a GPU')" || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null

step checks 180 "$py" bench/gpu_check.py --device cuda
step balancers 150 "$py" bench/balancers.py --device cuda --memory --rounds 5
step sweep 150 "$py" run_sweep.py --method amtl --samples 4 --seeds 1 --epochs 2 --n-train 512 --n-val 128 \
    --n-test 128 --gpus-per-trial 0.25 --cpus-per-trial 1 --max-concurrent 4 --no-wandb \
    --storage "$PWD/$out/sweeps" --name gpu-shared
echo "gpu_check: $failed step(s) failed"
exit "$failed"

#!/usr/bin/env bash
# The CUDA checks and GPU timings of mitoseg, in one run on a machine with one GPU:
#
#     bash benchmarks/gpu_checks.sh OUT_DIR
#
# from the repository root, with mitoseg importable (`pip install -e .`, or PYTHONPATH).
# Each check's output goes to OUT_DIR/gpu_checks.log; the runs' summaries and the
# benchmarks' JSON beside it. A failing check is reported and the next one runs.
# ONLY="name name ..." runs just those checks (names as in the log).
#   1. AMP training: the Quick start job (sample_daw, 1000 iterations) and daw_ddfp on the sample
#      data (flow from iteration 100), uninterrupted and as --max-iters + --resume.
#   2. predict (AMP, Gaussian blending) + evaluate of the validation volume on CUDA.
#   3. torchrun with NCCL when the machine has two GPUs or more (skipped with one).
#   4. DeepLabV3+ ResNet-101 seconds per training step, every method (bench_deeplab.py).
#   5. The DAW update and the DDFP mixture log-density on the GPU; the DDFP step cost.
set -u
OUT=${1:?usage: bash benchmarks/gpu_checks.sh OUT_DIR}
mkdir -p "$OUT"
LOG="$OUT/gpu_checks.log"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
RUNS=$(mktemp -d)
failures=0

check() {  # check NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2; shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
    echo "== $name: $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
    [ $rc -eq 0 ] || failures=$((failures + 1))
    return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
$PY -c "import torch, monai; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'monai', monai.__version__)" \
    | tee -a "$LOG"

check train_sample_daw 240 $PY -m mitoseg train --config sample_daw --set device=cuda \
    --set data.num_workers=4 --out "$RUNS/sample_daw" --no-progress
cp "$RUNS/sample_daw/summary.json" "$OUT/train_sample_daw_summary.json" 2>/dev/null

SAMPLE=(--config sample_daw_ddfp --set device=cuda --set data.num_workers=4
        --set train.iterations=300 --set method.ddfp.start_iter=100 --set method.ddfp.chunk_pixels=65536)
check train_amp 240 $PY -m mitoseg train "${SAMPLE[@]}" --out "$RUNS/full" --no-progress
cp "$RUNS/full/summary.json" "$OUT/train_amp_summary.json" 2>/dev/null
check train_amp_first_half 180 $PY -m mitoseg train "${SAMPLE[@]}" --out "$RUNS/resumed" --max-iters 150 --no-progress
check train_amp_resume 180 $PY -m mitoseg train --out "$RUNS/resumed" --resume --no-progress
cp "$RUNS/resumed/summary.json" "$OUT/train_amp_resumed_summary.json" 2>/dev/null

check predict_cuda 120 $PY -m mitoseg predict --checkpoint "$RUNS/full/best.pt" --input sample_data/val_image.tif \
    --output "$RUNS/pred.tif" --probabilities "$RUNS/prob.tif" --device cuda
check evaluate 60 $PY -m mitoseg evaluate --prediction "$RUNS/pred.tif" --label sample_data/val_label.tif \
    --json "$OUT/evaluate.json"

GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" torchrun_nccl "* ]]; then
    :
elif [ "$GPUS" -ge 2 ]; then
    check torchrun_nccl 240 $PY -m torch.distributed.run --standalone --nproc_per_node=2 -m mitoseg train \
        "${SAMPLE[@]}" --set train.iterations=60 --out "$RUNS/ddp" --no-progress
    cp "$RUNS/ddp/summary.json" "$OUT/torchrun_nccl_summary.json" 2>/dev/null
else
    echo "== torchrun_nccl: skipped, $GPUS GPU (NCCL refuses two ranks on one GPU)" | tee -a "$LOG"
fi

check bench_deeplab_321 300 $PY benchmarks/bench_deeplab.py --device cuda --crop 321 --batch 2 --steps 10 \
    --methods supervised unimatch daw ddfp daw_ddfp --sync-debug --json "$OUT/deeplab_321.json"
check bench_deeplab_513 240 $PY benchmarks/bench_deeplab.py --device cuda --crop 513 --batch 4 --steps 10 \
    --methods daw daw_ddfp --json "$OUT/deeplab_513.json"
check bench_daw_update 120 $PY benchmarks/bench_daw.py update --device cuda --repeat 20
check bench_ddfp_mixture 120 $PY benchmarks/bench_ddfp.py mixture --device cuda --repeat 20
check bench_ddfp_step 240 $PY benchmarks/bench_ddfp.py step --iters 20 --config configs/lucchi_daw_ddfp.yaml \
    --set device=cuda --set data.num_workers=4 --set data.train.image=sample_data/train_image.tif \
    --set data.train.label=sample_data/train_label.tif --set 'data.train.slices=[2, 12, 21]' \
    --set data.val.image=sample_data/val_image.tif --set data.val.label=sample_data/val_label.tif \
    --set method.ddfp.chunk_pixels=65536 --profile

echo "== $failures check(s) failed" | tee -a "$LOG"
rm -rf "$RUNS"
exit $((failures > 0))

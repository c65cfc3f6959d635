#!/usr/bin/env bash
# The Lucchi accuracy benchmark on a GPU machine, in one go: many runs at once on the one GPU (a U-Net
# uses a small part of an H100 / H200), one CPU thread each for its data, results and curves under $OUT.
#
#   OUT=/path/to/results bash benchmarks/lucchi_gpu.sh            # the full plan
#   TINY=1 OUT=/tmp/gpu_try bash benchmarks/lucchi_gpu.sh         # a few iterations: try it on a CPU first
#
# Needs ../shared/data/lucchi-subset (or SUBSET=...). Every run writes its folder, so a second call
# continues where the first stopped (finished runs are read back, interrupted ones resume).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:?set OUT to the results folder}
SUBSET=${SUBSET:-../shared/data/lucchi-subset}
JOBS=${JOBS:-$(( $(nproc) > 2 ? $(nproc) - 1 : 1 ))}
extra=()
[[ "${TINY:-0}" == 1 ]] && extra+=(--tiny) && JOBS=2
mkdir -p "$OUT"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/device.txt"
bench() { python benchmarks/lucchi_label_efficiency.py --subset "$SUBSET" --jobs "$JOBS" --threads 1 --out "$OUT" "${extra[@]}" "$@"; }
# 1. every method at convergence, three seeds
bench --recipe gpu --methods supervised fixmatch unimatch daw ddfp daw_ddfp oracle --seeds 0 1 2 2>&1 | tee "$OUT/methods.log"
# 2. the recipe's ablation on the all-labeled model and on 3 labeled slices
bench --recipe gpu --ablation --methods oracle supervised --seeds 0 1 2>&1 | tee "$OUT/ablation.log"

#!/usr/bin/env bash
# Train the GPU reference models on one CUDA machine; weights, summaries and logs go to DIR
# (default ./trained). `ainode train MODEL` runs the same code one model at a time; this script
# is what was run on the lent H100 (docs/models/ct-segmentation.md, nodule-classification.md).
# The segmentation schedule follows the clock, so the run is not bit-reproducible: the number of
# steps and of phantoms generated depends on the machine (both are in the summary JSON).
#   scripts/train_on_gpu.sh [DIR] [SEGMENTATION_MINUTES]
set -euo pipefail
out=${1:-trained}
minutes=${2:-7.5}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
workers=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))

python3 -c "
import json, logging
from pathlib import Path
logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
from workers.training import segmentation
print(json.dumps(segmentation.train(out=Path('$out') / 'ct_segmentation.pt', minutes=$minutes, workers=$workers)))
" 2>&1 | tee "$out/segmentation.log"

python3 -c "
from pathlib import Path
from workers.training import classification
classification.train(out=Path('$out') / 'nodule_classification.pt', workers=$workers)
" 2>&1 | tee "$out/classification.log"

#!/usr/bin/env bash
# Time to result on the lent GPU machine, end to end: the node on its embedded broker and warm
# worker, the built-in test PACS, a 300 × 512² phantom CT pushed by pynetdicom
# (bench/time_to_result_portable.py). Run from the repo root, there, with .whl carried:
#   here:  bench/gpu_wheels.sh                      (once; ~42 MiB of wheels into .whl/, git-ignored)
#   there: run(command="bash bench/gpu_run.sh", carry=[".whl"], timeout_s=600)
# The JSON lands in $OUT (there) or bench/results/ (anywhere else). SLICES, SIZE, REPEATS, PYTHON override.
#
# No venv and no `pip install torch==2.13.0` there: the machine reaches no package index, a CUDA
# torch wheel is far over the 64 MiB that can be carried, and its python3 (/opt/torch/.venv, 3.12)
# already holds a CUDA torch (2.11 when last seen), which a venv made from it would not see. So the
# project's other requirements are installed from the carried wheels into /tmp/site and the
# repository runs from its tree (PYTHONPATH); the JSON records the torch and CUDA actually used.
set -euo pipefail
slices=${SLICES:-300} size=${SIZE:-512} repeats=${REPEATS:-3} py=${PYTHON:-python3}
out=${OUT:-bench/results}
name="time-to-result-portable-$(date -u +%F)-${slices}x${size}.json"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PWD:/tmp/site"
else
  echo "no .whl/: using this python3 as it is (run bench/gpu_wheels.sh first when it lacks the requirements)" >&2
  export PYTHONPATH="$PWD"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
mkdir -p "$out"
status=0
"$py" bench/time_to_result_portable.py --slices "$slices" --size "$size" --repeats "$repeats" \
  --out "$out/$name" 2>&1 | tee "$out/time-to-result-portable.log" || status=$?
if [ "$status" -ne 0 ]; then  # the work folder is kept: bring the node's log back
  for log in /tmp/ainode-ttr-portable-*/node.log; do [ -f "$log" ] && cp "$log" "$out/node.log"; done
fi
exit "$status"

#!/usr/bin/env bash
# Run HERE (a machine that reaches the package index), from the repo root, before a device run:
# downloads into .whl/ (git-ignored, carried to the GPU machine) the wheels of ainode's
# requirements that the GPU machine's own Python (3.12, torch and the scientific stack
# preinstalled, no network) lacks. The list is the project's requirements closure minus the
# packages /work/.library/device/KINDS.md lists there; torch is not among them: the device's own
# torch is used (a CUDA torch wheel is far over the 64 MiB carry limit). About 35 MiB.
#   bench/gpu_wheels.sh [PYTHON]
set -uo pipefail
py=${1:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p .whl
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
failed=()
get() {
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$1" 2>/dev/null
}
# Pinned to the versions the CI venv runs; a pin with no wheel for the device falls back to the newest.
for pin in alembic==1.20.1 amqp==5.4.2 annotated-types==0.8.0 billiard==4.3.2 celery==5.7.0 \
    click-didyoumean==0.3.1 click-plugins==1.1.1.2 click-repl==0.4.1 dicomweb-client==0.61.2 fastapi==0.165.0 \
    fhir-core==1.1.12 fhir.resources==8.3.0 highdicom==0.28.2 hl7apy==1.3.5 kombu==5.7.0 mako==1.4.3 \
    monai==1.6.1 opentelemetry-api==1.45.3 prompt-toolkit==3.0.53 psycopg==3.3.9 pydantic==2.14.4 \
    pydantic-core==2.50.5 pydicom==3.0.2 pyjpegls==1.5.1 pylibjpeg==2.1.0 pylibjpeg-libjpeg==2.5.0 \
    pylibjpeg-openjpeg==2.6.0 pylibjpeg-rle==2.2.0 pynetdicom==3.0.4 python-gdcm==3.2.6 redis==8.2.0 \
    retrying==1.4.2 sqlalchemy==2.1.9 starlette==1.10.0 typing-inspection==0.4.5 tzlocal==5.4.5 \
    uvicorn==0.55.0 vine==5.1.0 wcwidth==0.9.4 wsproto==1.2.0; do
  get "$pin" || get "${pin%%==*}" || failed+=("$pin")
done
du -sh .whl
if [ ${#failed[@]} -gt 0 ]; then echo "no wheel for: ${failed[*]}" >&2; exit 1; fi

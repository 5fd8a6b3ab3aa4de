#!/usr/bin/env bash
# Installs ainode into ./.venv; with --test also the DICOM tools and services the tests talk to.
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
WITH_TEST=0
[ "${1:-}" = "--test" ] && WITH_TEST=1

need_apt=()
want=(dcmtk)                       # storescu/echoscu: `ainode demo` works without them, tests need them
[ $WITH_TEST = 1 ] && want+=(dicom3tools orthanc orthanc-dicomweb pixelmed-apps redis-server chromium chromium-driver)  # chromium: dashboard tests
for pkg in "${want[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "installing system packages: ${need_apt[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need_apt[@]}"
  # The Debian orthanc package starts a system service on 4242/8042; the tests run their own.
  if printf '%s\n' "${need_apt[@]}" | grep -qx orthanc; then
    ($SUDO service orthanc stop || $SUDO pkill -x Orthanc || true) >/dev/null 2>&1
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
# torch first and pinned: a CPU wheel from local disk; later requirements then keep it.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
if [ $WITH_TEST = 1 ]; then
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  # The FHIR server the RIS tests talk to (Medplum's router, pinned in its package.json).
  if [ ! -d tests/peers/fhir/node_modules/@medplum/fhir-router ]; then
    command -v npm >/dev/null || { SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"; $SUDO apt-get install -y -q npm; }
    npm install --prefix tests/peers/fhir --no-audit --no-fund --loglevel=error >/dev/null
  fi
else
  "$VENV/bin/python" -m pip install -q -e .
fi
echo "ainode installed in $VENV"

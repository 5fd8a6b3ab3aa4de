#!/usr/bin/env bash
# ainode's container images: one command builds both (see docs/operations.md, "Containers").
#
#   scripts/docker.sh build              # hospital: official debian:bookworm-slim base, CUDA torch
#                                        # in the worker (PyPI), CPU torch in the node
#   scripts/docker.sh build --local      # here and in CI: a Debian base made with mmdebstrap (no
#                                        # Docker Hub), CPU torch from /opt/wheels in both images
#   scripts/docker.sh start              # (tests) install Docker when missing, start a private
#                                        # dockerd (own data root and socket), make the local base
#   scripts/docker.sh peers              # (tests) Redis, PostgreSQL and Orthanc from Debian packages
#   scripts/docker.sh env                # prints DOCKER_HOST=... for the private daemon
#
# The private daemon (start) never touches a Docker the machine may already run: its own data root
# (/var/lib/ainode-docker), socket (/run/ainode-docker.sock), no iptables, no bridge: containers
# and builds use the host's network (--network host). vfs storage: works on any filesystem,
# including inside another container, at the price of a full copy per layer (keep layers few).
# Hospitals run their own Docker: `build` uses whatever DOCKER_HOST says.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_ROOT=${AINODE_DOCKER_ROOT:-/var/lib/ainode-docker}
SOCKET=${AINODE_DOCKER_SOCKET:-/run/ainode-docker.sock}
LOG=${AINODE_DOCKER_LOG:-/tmp/ainode-dockerd.log}
BASE_TAR=${AINODE_DOCKER_BASE_TAR:-/var/cache/ainode-docker/bookworm-minbase.tar}
BASE_IMAGE=debian:bookworm-slim            # the official image's tag: the Dockerfiles' default
TORCH_WHEEL=${AINODE_TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}
# The host's CA bundle: pip inside a build trusts what the host trusts (a TLS-inspecting proxy);
# passed as a BuildKit secret, so it is in no layer of the image.
CA_BUNDLE=${AINODE_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
VERSION=$(sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml | head -1)
# Where the image's code came from: the clone's origin; a clone without one names its own folder.
SOURCE=${AINODE_SOURCE_URL:-$(git config --get remote.origin.url 2>/dev/null || echo "file://$(pwd)")}
REVISION=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)

say() { echo "docker.sh: $*" >&2; }

# A client that builds with BuildKit (RUN --mount secrets): `docker buildx` where installed, else
# Debian's docker.io 20.10 client, whose `docker build` has BuildKit built in (DOCKER_BUILDKIT=1).
docker_cli() {
  if docker buildx version >/dev/null 2>&1; then echo docker; elif [ -x /usr/bin/docker ]; then echo /usr/bin/docker; else echo docker; fi
}
DOCKER=$(docker_cli)

install_packages() {
  local need=()
  command -v dockerd >/dev/null || need+=(docker.io)
  command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
  command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || need+=(docker-compose)
  [ ${#need[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    say "cannot install ${need[*]}: needs root and apt-get"; return 1
  fi
  say "installing ${need[*]} (log in /tmp/ainode-docker-apt.log)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}") \
    >/tmp/ainode-docker-apt.log 2>&1
}

daemon_up() { DOCKER_HOST="unix://$SOCKET" "$DOCKER" version >/dev/null 2>&1; }

start_daemon() {
  daemon_up && return 0
  [ "$(id -u)" = 0 ] || { say "starting dockerd needs root"; return 1; }
  mkdir -p "$DATA_ROOT"
  say "starting dockerd (data root $DATA_ROOT, socket $SOCKET, log $LOG)"
  # setsid: the daemon outlives this script and the test session (later runs reuse it).
  setsid dockerd --data-root "$DATA_ROOT" -H "unix://$SOCKET" --pidfile "$DATA_ROOT/dockerd.pid" \
    --exec-root /run/ainode-docker --iptables=false --ip6tables=false --bridge=none \
    --storage-driver=vfs >"$LOG" 2>&1 </dev/null &
  for _ in $(seq 60); do daemon_up && return 0; sleep 1; done
  say "dockerd did not answer within 60 s; last lines of $LOG:"; tail -5 "$LOG" >&2; return 1
}

# A genuine Debian bookworm base (minbase: apt, dpkg, coreutils) made from the Debian mirror with
# mmdebstrap, under the official image's tag: the Dockerfiles' default base then resolves to it.
local_base() {
  export DOCKER_HOST="unix://$SOCKET"
  if "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then return 0; fi
  if [ ! -s "$BASE_TAR" ]; then
    mkdir -p "$(dirname "$BASE_TAR")"
    say "making $BASE_TAR with mmdebstrap (once)"
    # The same trimming the official slim image does: no documentation, no apt lists.
    mmdebstrap --variant=minbase --format=tar --quiet --dpkgopt='path-exclude=/usr/share/doc/*' \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
      --customize-hook='rm -rf "$1"/var/lib/apt/lists/*' bookworm "$BASE_TAR.part"
    mv "$BASE_TAR.part" "$BASE_TAR"
  fi
  "$DOCKER" import --change 'CMD ["bash"]' "$BASE_TAR" "$BASE_IMAGE" >/dev/null
}

build_images() {
  local local_mode=0 args=()
  [ "${1:-}" = "--local" ] && local_mode=1
  export DOCKER_BUILDKIT=1
  local labels=(--build-arg "VERSION=$VERSION" --build-arg "SOURCE=$SOURCE" --build-arg "REVISION=$REVISION")
  [ -s "$CA_BUNDLE" ] && args+=(--secret "id=pip_ca,src=$CA_BUNDLE")
  if [ $local_mode = 1 ]; then
    export DOCKER_HOST="unix://$SOCKET"
    # The local CPU wheel, linked into docker/wheels (offered to pip by --find-links, in the build
    # context): node and worker then get the same arguments, so the worker's build is the node's
    # cached layers plus its own metadata (one build per run).
    # Removed after the build: a CPU wheel left there would win over PyPI's CUDA torch (a higher
    # local version) in a later hospital build from this clone.
    ln -f "$TORCH_WHEEL" docker/wheels/ 2>/dev/null || cp "$TORCH_WHEEL" docker/wheels/
    trap 'rm -f "docker/wheels/$(basename "$TORCH_WHEEL")"' RETURN
    args+=(--build-arg "TORCH=torch==2.13.0+cpu" --build-arg "TORCH_FROM=")
  fi
  for image in node worker; do
    local t0=$SECONDS
    "$DOCKER" build --network host -f "docker/Dockerfile.$image" "${labels[@]}" "${args[@]}" \
      -t "ainode-$image:$VERSION" -t "ainode-$image:latest" .
    say "ainode-$image built in $((SECONDS - t0)) s"
  done
  [ $local_mode = 1 ] && prune
  "$DOCKER" image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^ainode-(node|worker):' >&2 || true
}

build_peers() {
  export DOCKER_HOST="unix://$SOCKET" DOCKER_BUILDKIT=1
  "$DOCKER" build --network host -f tests/ops/containers/Dockerfile.peers -t ainode-test-peers:latest tests/ops/containers
  prune
}

# The private daemon's leftovers: with vfs every layer is a full copy (GBs), so the images a
# rebuild replaced and build cache no build used for a day go (measured: 41 GB down to 7 GB; what
# this run's builds used stays cached).
prune() {
  "$DOCKER" image prune -f >/dev/null
  "$DOCKER" builder prune -f --filter until=24h >/dev/null
}

case "${1:-}" in
  start) install_packages && start_daemon && local_base ;;
  build) shift; build_images "$@" ;;
  peers) build_peers ;;
  env) echo "DOCKER_HOST=unix://$SOCKET" ;;
  *) sed -n '2,17p' "$0"; exit 2 ;;
esac

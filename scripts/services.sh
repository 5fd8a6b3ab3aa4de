#!/usr/bin/env bash
# Starts the local services the tests use when they are not running (Redis, PostgreSQL, a private
# Docker daemon for the container tests).
set -uo pipefail
if command -v redis-cli >/dev/null && ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  mkdir -p /tmp/ainode-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp/ainode-redis --logfile /tmp/ainode-redis/redis.log || echo "warning: could not start redis-server"
fi
# PostgreSQL (the compose default) is installed when missing, so a fresh `make test` runs the
# tests marked postgres instead of skipping them. Only a cluster installed here is opened to
# loopback without a password (the tests connect as postgres@127.0.0.1, database test).
if ! command -v pg_ctlcluster >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing PostgreSQL for the tests (apt-get install postgresql; log in /tmp/ainode-postgresql-install.log)"
  if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) \
    >/tmp/ainode-postgresql-install.log 2>&1; then
    for hba in /etc/postgresql/*/main/pg_hba.conf; do
      sed -i -E 's/^(host +all +all +(127\.0\.0\.1\/32|::1\/128) +)[a-z0-9-]+$/\1trust/' "$hba"
    done
  else
    echo "warning: could not install PostgreSQL; tests marked postgres will be skipped"
  fi
fi
if command -v pg_ctlcluster >/dev/null && ! pg_isready -q -h 127.0.0.1 2>/dev/null; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start 2>/dev/null \
    || echo "warning: PostgreSQL is not running; tests marked postgres will be skipped"
fi
if pg_isready -q -h 127.0.0.1 2>/dev/null && [ "$(id -u)" = 0 ] \
  && ! runuser -u postgres -- psql -Atqc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1; then
  runuser -u postgres -- createdb test || echo "warning: could not create the database test"
fi
# The container tests (tests/ops/test_docker_stack.py) need a Docker daemon: a private one, its own
# data root and socket, installed when missing (docker.io, mmdebstrap, docker-compose). Where it
# cannot start (no root, no apt, a kernel without namespaces) those tests are skipped with the reason.
bash scripts/docker.sh start || echo "warning: no Docker daemon; the container tests will be skipped"
exit 0

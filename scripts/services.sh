#!/usr/bin/env bash
# Starts the local services the tests use when they are not running (Redis, PostgreSQL).
set -uo pipefail
if command -v redis-cli >/dev/null && ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  mkdir -p /tmp/ainode-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp/ainode-redis --logfile /tmp/ainode-redis/redis.log || echo "warning: could not start redis-server"
fi
if command -v pg_ctlcluster >/dev/null && ! pg_isready -q -h 127.0.0.1 2>/dev/null; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start 2>/dev/null \
    || echo "warning: PostgreSQL is not running; tests marked postgres will be skipped"
fi
exit 0

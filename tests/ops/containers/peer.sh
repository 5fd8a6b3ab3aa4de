#!/bin/sh
# peer.sh redis ARGS... | postgres | orthanc CONFIG: one of the test stack's peers, in the foreground.
set -eu
service=$1; shift
case "$service" in
  redis-server)
    # The compose file's own command line (append-only file, noeviction), with the data in /data.
    exec redis-server "$@" --dir /data ;;
  postgres)
    # What the official image does with POSTGRES_USER/PASSWORD/DB: a cluster made on first start,
    # UTF8 (as the official image; SQL_ASCII would hand clients bytes), password authentication over
    # TCP. PGPORT chooses the port (postgres and pg_isready read it).
    bin=/usr/lib/postgresql/15/bin
    export PGDATA=/data/pgdata
    if [ ! -s "$PGDATA/PG_VERSION" ]; then
      printf '%s\n' "$POSTGRES_PASSWORD" > /tmp/pwfile
      "$bin/initdb" -U "$POSTGRES_USER" --encoding=UTF8 --locale=C.UTF-8 --pwfile=/tmp/pwfile --auth-local=trust --auth-host=scram-sha-256 >/dev/null
      rm /tmp/pwfile
      "$bin/pg_ctl" -w -o "-c listen_addresses='' -k /tmp" start >/dev/null
      "$bin/createdb" -h /tmp -U "$POSTGRES_USER" "$POSTGRES_DB"
      "$bin/pg_ctl" -w stop >/dev/null
    fi
    exec "$bin/postgres" -c listen_addresses=127.0.0.1 -k /tmp "$@" ;;
  orthanc)
    exec Orthanc "$@" ;;
  *) echo "peer.sh: unknown service $service" >&2; exit 2 ;;
esac

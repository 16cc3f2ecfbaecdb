#!/usr/bin/env bash
# Ensures a PostgreSQL server for the tests and prints a superuser URL on stdout
# (export it as CALLMEBACK_TEST_DATABASE_URL; tests/src/postgres.rs runs this script
# itself when the variable is unset). Logs go to stderr.
#
# In order, the first that works:
#  1. CALLMEBACK_TEST_DATABASE_URL, when it is set and answers;
#  2. a server already on 127.0.0.1:5432 with well-known test credentials;
#  3. our own throwaway cluster in $CALLMEBACK_PG_DIR (default $TMPDIR/callmeback-postgres,
#     or a directory under /tmp named by its hash when the postgres user cannot reach it),
#     started if it is not running, created with initdb if it does not exist, after
#     installing Debian's postgresql package if no server binaries are found.
# Idempotent and fast when the server already runs. The cluster trusts connections on
# 127.0.0.1 only: it holds nothing but test databases.
set -euo pipefail

DIR="${CALLMEBACK_PG_DIR:-${TMPDIR:-/tmp}/callmeback-postgres}"
PORT="${CALLMEBACK_PG_PORT:-55432}"
ROLE="callmeback"
OWN_URL="postgres://${ROLE}:${ROLE}@127.0.0.1:${PORT}/postgres"

log() { echo "postgres.sh: $*" >&2; }

# `psql` may be missing on a bare machine; without it we cannot probe, only create.
answers() {
  command -v psql >/dev/null 2>&1 || return 1
  PGCONNECT_TIMEOUT=3 psql "$1" -XAtqc 'SELECT 1' >/dev/null 2>&1
}

if [[ -n "${CALLMEBACK_TEST_DATABASE_URL:-}" ]] && answers "$CALLMEBACK_TEST_DATABASE_URL"; then
  echo "$CALLMEBACK_TEST_DATABASE_URL"
  exit 0
fi

# Our own cluster first when it runs: the cheapest check of all on a second run.
if answers "$OWN_URL"; then
  echo "$OWN_URL"
  exit 0
fi

for url in \
  "postgres://postgres:postgres@127.0.0.1:5432/postgres" \
  "postgres://postgres@127.0.0.1:5432/postgres" \
  "postgres://${ROLE}:${ROLE}@127.0.0.1:5432/postgres"; do
  if answers "$url" && [[ "$(psql "$url" -XAtqc "SELECT rolsuper AND rolcreatedb FROM pg_roles WHERE rolname = current_user")" == "t" ]]; then
    echo "$url"
    exit 0
  fi
done

# Serialise concurrent first runs (two test binaries starting at once).
mkdir -p "$(dirname "$DIR")"
exec 9>"${DIR}.lock"
flock 9
if answers "$OWN_URL"; then
  echo "$OWN_URL"
  exit 0
fi

find_bin() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [[ -x "$d/initdb" && -x "$d/pg_ctl" ]]; then
      echo "$d"
      return 0
    fi
  done
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(command -v initdb)"
    return 0
  fi
  return 1
}

if ! BIN="$(find_bin)"; then
  if [[ "$(id -u)" != 0 ]]; then
    log "no PostgreSQL server binaries found and not root: install the 'postgresql' package"
    exit 1
  fi
  log "installing Debian's postgresql package"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
  BIN="$(find_bin)" || { log "postgresql installed but initdb/pg_ctl not found"; exit 1; }
fi

# PostgreSQL refuses to run as root: as root, run the server as the `postgres` user
# (the Debian package creates it; we create it if needed).
as_owner() {
  if [[ "$(id -u)" == 0 ]]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}
if [[ "$(id -u)" == 0 ]] && ! id postgres >/dev/null 2>&1; then
  useradd --system --home-dir "$DIR" --shell /usr/sbin/nologin postgres
fi

# The server runs as `postgres`, which must be able to reach $DIR: a private TMPDIR
# (`mktemp -d`, mode 0700, owned by root) is not traversable by it. Then the cluster
# goes under /tmp instead, still one per $DIR (named by a hash of it).
if [[ "$(id -u)" == 0 ]] && ! runuser -u postgres -- test -x "$(dirname "$DIR")"; then
  DIR="/tmp/callmeback-postgres-$(printf '%s' "$DIR" | sha256sum | cut -c1-12)"
  log "the postgres user cannot reach the requested directory; using $DIR"
fi
mkdir -p "$DIR"
if [[ "$(id -u)" == 0 ]]; then
  chown postgres: "$DIR"
fi
chmod 700 "$DIR"

if [[ ! -f "$DIR/data/PG_VERSION" ]]; then
  log "initdb into $DIR/data"
  rm -rf "$DIR/data"
  as_owner "$BIN/initdb" --pgdata="$DIR/data" --username="$ROLE" --auth=trust \
    --encoding=UTF8 --locale=C.UTF-8 >&2
fi

mkdir -p "$DIR/sock"
[[ "$(id -u)" == 0 ]] && chown postgres: "$DIR/sock"

if ! as_owner "$BIN/pg_ctl" --pgdata="$DIR/data" status >/dev/null 2>&1; then
  log "starting PostgreSQL on 127.0.0.1:$PORT"
  # max_connections: parallel tests each hold a small pool.
  as_owner "$BIN/pg_ctl" --pgdata="$DIR/data" --log="$DIR/server.log" --wait --timeout=60 \
    -o "-c listen_addresses=127.0.0.1 -c port=$PORT -c unix_socket_directories=$DIR/sock -c max_connections=300" \
    start >&2 || { tail -n 30 "$DIR/server.log" >&2; exit 1; }
fi

for _ in $(seq 1 50); do
  if answers "$OWN_URL"; then
    echo "$OWN_URL"
    exit 0
  fi
  sleep 0.1
done
log "PostgreSQL started but does not answer on $OWN_URL; see $DIR/server.log"
exit 1

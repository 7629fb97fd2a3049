#!/usr/bin/env bash
# pgstac.sh - run a local STAC API (stac-fastapi-pgstac on PostgreSQL 15 + PostGIS).
#
#   pgstac.sh up   WORKDIR [--pg-port N] [--api-port N] [--transactions] [--venv DIR]
#   pgstac.sh load WORKDIR CATALOG_JSON [--method upsert|insert_ignore|ignore]
#   pgstac.sh down WORKDIR
#
# WORKDIR holds everything (pg/data, pg/ socket, logs, pids) and must be reachable
# by the postgres user when run as root (e.g. a directory under /tmp).
# After `up`, WORKDIR/env holds STAC_API_URL, PG* settings and pids (shell syntax).
# Run install.sh first (it installs the Debian packages and the server venv).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PGVER=15
PGBIN=/usr/lib/postgresql/$PGVER/bin
VENV=${STAC_API_VENV:-$REPO/.venv-stac-api}

log() { echo "[pgstac] $*" >&2; }
die() { echo "[pgstac] ERROR: $*" >&2; exit 1; }
usage() { sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

AS_PG=()
[ "$(id -u)" = 0 ] && AS_PG=(runuser -u postgres --)

tail_log() {  # tail_log FILE...
  local f
  for f in "$@"; do
    [ -f "$f" ] || continue
    echo "----- tail of $f -----" >&2
    tail -n 40 "$f" >&2 || true
  done
}

# alive PID: exists and is not a zombie (PID 1 here reaps orphans lazily, and
# kill -0 succeeds on zombies).
alive() {
  local st
  st=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ]
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Our uvicorn? (pid alive, stac-fastapi cmdline, cwd == WORKDIR). Guards against pid reuse.
is_our_api() {
  local pid=$1 w=$2
  [ -n "$pid" ] && alive "$pid" || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q 'stac_fastapi.pgstac.app' || return 1
  [ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$w" ]
}

pg_running() { "${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$1/pg/data" status >/dev/null 2>&1; }

stop_api() {
  local w=$1 pid
  [ -f "$w/api.pid" ] || return 0
  pid=$(cat "$w/api.pid")
  if is_our_api "$pid" "$w"; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do alive "$pid" || break; sleep 0.05; done
    if alive "$pid"; then
      log "uvicorn $pid ignored SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$w/api.pid"
}

stop_pg() {
  local w=$1
  [ -f "$w/pg/data/PG_VERSION" ] || return 0
  if pg_running "$w"; then
    "${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$w/pg/data" -m fast -w -t 60 stop >/dev/null \
      || { tail_log "$w/pg/pg.log"; return 1; }
  fi
}

cmd_down() {
  [ $# -eq 1 ] || usage
  local w
  [ -d "$1" ] || { log "$1 does not exist: nothing to stop"; return 0; }
  w=$(cd "$1" && pwd -P)
  stop_api "$w"
  stop_pg "$w"
  rm -f "$w/env"
  log "stopped ($w)"
}

cmd_up() {
  [ $# -ge 1 ] || usage
  local w=$1; shift
  local pg_port=5439 api_port=8081 transactions=false
  while [ $# -gt 0 ]; do
    case $1 in
      --pg-port) pg_port=$2; shift 2 ;;
      --api-port) api_port=$2; shift 2 ;;
      --transactions) transactions=true; shift ;;
      --venv) VENV=$2; shift 2 ;;
      *) usage ;;
    esac
  done
  [ -x "$PGBIN/initdb" ] && [ -f /usr/share/postgresql/$PGVER/extension/postgis.control ] \
    || die "PostgreSQL $PGVER + PostGIS missing: run $HERE/install.sh"
  [ -x "$VENV/bin/uvicorn" ] && [ -x "$VENV/bin/pypgstac" ] \
    || die "server venv $VENV missing: run $HERE/install.sh $VENV"

  mkdir -p "$w"
  w=$(cd "$w" && pwd -P)
  local pgdir=$w/pg data=$w/pg/data
  if [ -f "$w/env" ]; then
    if { [ -f "$w/api.pid" ] && is_our_api "$(cat "$w/api.pid")" "$w"; } || pg_running "$w"; then
      die "a server is already running from $w: run '$0 down $w' first"
    fi
    rm -f "$w/env"
  fi
  # unix socket path limit (sun_path: 107 bytes)
  [ ${#pgdir} -le 80 ] || die "WORKDIR path too long for a unix socket dir (${#pgdir} chars): use a shorter one, e.g. under /tmp"
  port_in_use "$pg_port" && die "port $pg_port (postgres) on 127.0.0.1 is already in use"
  port_in_use "$api_port" && die "port $api_port (API) on 127.0.0.1 is already in use"

  mkdir -p "$pgdir"
  if [ ${#AS_PG[@]} -gt 0 ]; then
    chown postgres:postgres "$pgdir"
    [ -d "$data" ] && chown -R postgres:postgres "$data"
    "${AS_PG[@]}" test -w "$pgdir" \
      || die "the postgres user cannot reach $pgdir (a parent directory is not traversable, e.g. /root or a 0700 tmp dir): use a WORKDIR under /tmp with mode 755 parents"
  fi

  # From here on, any failure tears down what was started.
  trap 'rc=$?; if [ $rc -ne 0 ]; then tail_log "$pgdir/pg.log" "$w/api.log"; stop_api "$w"; stop_pg "$w" || true; fi' EXIT

  local t0=$SECONDS
  if [ ! -f "$data/PG_VERSION" ]; then
    "${AS_PG[@]}" "$PGBIN/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --no-sync \
      > "$pgdir/initdb.log" 2>&1 || { tail_log "$pgdir/initdb.log"; die "initdb failed"; }
  fi
  "${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$data" -l "$pgdir/pg.log" -w -t 60 \
    -o "-p $pg_port -k $pgdir -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
    start > /dev/null || die "postgres failed to start"

  export PGHOST=127.0.0.1 PGPORT=$pg_port PGUSER=postgres PGPASSWORD=unused PGDATABASE=postgres
  local psql=("$PGBIN/psql" -X -q -v ON_ERROR_STOP=1)
  if [ "$("${psql[@]}" -tAc "SELECT 1 FROM pg_database WHERE datname='stac'")" != 1 ]; then
    "${psql[@]}" -c "CREATE DATABASE stac" || die "CREATE DATABASE failed"
  fi
  export PGDATABASE=stac
  "$VENV/bin/pypgstac" migrate > "$w/migrate.log" 2>&1 || { tail_log "$w/migrate.log"; die "pypgstac migrate failed"; }
  # Numeric/text queryables (without a to_float queryable, eo:cloud_cover compares
  # and sorts as text) + numberMatched. search_path is needed for pgstac's triggers.
  "${psql[@]}" <<'SQL' || die "queryables/settings SQL failed"
SET search_path TO pgstac, public;
DELETE FROM queryables WHERE collection_ids IS NULL
  AND name IN ('eo:cloud_cover', 'platform', 'sar:instrument_mode', 'sar:polarizations');
INSERT INTO queryables (name, definition, property_wrapper, property_index_type) VALUES
 ('eo:cloud_cover', '{"type":"number","minimum":0,"maximum":100}', 'to_float', 'BTREE'),
 ('platform', '{"type":"string"}', 'to_text', NULL),
 ('sar:instrument_mode', '{"type":"string"}', 'to_text', NULL),
 ('sar:polarizations', '{"type":"array","items":{"type":"string"}}', 'to_text_array', NULL);
UPDATE pgstac_settings SET value = 'on' WHERE name = 'context';
SQL

  # Start the API: cwd=WORKDIR so pydantic-settings never picks up a stray ./.env;
  # own session so a terminal Ctrl-C does not hit it (down stops it by pid).
  (
    cd "$w"
    unset ENABLED_EXTENSIONS
    export ENABLE_TRANSACTIONS_EXTENSIONS=$transactions
    export STAC_FASTAPI_TITLE="SkySense STAC API" STAC_FASTAPI_DESCRIPTION="SkySense-on-Ray products" \
      STAC_FASTAPI_LANDING_ID=skysense-stac-api STAC_FASTAPI_VERSION=1.0.0
    exec setsid bash -c 'echo $$ > api.pid; exec "$0" "$@"' \
      "$VENV/bin/uvicorn" stac_fastapi.pgstac.app:create_app --factory \
      --host 127.0.0.1 --port "$api_port" --log-level warning \
      > "$w/api.log" 2>&1 < /dev/null
  ) &
  local url=http://127.0.0.1:$api_port ok=false
  for _ in $(seq 1 300); do
    if curl -sf -o /dev/null "$url/_mgmt/ping"; then ok=true; break; fi
    if [ -f "$w/api.pid" ] && ! alive "$(cat "$w/api.pid")"; then break; fi
    sleep 0.1
  done
  $ok || die "API did not answer $url/_mgmt/ping"
  if $transactions; then
    curl -sf "$url/conformance" | grep -q 'transaction' || die "transactions extension not enabled"
  fi

  cat > "$w/env.tmp" <<ENV
STAC_API_URL=$url
API_PORT=$api_port
API_PID=$(cat "$w/api.pid")
TRANSACTIONS=$transactions
PGHOST=127.0.0.1
PGPORT=$pg_port
PGUSER=postgres
PGPASSWORD=unused
PGDATABASE=stac
PGDATA=$data
STAC_API_VENV=$VENV
ENV
  mv "$w/env.tmp" "$w/env"
  trap - EXIT
  log "up in $((SECONDS - t0)) s: $url (postgres 127.0.0.1:$pg_port, transactions=$transactions)"
  echo "$url"
}

cmd_load() {
  [ $# -ge 2 ] || usage
  local w=$1 cat=$2 method=upsert; shift 2
  while [ $# -gt 0 ]; do
    case $1 in
      --method) method=$2; shift 2 ;;
      *) usage ;;
    esac
  done
  [ -f "$w/env" ] || die "no running server in $w (run '$0 up $w' first)"
  [ -f "$cat" ] || die "catalog $cat not found"
  set -a; . "$w/env"; set +a
  VENV=$STAC_API_VENV
  local out
  out=$(mktemp -d "$w/load.XXXXXX")
  "$VENV/bin/python" "$HERE/catalog_to_ndjson.py" "$cat" "$out" >&2 || { rm -rf "$out"; die "catalog conversion failed"; }
  if [ -s "$out/collections.ndjson" ]; then
    "$VENV/bin/pypgstac" load collections "$out/collections.ndjson" --method "$method" > "$out/load.log" 2>&1 \
      || { tail_log "$out/load.log"; die "loading collections failed"; }
  fi
  if [ -s "$out/items.ndjson" ]; then
    "$VENV/bin/pypgstac" load items "$out/items.ndjson" --method "$method" >> "$out/load.log" 2>&1 \
      || { tail_log "$out/load.log"; die "loading items failed"; }
  fi
  rm -rf "$out"
}

[ $# -ge 1 ] || usage
sub=$1; shift
case $sub in
  up) cmd_up "$@" ;;
  load) cmd_load "$@" ;;
  down) cmd_down "$@" ;;
  *) usage ;;
esac

#!/usr/bin/env bash
# install.sh [VENV_DIR]
#
# Idempotent installer for the local STAC API stack used by deployments and tests:
#   * Debian packages postgresql-15 + postgresql-15-postgis-3 (only if missing)
#   * a SEPARATE server virtualenv (default: <repo>/.venv-stac-api) with
#     stac-fastapi-pgstac / pypgstac / uvicorn pinned. It is kept apart from the
#     project's .venv so stac-fastapi's fastapi/pydantic pins never fight Ray's.
# Fast no-op (well under a second) when everything is already in place.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
VENV=${1:-$REPO/.venv-stac-api}
PYTHON=${PYTHON:-python3}
PGVER=15
PGBIN=/usr/lib/postgresql/$PGVER/bin
DEB_PKGS=(postgresql-$PGVER postgresql-$PGVER-postgis-3)
PIP_PINS=("stac-fastapi-pgstac==7.2.0" "pypgstac[psycopg]==0.10.0" "uvicorn==0.54.0")
STAMP_CONTENT="${PIP_PINS[*]}"

log() { echo "[stac-api/install] $*" >&2; }
LOGF=$(mktemp "${TMPDIR:-/tmp}/stac-api-install.XXXXXX.log")
trap 'rm -f "$LOGF"' EXIT
show_log() { echo "----- tail of install log -----" >&2; tail -n 60 "$LOGF" >&2 || true; }
die() { echo "[stac-api/install] ERROR: $*" >&2; exit 1; }

# Serialise concurrent installers (two test sessions / CI jobs on one box).
if command -v flock >/dev/null 2>&1; then
  exec 9>"${TMPDIR:-/tmp}/skysense-stac-api-install.lock"
  flock 9
fi

# ---------------------------------------------------------------- Debian part
# shellcheck source=../lib/debian.sh
. "$HERE/../lib/debian.sh"

if deb_installed "${DEB_PKGS[@]}" && [ -x "$PGBIN/initdb" ] \
   && [ -f /usr/share/postgresql/$PGVER/extension/postgis.control ]; then
  :
else
  t0=$SECONDS
  deb_install_missing "PostgreSQL $PGVER + PostGIS 3" "${DEB_PKGS[@]}"
  [ -x "$PGBIN/initdb" ] || die "$PGBIN/initdb missing after install"
  [ -f /usr/share/postgresql/$PGVER/extension/postgis.control ] || die "PostGIS extension missing after install"
  log "Debian packages installed in $((SECONDS - t0)) s"
fi

# ------------------------------------------------------------ Python venv part
venv_ok() {
  [ -x "$VENV/bin/python" ] && [ -x "$VENV/bin/uvicorn" ] && [ -x "$VENV/bin/pypgstac" ] \
    && [ -f "$VENV/.skysense-stamp" ] && [ "$(cat "$VENV/.skysense-stamp")" = "$STAMP_CONTENT" ] \
    && "$VENV/bin/python" -c "import stac_fastapi.pgstac.app, pypgstac, psycopg, uvicorn" >/dev/null 2>&1
}

if ! venv_ok; then
  command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set PYTHON=/path/to/python3.11)"
  t0=$SECONDS
  if [ -e "$VENV" ]; then
    log "server venv $VENV incomplete or outdated: recreating"
    rm -rf "$VENV"
  fi
  log "creating server venv $VENV"
  "$PYTHON" -m venv "$VENV" >>"$LOGF" 2>&1 \
    || { show_log; die "'$PYTHON -m venv' failed (on Debian's own python install python3-venv)"; }
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PIP_PINS[@]}" >>"$LOGF" 2>&1 \
    || { show_log; rm -rf "$VENV"; die "pip install ${PIP_PINS[*]} failed"; }
  "$VENV/bin/python" -c "import stac_fastapi.pgstac.app, pypgstac, psycopg, uvicorn" >>"$LOGF" 2>&1 \
    || { show_log; rm -rf "$VENV"; die "server venv import check failed"; }
  printf '%s' "$STAMP_CONTENT" > "$VENV/.skysense-stamp"
  log "server venv ready in $((SECONDS - t0)) s"
fi

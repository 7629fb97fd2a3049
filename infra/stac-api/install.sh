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
deb_installed() {  # all given packages are fully installed?
  local p s
  for p in "$@"; do
    s=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [ "$s" = installed ] || return 1
  done
}

if deb_installed "${DEB_PKGS[@]}" && [ -x "$PGBIN/initdb" ] \
   && [ -f /usr/share/postgresql/$PGVER/extension/postgis.control ]; then
  :
else
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found. Install PostgreSQL $PGVER + PostGIS 3 (${DEB_PKGS[*]}) by hand."
  if [ "$(id -u)" = 0 ]; then
    SUDO=()
  elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
  else
    die "not root and no sudo: run as root:  apt-get update && apt-get install -y --no-install-recommends ${DEB_PKGS[*]}"
  fi
  # Install only what is missing: naming an installed package would upgrade it.
  MISSING=() REINSTALL=()
  for p in "${DEB_PKGS[@]}"; do deb_installed "$p" || MISSING+=("$p"); done
  if [ ${#MISSING[@]} -eq 0 ]; then  # marked installed but files gone
    MISSING=("${DEB_PKGS[@]}") REINSTALL=(--reinstall)
  fi
  log "installing Debian packages: ${MISSING[*]} (apt-get update first)"
  t0=$SECONDS
  # Package lists on a fresh image are empty or stale, so refresh them before
  # installing (only on this cold path).
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >>"$LOGF" 2>&1 \
    || { show_log; die "apt-get update failed"; }
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${REINSTALL[@]}" \
      --no-install-recommends -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
      "${MISSING[@]}" >>"$LOGF" 2>&1 \
    || { show_log; die "apt-get install ${MISSING[*]} failed"; }
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

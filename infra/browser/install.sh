#!/usr/bin/env bash
# install.sh
#
# Idempotent installer for the headless browser the report tests drive (tests/test_report.py):
#   * Debian packages chromium + chromium-driver (only if missing), giving /usr/bin/chromium and
#     /usr/bin/chromedriver of the same version, so selenium needs no driver download (the test machines
#     are offline); plus fonts-liberation (a Recommends we skip with the rest of them: without any font a
#     screenshot shows text as boxes).
# Fast no-op (well under a second) when everything is already in place.
set -euo pipefail

DEB_PKGS=(chromium chromium-driver fonts-liberation)
CHROMIUM=/usr/bin/chromium
CHROMEDRIVER=/usr/bin/chromedriver

log() { echo "[browser/install] $*" >&2; }
LOGF=$(mktemp "${TMPDIR:-/tmp}/browser-install.XXXXXX.log")
trap 'rm -f "$LOGF"' EXIT
show_log() { echo "----- tail of install log -----" >&2; tail -n 60 "$LOGF" >&2 || true; }
die() { echo "[browser/install] ERROR: $*" >&2; exit 1; }

# Serialise concurrent installers (two test sessions / CI jobs on one box).
if command -v flock >/dev/null 2>&1; then
  exec 9>"${TMPDIR:-/tmp}/skysense-browser-install.lock"
  flock 9
fi

deb_installed() {  # all given packages are fully installed?
  local p s
  for p in "$@"; do
    s=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [ "$s" = installed ] || return 1
  done
}

if deb_installed "${DEB_PKGS[@]}" && [ -x "$CHROMIUM" ] && [ -x "$CHROMEDRIVER" ]; then
  exit 0
fi

command -v apt-get >/dev/null 2>&1 || die "apt-get not found. Install Chromium and its driver (${DEB_PKGS[*]}) by hand."
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
# Package lists on a fresh image are empty or stale, so refresh them before installing (only on this cold path).
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >>"$LOGF" 2>&1 \
  || { show_log; die "apt-get update failed"; }
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${REINSTALL[@]}" \
    --no-install-recommends -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${MISSING[@]}" >>"$LOGF" 2>&1 \
  || { show_log; die "apt-get install ${MISSING[*]} failed"; }
[ -x "$CHROMIUM" ] || die "$CHROMIUM missing after install"
[ -x "$CHROMEDRIVER" ] || die "$CHROMEDRIVER missing after install"
log "Debian packages installed in $((SECONDS - t0)) s"

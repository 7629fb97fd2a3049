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

# shellcheck source=../lib/debian.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib/debian.sh"

if deb_installed "${DEB_PKGS[@]}" && [ -x "$CHROMIUM" ] && [ -x "$CHROMEDRIVER" ]; then
  exit 0
fi

t0=$SECONDS
deb_install_missing "Chromium and its driver" "${DEB_PKGS[@]}"
[ -x "$CHROMIUM" ] || die "$CHROMIUM missing after install"
[ -x "$CHROMEDRIVER" ] || die "$CHROMEDRIVER missing after install"
log "Debian packages installed in $((SECONDS - t0)) s"

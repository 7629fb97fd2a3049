# shellcheck shell=bash
# Debian packages for the project's installers (infra/stac-api/install.sh, infra/browser/install.sh): sourced,
# not run. The caller defines log, die, show_log and LOGF (the install log) first.

deb_installed() {  # all given packages are fully installed?
  local p s
  for p in "$@"; do
    s=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [ "$s" = installed ] || return 1
  done
}

deb_install_missing() {  # deb_install_missing WHAT PKG...: apt-get install the packages not yet installed
  local what=$1
  shift
  local -a sudo=() missing=() reinstall=()
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found. Install $what ($*) by hand."
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 \
      || die "not root and no sudo: run as root:  apt-get update && apt-get install -y --no-install-recommends $*"
    sudo=(sudo)
  fi
  # Install only what is missing: naming an installed package would upgrade it.
  local p
  for p in "$@"; do deb_installed "$p" || missing+=("$p"); done
  if [ ${#missing[@]} -eq 0 ]; then  # marked installed but files gone
    missing=("$@") reinstall=(--reinstall)
  fi
  log "installing Debian packages: ${missing[*]} (apt-get update first)"
  # Package lists on a fresh image are empty or stale, so refresh them before installing (only on this cold path).
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >>"$LOGF" 2>&1 \
    || { show_log; die "apt-get update failed"; }
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${reinstall[@]}" \
      --no-install-recommends -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
      "${missing[@]}" >>"$LOGF" 2>&1 \
    || { show_log; die "apt-get install ${missing[*]} failed"; }
}

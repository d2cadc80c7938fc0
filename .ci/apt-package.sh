#!/usr/bin/env bash
# Installs one Debian package quietly, without starting its service
# (policy-rc.d answers 101 while apt runs), refreshing the package lists when
# the first try fails. Used by .ci/prometheus.sh and .ci/nats.sh.
#   bash .ci/apt-package.sh PACKAGE
set -euo pipefail

pkg=${1:?usage: apt-package.sh PACKAGE}
log() { echo "apt-package.sh: $*" >&2; }

SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || { log "not root and no sudo: install Debian's $pkg package"; exit 1; }
  SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
  $SUDO chmod 0755 "$POLICY"
  trap '$SUDO rm -f "$POLICY"' EXIT
fi
LOG=$(mktemp)
install() {
  $SUDO apt-get install -y -q --no-install-recommends "$pkg" >"$LOG" 2>&1
}
start=$SECONDS
log "installing Debian's $pkg package"
if ! install; then
  # A fresh machine has no (or stale) package lists.
  $SUDO apt-get update -q >"$LOG" 2>&1 || { cat "$LOG" >&2; log "apt-get update failed"; exit 1; }
  install || { cat "$LOG" >&2; log "apt-get install $pkg failed"; exit 1; }
fi
rm -f "$LOG"
log "installed $pkg in $((SECONDS - start))s"

#!/usr/bin/env bash
# Installs Debian's `prometheus` package (the `prometheus` and `promtool`
# binaries) for agent/tests/prometheus.rs, which runs both as plain processes.
# Idempotent and quiet; the package's service is not started.
set -euo pipefail

log() { echo "prometheus.sh: $*" >&2; }

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || { log "not root and no sudo: install Debian's prometheus package"; exit 1; }
  SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d answering 101 keeps apt from starting the package's service.
POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
  $SUDO chmod 0755 "$POLICY"
  trap '$SUDO rm -f "$POLICY"' EXIT
fi
LOG=$(mktemp)
install() {
  $SUDO apt-get install -y -q --no-install-recommends prometheus >"$LOG" 2>&1
}
start=$SECONDS
log "installing Debian's prometheus package"
if ! install; then
  # A fresh machine has no (or stale) package lists.
  $SUDO apt-get update -q >"$LOG" 2>&1 || { cat "$LOG" >&2; log "apt-get update failed"; exit 1; }
  install || { cat "$LOG" >&2; log "apt-get install prometheus failed"; exit 1; }
fi
rm -f "$LOG"
prometheus --version 2>&1 | head -1 >&2
promtool --version >/dev/null
log "installed in $((SECONDS - start))s"

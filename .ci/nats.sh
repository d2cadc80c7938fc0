#!/usr/bin/env bash
# Installs Debian's `nats-server` package for shoal-bench's comparison with
# NATS (`--only compare`, and its smoke test tests/tests/compare_smoke.rs),
# which runs it as a plain process. Idempotent and quiet; the package's
# service is not started.
set -euo pipefail

log() { echo "nats.sh: $*" >&2; }

if command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || { log "not root and no sudo: install Debian's nats-server package"; exit 1; }
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
  $SUDO apt-get install -y -q --no-install-recommends nats-server >"$LOG" 2>&1
}
start=$SECONDS
log "installing Debian's nats-server package"
if ! install; then
  # A fresh machine has no (or stale) package lists.
  $SUDO apt-get update -q >"$LOG" 2>&1 || { cat "$LOG" >&2; log "apt-get update failed"; exit 1; }
  install || { cat "$LOG" >&2; log "apt-get install nats-server failed"; exit 1; }
fi
rm -f "$LOG"
BIN=$(command -v nats-server || echo /usr/sbin/nats-server)
"$BIN" --version >&2 || { log "nats-server does not run"; exit 1; }
log "installed in $((SECONDS - start))s"

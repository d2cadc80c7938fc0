#!/usr/bin/env bash
# Installs Debian's `nats-server` package for shoal-bench's comparison with
# NATS (`--only compare`, and its smoke test tests/tests/compare_smoke.rs),
# which runs it as a plain process. Idempotent and quiet; the package's
# service is not started.
set -euo pipefail
cd "$(dirname "$0")"

if command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ]; then
  exit 0
fi
bash apt-package.sh nats-server
BIN=$(command -v nats-server || echo /usr/sbin/nats-server)
"$BIN" --version >&2 || { echo "nats.sh: nats-server does not run" >&2; exit 1; }

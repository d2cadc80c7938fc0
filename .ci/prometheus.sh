#!/usr/bin/env bash
# Installs Debian's `prometheus` package (the `prometheus` and `promtool`
# binaries) for agent/tests/prometheus.rs, which runs both as plain processes.
# Idempotent and quiet; the package's service is not started.
set -euo pipefail
cd "$(dirname "$0")"

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi
bash apt-package.sh prometheus
prometheus --version 2>&1 | head -1 >&2
promtool --version >/dev/null

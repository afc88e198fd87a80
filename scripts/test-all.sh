#!/usr/bin/env bash
# Sets up and runs every test: the wasm target the guests need, the Python
# Prometheus parser the metrics test checks /metrics with, then the host's
# unit and end-to-end tests (which build the guests from source), the guest
# SDK's tests and the bundled policies' tests.
set -euo pipefail
cd "$(dirname "$0")/.."

rustup target add wasm32-wasip2
python3 -c "import prometheus_client" 2>/dev/null \
  || python3 -m pip install --quiet --disable-pip-version-check prometheus_client
cargo test --release -p sluice -p sluice-guest -p sensitive-words -p fallback

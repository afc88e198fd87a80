#!/usr/bin/env bash
# Sets up and runs every test: the wasm target the guests need, the Python
# Prometheus parser the metrics test checks /metrics with, redis-server (the
# shared-limits test starts its own on loopback), then the host's unit and
# end-to-end tests (which build the guests from source), the guest SDK's and
# the bundled policies' tests, the console's browser tests in headless
# Chromium, the offline checks of deploy/ (Dockerfile, Helm chart), a short
# bounded run of every fuzz target, and the real-world suite (the OpenAI SDK
# as client, llama.cpp as backend).
set -euo pipefail
cd "$(dirname "$0")/.."

rustup target add wasm32-wasip2 wasm32-unknown-unknown
python3 -c "import prometheus_client" 2>/dev/null \
  || python3 -m pip install --quiet --disable-pip-version-check prometheus_client
command -v redis-server >/dev/null || bash scripts/apt-install.sh redis-server
cargo test --release -p sluice -p sluice-guest -p sensitive-words -p fallback
bash scripts/test-browser.sh
bash scripts/check-deploy.sh
FUZZ_SECONDS="${FUZZ_SECONDS:-15}" bash scripts/fuzz.sh
bash scripts/test-real.sh

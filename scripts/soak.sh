#!/usr/bin/env bash
# A 30-minute soak of the release binary (not part of CI): mixed streaming
# load, a backend SIGKILLed and revived every 3 minutes, the router
# redeployed every minute; RSS and open file descriptors sampled. Arguments
# go to scripts/soak.py (e.g. --minutes 5). Results in soak-results/.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip2 wasm32-unknown-unknown >/dev/null
cargo build --release -p sluice
exec python3 scripts/soak.py "$@"

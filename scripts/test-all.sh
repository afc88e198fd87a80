#!/usr/bin/env bash
# Sets up and runs every test: the wasm target the guests need, then the
# host's unit and end-to-end tests (which build the guests from source) and
# the guest SDK's tests.
set -euo pipefail
cd "$(dirname "$0")/.."

rustup target add wasm32-wasip2
cargo test --release -p sluice -p sluice-guest -p sensitive-words -p fallback

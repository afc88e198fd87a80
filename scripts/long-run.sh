#!/usr/bin/env bash
# The long runs, outside CI (scripts/test-all.sh runs shorter versions of
# each): the deploy-memory test at its soak length, the coverage-guided
# libFuzzer run of every target, and optionally the 30-minute soak.
#
#   SLUICE_E2E_DEPLOYS   deploys in deploy::memory_stays_flat_over_many_deploys (default 1000; CI: 300)
#   FUZZ_SECONDS         libFuzzer seconds per target (default 720: an hour over the five)
#   SOAK=1               also run scripts/soak.sh (30 min; SOAK_ARGS passed to it)
#
# Figures from these runs go in BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip2 wasm32-unknown-unknown >/dev/null

echo "== long-run: deploy memory over ${SLUICE_E2E_DEPLOYS:-1000} deploys"
SLUICE_E2E_DEPLOYS="${SLUICE_E2E_DEPLOYS:-1000}" \
  cargo test --release -p sluice --test e2e deploy::memory_stays_flat_over_many_deploys -- --nocapture

echo "== long-run: libFuzzer, ${FUZZ_SECONDS:-720} s per target"
FUZZ_SECONDS="${FUZZ_SECONDS:-720}" bash scripts/fuzz.sh

if [ "${SOAK:-0}" = 1 ]; then
  echo "== long-run: soak"
  # shellcheck disable=SC2086
  bash scripts/soak.sh ${SOAK_ARGS:-}
fi

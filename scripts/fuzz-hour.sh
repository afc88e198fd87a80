#!/usr/bin/env bash
# An hour of fuzzing in total across the six targets, without cargo-fuzz:
# the fuzz smoke harness (fuzz/smoke, built by the ordinary release
# `cargo test`) runs every target's body over its seed corpus and then over
# generated and mutated inputs for FUZZ_HOUR_SECONDS of CPU time per target
# (FUZZ_SMOKE_CPU=1: on a busy machine a target runs longer, not less), so
# the sum is 6 × 600 CPU s = 1 h — about 30 min of wall time on two idle
# cores. Not coverage-guided: scripts/fuzz.sh is the libFuzzer run (it needs
# an instrumented build of wasmtime, ~20+ min cold).
#
#   FUZZ_HOUR_SECONDS   CPU seconds per target (default 600)
#   FUZZ_HOUR_THREADS   targets run at once (default 2, one per core)
#   FUZZ_SMOKE_TIMEOUT  wall seconds one input may take (default here 120)
#   FUZZ_SMOKE_SEED     replay a seed
#
# It stops by itself: the whole run is killed after four times its budget
# in wall time plus 10 minutes. The test binary is copied first, so a
# rebuild meanwhile does not touch the running one. Per-target figures
# ("fuzz-smoke TARGET: N seeds + M generated inputs in W s wall, C s CPU")
# are printed at the end; a crash leaves its input in fuzz/artifacts/TARGET/
# and fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_HOUR_SECONDS:-600}"
threads="${FUZZ_HOUR_THREADS:-2}"
targets=6
rounds=$(( (targets + threads - 1) / threads ))

binary="$(cargo test --release -p sluice-fuzz-smoke --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "sluice_fuzz_smoke":
        print(m["executable"])')"
[ -x "$binary" ] || { echo "fuzz-hour: no fuzz smoke test binary"; exit 1; }
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
cp "$binary" "$scratch/fuzz-smoke"

log="$scratch/fuzz.log"
started=$(date +%s)
status=0
# The harness finds fuzz/ from its manifest directory, so run it from fuzz/smoke.
(cd fuzz/smoke && FUZZ_SMOKE_CPU=1 FUZZ_SMOKE_SECONDS="$seconds" FUZZ_SMOKE_TIMEOUT="${FUZZ_SMOKE_TIMEOUT:-120}" \
  timeout --signal=KILL "$((rounds * seconds * 4 + 600))" \
  "$scratch/fuzz-smoke" --test-threads="$threads" --nocapture) >"$log" 2>&1 || status=$?
elapsed=$(( $(date +%s) - started ))

echo "== fuzz-hour: ${seconds} CPU s per target, ${threads} at once, ${elapsed}s wall (exit $status)"
grep -E '^fuzz-smoke |panicked|test result' "$log" || true
if [ "$status" -ne 0 ]; then
  tail -n 40 "$log"
  exit 1
fi

#!/usr/bin/env bash
# Builds the fuzz targets in fuzz/ (cargo-fuzz, libFuzzer) and runs each for a
# bounded time, starting from its seed corpus in fuzz/corpus/TARGET/.
#
# This is the coverage-guided run, for long runs (e.g. FUZZ_SECONDS=720 for
# an hour over the five targets); it is not in scripts/test-all.sh, whose
# cargo test runs the same target bodies without libFuzzer (fuzz/smoke: seed
# corpus plus generated and mutated inputs, FUZZ_SMOKE_SECONDS per target)
# from the release build it already has. Here cargo-fuzz is installed if
# missing and wasmtime and the host are compiled again with coverage
# instrumentation and debug assertions (~20+ min cold on 2 cores).
#
#   FUZZ_SECONDS   seconds per target (default 20)
#   FUZZ_TARGETS   which targets, space-separated (default: all five)
#   FUZZ_JOBS      parallel fuzzing processes per target (default 1)
#
# cargo-fuzz passes rustc flags that only nightly accepts (-Zsanitizer,
# SanitizerCoverage passes); the stable toolchain takes them with
# RUSTC_BOOTSTRAP=1, so no nightly is needed. No sanitizer: the code under
# test is safe Rust, and wasmtime's signal-based traps (stream_filter runs
# real policies) do not mix with ASan. Debug assertions are on, so integer
# overflow is a crash too.
#
# New inputs the fuzzer finds go to a scratch directory (the committed corpus
# stays a small seed set). A crash, a timeout or an out-of-memory leaves its
# input in fuzz/artifacts/TARGET/ and makes this script fail; reproduce with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run -s none -a TARGET fuzz/artifacts/TARGET/FILE
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-20}"
targets="${FUZZ_TARGETS:-request_body sse_parser config stream_filter decision engine_metrics}"
jobs="${FUZZ_JOBS:-1}"

# The host's build script compiles the guests for both wasm targets.
rustup target add wasm32-wasip2 wasm32-unknown-unknown >/dev/null 2>&1 || true
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz --version 0.13.2
fi

export RUSTC_BOOTSTRAP=1
flags=(--sanitizer none --debug-assertions)
cargo fuzz build "${flags[@]}"

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
failed=()
summary=()
for target in $targets; do
  mkdir -p "$scratch/$target" "fuzz/artifacts/$target"
  log="$scratch/$target.log"
  echo "== fuzzing $target for ${seconds}s"
  status=0
  cargo fuzz run "${flags[@]}" "$target" "$scratch/$target" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -timeout=30 -rss_limit_mb=4096 -max_len=65536 \
    -jobs="$jobs" -workers="$jobs" -print_final_stats=1 >"$log" 2>&1 || status=$?
  runs="$(cat "$log" fuzz-*.log 2>/dev/null | awk '/stat::number_of_executed_units/ {s+=$2} END {print s+0}')"
  rm -f fuzz-*.log
  if [ "$status" -ne 0 ]; then
    tail -n 60 "$log"
    failed+=("$target")
    summary+=("$target: FAILED after $runs executions (input in fuzz/artifacts/$target/)")
  else
    summary+=("$target: $runs executions in ${seconds}s, no crash")
  fi
done

echo "== fuzz summary"
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -ne 0 ]; then
  echo "fuzz: ${#failed[@]} target(s) failed: ${failed[*]}"
  exit 1
fi

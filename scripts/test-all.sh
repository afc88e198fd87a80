#!/usr/bin/env bash
# Sets up and runs every test: the wasm target the guests need, the Python
# Prometheus parser the metrics test checks /metrics with, redis-server (the
# shared-limits test starts its own on loopback), then the host's unit and
# end-to-end tests (which build the guests from source), the guest SDK's and
# the bundled policies' tests, a bounded smoke run of every fuzz target
# (fuzz/smoke: the targets' bodies over their seed corpus and generated
# inputs, built with the host in the same cargo invocation), the console's
# browser tests in headless Chromium, the offline checks of deploy/
# (Dockerfile, Helm chart), and the real-world suite (the OpenAI SDK as
# client, llama.cpp as backend).
#
# The setups that need no cargo output (the real-world suite's venv with
# llama-cpp-python built from source and the model; Chromium, playwright-core
# and the deploy checks' venv) run in the background from the start while
# cargo builds; a failed one shows its log and fails the run.
# Each phase prints its wall time; the total is printed at the end.
#
# The coverage-guided libFuzzer run (scripts/fuzz.sh) and the soak
# (scripts/long-run.sh) are long runs, outside this script.
set -euo pipefail
cd "$(dirname "$0")/.."

started=$(date +%s)
phase_started=$started
phase() {
  local now
  now=$(date +%s)
  echo "== test-all: $1 (phase $((now - phase_started)) s, total $((now - started)) s)"
  phase_started=$now
}

rustup target add wasm32-wasip2 wasm32-unknown-unknown
python3 -c "import prometheus_client" 2>/dev/null \
  || python3 -m pip install --quiet --disable-pip-version-check prometheus_client
# The Debian packages the cargo tests and the background setups need, in
# one apt run before anything runs in the background (two apt-get at once
# would fight over apt's lock). Chromium and Node.js come in the browser
# setup below, the only apt user from then on.
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v g++ >/dev/null || missing+=(g++)
command -v make >/dev/null || missing+=(make)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
bash scripts/apt-install.sh "${missing[@]}"
phase "setup"

# Setups that need no cargo output run in the background while cargo
# builds: each in its own process group (an early exit of this script stops
# them all), its output in a log shown if it fails; its failure fails CI.
bg_names=()
bg_pids=()
bg_logs=()
start_bg() {
  local name=$1 log
  shift
  log="$(mktemp -t "sluice-$name.XXXXXX.log")"
  setsid "$@" >"$log" 2>&1 &
  bg_names+=("$name")
  bg_pids+=("$!")
  bg_logs+=("$log")
  echo "== test-all: $name started in the background (pid $!, log $log)"
}
wait_bg() {
  local i
  for i in "${!bg_names[@]}"; do
    [ "${bg_names[$i]}" = "$1" ] || continue
    echo "== test-all: waiting for $1"
    if ! wait "${bg_pids[$i]}"; then
      echo "== test-all: $1 failed; its log:" >&2
      cat "${bg_logs[$i]}" >&2
      exit 1
    fi
    tail -n 3 "${bg_logs[$i]}"
    return 0
  done
  echo "test-all: no background job $1" >&2
  exit 1
}
stop_bg() {
  local pid
  for pid in "${bg_pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -- -"$pid" 2>/dev/null || true
    fi
  done
}
trap stop_bg EXIT
# The real-world suite's venv, llama-cpp-python built from source (the
# longest setup: niced so the cargo build keeps its cores) and the model.
start_bg real-setup nice -n 10 bash scripts/test-real.sh --setup-only
# Chromium, Node.js, playwright-core, then the deploy checks' venv: mostly
# downloads.
start_bg browser-deploy-setup bash -c 'bash scripts/test-browser.sh --setup-only && bash scripts/check-deploy.sh --setup-only'

cargo test --release -p sluice -p sluice-guest -p sensitive-words -p fallback -p sluice-fuzz-smoke
phase "cargo test (host unit + e2e, guest SDK, policies, fuzz smoke)"
wait_bg browser-deploy-setup
phase "browser and deploy setup (waited)"
bash scripts/test-browser.sh
phase "browser tests"
bash scripts/check-deploy.sh
phase "deploy checks"
wait_bg real-setup
phase "real-world suite setup (waited)"
bash scripts/test-real.sh
phase "real-world suite"

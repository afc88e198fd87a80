#!/usr/bin/env bash
# Browser tests of the operator console (tests/browser): installs Debian's
# Chromium, Node.js and npm, and playwright-core when missing, then drives the console in
# headless Chromium against the sluice binary at ${SLUICE_BIN:-target/release/sluice}
# (build it first: cargo build --release -p sluice). Screenshots of every step
# land in tests/browser/artifacts/. CONSOLE_FAKE_ADMIN=1 puts the stand-in
# admin server (tests/browser/fake-admin.mjs) in front of the gateway instead.
# --setup-only: install Chromium, Node.js and playwright-core, then stop
# (scripts/test-all.sh does this in the background while cargo builds).
set -euo pipefail
cd "$(dirname "$0")/.."

export SLUICE_BIN="$(realpath -m "${SLUICE_BIN:-target/release/sluice}")"
export CHROMIUM_BIN="${CHROMIUM_BIN:-/usr/bin/chromium}"

missing=()
[ -x "$CHROMIUM_BIN" ] || missing+=(chromium)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
bash scripts/apt-install.sh "${missing[@]}"
setup_only=0
[ "${1:-}" != "--setup-only" ] || setup_only=1
if [ "$setup_only" = 0 ] && [ ! -x "$SLUICE_BIN" ]; then
  echo "test-browser: no sluice binary at $SLUICE_BIN (cargo build --release -p sluice, or set SLUICE_BIN)" >&2
  exit 1
fi

cd tests/browser
if [ ! -d node_modules/playwright-core ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi
[ "$setup_only" = 0 ] || exit 0
rm -rf artifacts
mkdir -p artifacts
# Bounded: node's runner stops a test after 4 minutes, timeout stops everything after 8.
timeout --kill-after=10s 480s node --test --test-concurrency=1 --test-timeout=240000 console.test.mjs

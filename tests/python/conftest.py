"""Fixtures: start mock backends, fault servers, llama.cpp servers and the
gateway for one test, and stop all of them when it ends."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fault_server import FaultServer  # noqa: E402
from harness import Gateway, MockBackend, sluice_bin  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "real: needs llama.cpp and the Gemma 3 270M GGUF (scripts/test-real.sh)")
    config.addinivalue_line("markers", "needs_health: needs GET /health with per-backend state and [health_check]")


@pytest.fixture(scope="session", autouse=True)
def _sluice_binary():
    path = sluice_bin()
    if not os.access(path, os.X_OK):
        pytest.exit(f"no sluice binary at {path} (set SLUICE_BIN or build it)", returncode=2)


@pytest.fixture
def mocks(tmp_path):
    """mocks(name, models, **kw) starts a `sluice mock-backend`; all stop at the end."""
    started: list[MockBackend] = []

    def start(name: str, models: list[str], **kw) -> MockBackend:
        m = MockBackend(name, models, log_dir=tmp_path, **kw).start()
        started.append(m)
        return m

    yield start
    for m in started:
        m.stop()


@pytest.fixture
def faults():
    """faults(mode, models, **kw) starts an in-process FaultServer."""
    started: list[FaultServer] = []

    def start(mode: str, models: list[str], **kw) -> FaultServer:
        f = FaultServer(mode, models, **kw).start()
        started.append(f)
        return f

    yield start
    for f in started:
        f.stop()


@pytest.fixture
def gateway(tmp_path):
    """gateway(config_toml) starts `sluice serve` with that config."""
    started: list[Gateway] = []

    def start(config: str, **kw) -> Gateway:
        d = tmp_path / f"gw{len(started)}"
        d.mkdir()
        g = Gateway(config, d, **kw)
        started.append(g)
        return g.start()

    yield start
    for g in started:
        g.stop()


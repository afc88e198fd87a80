#!/usr/bin/env python3
"""A bounded soak of the release binary (not part of CI; run `bash scripts/soak.sh`).

For `--minutes` it keeps mixed load on Sluice (streamed and plain chat, most
of them streamed, through sensitive-words and model-router) in front of two
`sluice mock-backend`s serving one model, while
  - every `--kill-every` seconds one backend is SIGKILLed and started again
    `--down-for` seconds later on the same port (alternating the two),
  - every `--deploy-every` seconds the router is redeployed (a new version)
    over the admin API,
and samples the gateway's RSS and open file descriptors every `--sample-every`
seconds. Standard library only; everything on 127.0.0.1.

An error is *expected* only when a stream that had started was cut by a
backend SIGKILLed within the previous few seconds (nothing can save a stream
whose server died mid-answer; everything else must be retried or routed
elsewhere). Exit status 1 on any unexpected error, a failed deploy, leaked
file descriptors, RSS growth after warm-up beyond `--max-rss-growth`, or an
unclean shutdown. Results: `soak-results/soak.csv` and `soak-results/soak.md`.
"""

import argparse
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# A stream cut this soon after its backend was killed is the kill's doing.
KILL_GRACE = 5.0
# Worker pauses between requests: a steady load, not a saturation test.
THINK = (0.02, 0.12)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, proc, limit=60.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listened on {port} within {limit}s")


class Backend:
    """One `sluice mock-backend` process that can be killed and revived."""

    def __init__(self, binary, name, port, logdir):
        self.binary, self.name, self.port = binary, name, port
        self.log = open(logdir / f"{name}.log", "ab")
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            [self.binary, "mock-backend", "--listen", f"127.0.0.1:{self.port}", "--name", self.name,
             "--models", "soak", "--first-token-ms", "30", "--token-interval-ms", "15",
             "--answer-tokens", "24"],
            stdout=self.log, stderr=self.log, start_new_session=True)
        wait_listening(self.port, self.proc)

    def kill(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.ok = 0
        self.streams = 0
        self.expected = []    # (t, what)
        self.unexpected = []  # (t, what)
        self.kills = []       # monotonic times of kills
        self.deploys = 0
        self.deploy_failures = []

    def killed_recently(self, t):
        with self.lock:
            return any(0 <= t - k <= KILL_GRACE for k in self.kills)


def one_request(port, stream, stats, t0):
    body = {"model": "soak", "max_tokens": 24, "stream": stream,
            "messages": [{"role": "user", "content": "tell me about the river " + str(random.random())}]}
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    began_streaming = False
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"content-type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"status {r.status}: {r.read()[:300]!r}")
        if not stream:
            answer = json.loads(r.read())
            if not answer["choices"][0]["message"]["content"]:
                raise RuntimeError("empty answer")
        else:
            began_streaming = True
            seen_done = False
            for raw in r:
                line = raw.decode().strip()
                if line == "data: [DONE]":
                    seen_done = True
                elif line.startswith("data: ") and '"error"' in line:
                    raise RuntimeError(f"error event: {line[:300]}")
            if not seen_done:
                raise RuntimeError("stream ended without [DONE]")
        with stats.lock:
            stats.ok += 1
            stats.streams += stream
    except Exception as e:  # noqa: BLE001 - every failure is classified below
        now = time.monotonic()
        what = f"{'stream' if stream else 'plain'} at {started - t0:.1f}s: {e}"
        expected = stream and began_streaming and stats.killed_recently(now)
        with stats.lock:
            (stats.expected if expected else stats.unexpected).append((now - t0, what))
    finally:
        conn.close()


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def deploy(admin_port, token, module, n):
    # A new alias per deploy makes each one a new version.
    config = json.dumps({"aliases": {f"soak-alias-{n}": "soak"}})
    conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=30)
    try:
        conn.request("PUT", "/admin/policies/router?config=" + urlquote(config), module,
                     {"authorization": f"Bearer {token}", "content-type": "application/wasm"})
        r = conn.getresponse()
        text = r.read()
        return r.status, text[:300]
    finally:
        conn.close()


def urlquote(text):
    from urllib.parse import quote
    return quote(text, safe="")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--binary", default=str(ROOT / "target/release/sluice"))
    ap.add_argument("--router", default=str(ROOT / "target/guests/wasm32-wasip2/guest/model_router.wasm"))
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--kill-every", type=float, default=180)
    ap.add_argument("--down-for", type=float, default=20)
    ap.add_argument("--deploy-every", type=float, default=60)
    ap.add_argument("--sample-every", type=float, default=10)
    ap.add_argument("--warmup", type=float, default=120, help="seconds before the RSS baseline")
    ap.add_argument("--max-rss-growth", type=float, default=0.15)
    ap.add_argument("--out", default=str(ROOT / "soak-results"))
    a = ap.parse_args()

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sluice-soak-"))
    module = Path(a.router).read_bytes()
    token = "soak-admin-token"
    ports = {"vm01": free_port(), "vm02": free_port()}
    backends = {n: Backend(a.binary, n, p, work) for n, p in ports.items()}
    for b in backends.values():
        b.start()
    listen, admin = free_port(), free_port()
    (work / "sluice.toml").write_text(f"""
[server]
shutdown_timeout = "20s"
unready_delay = "0s"
[health_check]
interval = "1s"
timeout = "500ms"
[usage]
database = "{work / 'usage.db'}"
[policy_store]
state_dir = "{work / 'state'}"
[[policies]]
name = "words"
module = "builtin:sensitive-words"
config = {{ words = ["leak", "secret-plan", "机密"], action = "mask" }}
[[policies]]
name = "router"
module = "builtin:model-router"
[[backends]]
name = "vm01"
url = "http://127.0.0.1:{ports['vm01']}"
models = ["soak"]
max_concurrent_requests = 16
[[backends]]
name = "vm02"
url = "http://127.0.0.1:{ports['vm02']}"
models = ["soak"]
max_concurrent_requests = 16
""")
    gateway_log = open(work / "sluice.log", "ab")
    env = dict(os.environ, SLUICE_ADMIN_TOKEN=token, RUST_LOG="warn")
    gateway = subprocess.Popen(
        [a.binary, "serve", "--listen", f"127.0.0.1:{listen}", "--admin-listen", f"127.0.0.1:{admin}",
         "--config", str(work / "sluice.toml")],
        stdout=gateway_log, stderr=gateway_log, env=env, start_new_session=True)
    wait_listening(listen, gateway)
    wait_listening(admin, gateway)
    print(f"soak: {a.minutes} min, {a.workers} workers, gateway pid {gateway.pid}, work dir {work}",
          flush=True)

    stats = Stats()
    t0 = time.monotonic()
    end = t0 + a.minutes * 60
    stop = threading.Event()

    def worker(i):
        rng = random.Random(i)
        while not stop.is_set() and time.monotonic() < end:
            one_request(listen, rng.random() < 0.7, stats, t0)
            time.sleep(rng.uniform(*THINK))

    def chaos():
        next_kill = t0 + a.kill_every
        next_deploy = t0 + a.deploy_every
        victims = ["vm02", "vm01"]
        while not stop.is_set() and time.monotonic() < end:
            now = time.monotonic()
            if now >= next_kill:
                victim = backends[victims[len(stats.kills) % 2]]
                # Noted before the kill: a stream it cuts may fail at once.
                with stats.lock:
                    stats.kills.append(time.monotonic())
                victim.kill()
                print(f"  {now - t0:7.1f}s killed {victim.name}", flush=True)
                stop.wait(a.down_for)
                victim.start()
                print(f"  {time.monotonic() - t0:7.1f}s revived {victim.name}", flush=True)
                next_kill += a.kill_every
            if now >= next_deploy:
                status, text = deploy(admin, token, module, stats.deploys + 1)
                with stats.lock:
                    stats.deploys += 1
                    if status not in (200, 201):
                        stats.deploy_failures.append(f"{now - t0:.1f}s: {status} {text!r}")
                next_deploy += a.deploy_every
            stop.wait(0.5)

    samples = []

    def sampler():
        while not stop.is_set():
            t = time.monotonic() - t0
            with stats.lock:
                row = (round(t), rss_kib(gateway.pid), open_fds(gateway.pid), stats.ok,
                       len(stats.expected), len(stats.unexpected), stats.deploys, len(stats.kills))
            samples.append(row)
            print(f"  {row[0]:6d}s rss {row[1] / 1024:6.1f} MiB fds {row[2]:4d} ok {row[3]:7d} "
                  f"expected {row[4]:3d} unexpected {row[5]:3d} deploys {row[6]:3d} kills {row[7]:2d}",
                  flush=True)
            if time.monotonic() >= end:
                return
            stop.wait(a.sample_every)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(a.workers)]
    threads += [threading.Thread(target=chaos, daemon=True), threading.Thread(target=sampler, daemon=True)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join(timeout=max(0.0, end - time.monotonic()) + 60)
    except KeyboardInterrupt:
        print("soak: interrupted", flush=True)
    stop.set()
    # Quiet gateway: every connection closed, backends steady.
    time.sleep(3)
    final_fds = open_fds(gateway.pid)
    final_rss = rss_kib(gateway.pid)
    gateway.send_signal(signal.SIGTERM)
    try:
        exit_code = gateway.wait(timeout=60)
    except subprocess.TimeoutExpired:
        gateway.kill()
        exit_code = "hung"
    for b in backends.values():
        b.kill()

    with open(out / "soak.csv", "w") as f:
        f.write("seconds,rss_kib,open_fds,ok,expected_errors,unexpected_errors,deploys,kills\n")
        for row in samples:
            f.write(",".join(map(str, row)) + "\n")
    after_warmup = [s for s in samples if s[0] >= a.warmup] or samples
    baseline = after_warmup[0][1]
    peak = max(s[1] for s in after_warmup)
    growth = (final_rss - baseline) / baseline if baseline else 0.0
    fd_start = samples[0][2] if samples else 0
    failures = []
    if stats.unexpected:
        failures.append(f"{len(stats.unexpected)} unexpected errors")
    if stats.deploy_failures:
        failures.append(f"{len(stats.deploy_failures)} failed deploys")
    # Pooled keep-alive connections to the backends come and go with the
    # load; a leak shows as the idle count at the end climbing past the
    # lowest count seen under load after warm-up.
    fd_floor = min(s[2] for s in after_warmup)
    if final_fds > fd_floor + 8:
        failures.append(f"open fds: at least {fd_floor} under load after warm-up, {final_fds} when idle at the end")
    if growth > a.max_rss_growth:
        failures.append(f"RSS grew {growth:.0%} after warm-up (limit {a.max_rss_growth:.0%})")
    if exit_code != 0:
        failures.append(f"gateway exit status on SIGTERM: {exit_code}")

    lines = [
        f"Soak: {a.minutes:g} min, {a.workers} workers (70% streamed), a backend SIGKILLed every "
        f"{a.kill_every:g} s for {a.down_for:g} s, the router redeployed every {a.deploy_every:g} s.",
        "",
        f"- requests answered whole: {stats.ok} ({stats.streams} streams)",
        f"- streams cut by a SIGKILLed backend (expected): {len(stats.expected)}",
        f"- unexpected errors: {len(stats.unexpected)}",
        f"- deploys: {stats.deploys} ({len(stats.deploy_failures)} failed); kills: {len(stats.kills)}",
        f"- RSS after {a.warmup:g} s warm-up {baseline / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB, "
        f"idle at the end {final_rss / 1024:.1f} MiB ({growth:+.1%})",
        f"- open fds: {fd_start} before any request, {fd_floor}–{max(s[2] for s in after_warmup)} under load "
        f"after warm-up, {final_fds} idle at the end",
        f"- exit status on SIGTERM: {exit_code}",
        "",
        "| minute | RSS MiB | open fds | answered |",
        "|---:|---:|---:|---:|",
    ]
    for s in samples:
        if s[0] % 60 < a.sample_every or s is samples[-1]:
            lines.append(f"| {s[0] / 60:.1f} | {s[1] / 1024:.1f} | {s[2]} | {s[3]} |")
    for t, what in stats.unexpected[:20]:
        lines.append(f"\nunexpected: {what}")
    for what in stats.deploy_failures[:10]:
        lines.append(f"\nfailed deploy: {what}")
    lines.append("")
    lines.append("PASS" if not failures else "FAIL: " + "; ".join(failures))
    report = "\n".join(lines)
    (out / "soak.md").write_text(report + "\n")
    print(report, flush=True)
    print(f"soak: results in {out}/, logs in {work}/", flush=True)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""What scraping the engines' metrics costs the request path (issue 22).

    python3 bench/scrape_cost.py          # 4 setups × 2 rounds × 20 s (~4 min)

The same load (wrk, one thread, 32 connections, non-streamed chat requests
answered at once by two `sluice mock-backend --engine vllm`) through the
gateway in four setups, interleaved over two rounds so drift shows as
spread, not as a difference:

- `no engine`: nothing scraped (the backends have no `engine`);
- `vllm, 50 ms`: both engines scraped every 50 ms (5× the default rate);
- `hanging, 50 ms`: both backends' `metrics_url` point at an endpoint that
  accepts and never answers (every scrape runs into its 1 s timeout);
- `garbage, 50 ms`: the endpoint answers 200 with HTML.

Reports requests/s and latency percentiles per setup. Only 127.0.0.1;
everything started here is stopped by pid.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prefix import Processes, log, sluice_binary  # noqa: E402

MODEL = "bench-model"
SETUPS = ["no engine", "vllm, 50 ms", "hanging, 50 ms", "garbage, 50 ms"]
SECONDS = 20
CONNECTIONS = 32

WRK_LUA = r"""
wrk.method = "POST"
wrk.body = '{"model":"bench-model","messages":[{"role":"user","content":"Say hi."}],"max_tokens":16}'
wrk.headers["Content-Type"] = "application/json"
function done(summary, latency, requests)
  io.write(string.format('WRKJSON {"requests":%d,"duration_us":%d,"errors":%d,"p50":%d,"p90":%d,"p99":%d}\n',
    summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status + summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""


class BadMetrics:
    """A metrics endpoint that hangs (`/hang`) or answers HTML (`/garbage`)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.one, args=(conn,), daemon=True).start()

    def one(self, conn: socket.socket):
        try:
            request = conn.recv(4096)
            if b"/hang" in request.split(b"\r\n", 1)[0]:
                self.held.append(conn)  # never answered; closed by the scraper's timeout
                return
            body = b"<html><body>502 Bad Gateway</body></html>\n"
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            conn.close()
        except OSError:
            pass


def config(setup: str, listen: int, admin: int, state: Path, backends: list[tuple[str, int]],
           bad: BadMetrics) -> str:
    lines = [
        "[server]", f'listen = "127.0.0.1:{listen}"', f'admin_listen = "127.0.0.1:{admin}"',
        'reload_interval = "0s"', "[usage]", "disabled = true", "access_log = false",
        "[policy_store]", f'state_dir = "{state}"',
        "[engine_metrics]", 'interval = "50ms"', 'timeout = "1s"',
    ]
    for name, port in backends:
        lines += ["[[backends]]", f'name = "{name}"', f'url = "http://127.0.0.1:{port}"',
                  f'models = ["{MODEL}"]']
        if setup != "no engine":
            lines.append('engine = "vllm"')
        if setup.startswith("hanging"):
            lines.append(f'metrics_url = "http://127.0.0.1:{bad.port}/hang"')
        elif setup.startswith("garbage"):
            lines.append(f'metrics_url = "http://127.0.0.1:{bad.port}/garbage"')
    return "\n".join(lines) + "\n"


def run(binary: Path, setup: str, work: Path, lua: Path, bad: BadMetrics) -> dict:
    procs = Processes()
    try:
        backends = procs.mocks(binary, work, 2, ["--engine", "vllm"])
        label = setup.split(",")[0].replace(" ", "-")
        listen, admin = procs.gateway(binary, work, label,
                                      lambda listen, admin, state: config(setup, listen, admin, state, backends, bad))
        time.sleep(1.0)  # a few scrape rounds before the load
        url = f"http://127.0.0.1:{listen}/v1/chat/completions"
        subprocess.run(["wrk", "-t1", f"-c{CONNECTIONS}", "-d3s", "-s", str(lua), url],
                       capture_output=True, timeout=60)  # warm-up
        r = subprocess.run(["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{SECONDS}s", "--timeout", "10s", "-s", str(lua), url],
                           capture_output=True, text=True, timeout=SECONDS + 60)
        line = next((x for x in r.stdout.splitlines() if x.startswith("WRKJSON ")), None)
        if line is None:
            raise RuntimeError(f"wrk gave no summary: {r.stdout[-300:]} {r.stderr[-300:]}")
        d = json.loads(line[8:])
        # What the gateway made of the engines meanwhile (fresh, unknown, …).
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/health", timeout=5) as response:
            health = json.loads(response.read())
        engine = (health["backends"][0].get("engine") or {}).get("status", "none")
        return {"setup": setup, "rps": d["requests"] / (d["duration_us"] / 1e6), "errors": d["errors"],
                "p50_ms": d["p50"] / 1000, "p90_ms": d["p90"] / 1000, "p99_ms": d["p99"] / 1000,
                "engine": engine}
    finally:
        procs.stop_all()


def main() -> int:
    binary = sluice_binary()
    work = Path(tempfile.mkdtemp(prefix="sluice-scrape-bench-"))
    lua = work / "post.lua"
    lua.write_text(WRK_LUA)
    bad = BadMetrics()
    rows = []
    for round_ in (1, 2):
        for setup in SETUPS:
            log(f"round {round_}: {setup}")
            row = run(binary, setup, work, lua, bad)
            row["round"] = round_
            log(f"  {row['rps']:.0f} req/s, p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, errors {row['errors']}")
            rows.append(row)
    print("| setup | round | requests/s | p50 (ms) | p90 (ms) | p99 (ms) | errors | engine status |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (SETUPS.index(r["setup"]), r["round"])):
        print(f"| {r['setup']} | {r['round']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
              f"{r['p99_ms']:.2f} | {r['errors']} | {r['engine']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The cache-aware routing benchmark (issue 22): a shared-prefix workload
(`prefix_workload.py`) against simulated engines, through Sluice routing
three ways, at rising request rates.

    python3 bench/prefix.py            # full run (~12 min): the table for BENCHMARKS.md
    python3 bench/prefix.py --quick    # two rates, short (~4 min)
    python3 bench/prefix.py --arms sluice --scoring 'affinity_slack = 2.0'   # try scorer keys

The engines are `sluice mock-backend --engine vllm` (host/src/tools/
mock_engine.rs): a KV cache of `--kv-blocks` blocks of 16 tokens (words)
that remembers prompt prefixes (LRU), prefill time per uncached token, one
prefill at a time (compute-bound), decode at a set pace, and vLLM's
`/metrics`. The arms, each on fresh engines and a fresh gateway per rate:

- `round-robin`: what nginx or a Kubernetes Service does. The client names
  the backend of each request in turn (`x-pin-backend`) and the
  `pin-backend` test policy routes there, so every arm pays the same
  gateway.
- `least-load`: the bundled router as it was before engine signals: no
  `engine` on the backends, `scoring.prefix_affinity = false` (weighted
  draw on the gateway's in-flight counts).
- `sluice`: the bundled router with its defaults and `engine = "vllm"` on
  every backend: engine queue and KV-cache use, prefix affinity bounded by
  load and by each backend's share of the recent traffic.

Per rate: TTFT p50/p90 (client-side, first content token of a stream),
output tokens/s, the engines' own prefix-cache hit rate (vLLM's
`prefix_cache_hits_total / prefix_cache_queries_total`, summed), the
busiest backend's requests over the mean, and how many backends each
tenant's requests went to (1: its prefix lives in one cache). Arrivals are
open-loop over a fixed set of conversations: when every conversation is
waiting for an answer, an arrival is lost and counts as a failed request. Only 127.0.0.1; every process
started here is stopped by pid; every load is bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prefix_workload import Workload, run_rate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = "bench-model"
ARMS = ["round-robin", "least-load", "sluice"]

# The simulated fleet. Tokens are words: a tenant's system prompt is ~860
# tokens (54 blocks), so the 24 tenants' prompts need ~1,300 blocks — more
# than one engine's 600, less than the four engines' 2,400: an engine can
# keep its share of the tenants cached, not all of them.
ENGINE = {
    "backends": 4,
    "kv_blocks": 600,
    "prefill_us_per_token": 300,
    "token_interval_ms": 15,
    "max_batch": 64,
}
WORKLOAD = Workload(tenants=24, conversations_per_tenant=6, turns=4,
                    system_chars=6000, user_chars=300, max_tokens=32)
# `--scoring`: the sluice arm's scorer keys, as TOML (defaults when empty).
SCORING = ""
# `--index-capacity`: `[prefix_cache] capacity` (blocks per backend).
INDEX_CAPACITY = 0
# "Sustainable": no failed request and TTFT p90 under this.
SLO_P90_S = 2.0


def log(*parts):
    print(time.strftime("[%H:%M:%S]"), *parts, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up in {timeout} s")


class Processes:
    """Everything this run started, stopped by pid on exit."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], log_path: Path) -> subprocess.Popen:
        out = open(log_path, "wb")
        p = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def mocks(self, binary: Path, work: Path, count: int, extra: list[str]) -> list[tuple[str, int]]:
        """Starts `count` simulated backends (vm01, vm02, …) serving MODEL
        with `extra` flags; returns their names and ports once they answer."""
        backends = []
        for i in range(count):
            name, port = f"vm{i + 1:02}", free_port()
            self.start([str(binary), "mock-backend", "--listen", f"127.0.0.1:{port}", "--name", name,
                        "--models", MODEL, *extra], work / f"{name}.log")
            backends.append((name, port))
        for _, port in backends:
            wait_http(f"http://127.0.0.1:{port}/v1/models")
        return backends

    def gateway(self, binary: Path, work: Path, label: str, toml_of) -> tuple[int, int]:
        """Starts `sluice serve` on the config `toml_of(listen, admin,
        state_dir)`; returns its data and admin ports once it is ready."""
        listen, admin = free_port(), free_port()
        state = Path(tempfile.mkdtemp(prefix=f"state-{label}-", dir=work))
        config = work / f"sluice-{label}.toml"
        config.write_text(toml_of(listen, admin, state))
        self.start([str(binary), "serve", "--config", str(config)], work / f"sluice-{label}.log")
        wait_http(f"http://127.0.0.1:{listen}/ready")
        return listen, admin

    def stop_all(self):
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()


def sluice_binary() -> Path:
    given = os.environ.get("SLUICE_BIN")
    if given:
        return Path(given)
    log("building sluice (release)")
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "sluice"], cwd=ROOT, check=True)
    return ROOT / "target" / "release" / "sluice"


def pin_backend_wasm() -> Path:
    path = ROOT / "target" / "guests" / "wasm32-wasip2" / "guest" / "pin_backend.wasm"
    if not path.exists():
        raise RuntimeError(f"{path} is missing: the host's build script builds it (cargo build -p sluice)")
    return path


def engine_counters(url: str) -> tuple[float, float]:
    """(prefix-cache hit tokens, queried tokens) from one engine's /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    hits = queries = 0.0
    for line in text.splitlines():
        if line.startswith("vllm:prefix_cache_hits_total"):
            hits += float(line.rsplit(" ", 1)[1])
        elif line.startswith("vllm:prefix_cache_queries_total"):
            queries += float(line.rsplit(" ", 1)[1])
    return hits, queries


def config_toml(arm: str, listen: int, admin: int, state: Path, backends: list[tuple[str, int]]) -> str:
    lines = [
        "[server]",
        f'listen = "127.0.0.1:{listen}"',
        f'admin_listen = "127.0.0.1:{admin}"',
        'response_timeout = "300s"',
        "max_queue = 8192",
        'queue_timeout = "300s"',
        'reload_interval = "0s"',
        "[usage]",
        "disabled = true",
        "access_log = false",
        "[policy_store]",
        f'state_dir = "{state}"',
        "[engine_metrics]",
        'interval = "250ms"',
    ]
    if INDEX_CAPACITY:
        lines += ["[prefix_cache]", f"capacity = {INDEX_CAPACITY}"]
    for name, port in backends:
        lines += [
            "[[backends]]",
            f'name = "{name}"',
            f'url = "http://127.0.0.1:{port}"',
            f'models = ["{MODEL}"]',
        ]
        if arm == "sluice":
            lines.append('engine = "vllm"')
    lines += ["[[policies]]", 'name = "router"']
    if arm == "round-robin":
        lines += [f'module = "{pin_backend_wasm()}"', f'config = {{ default = "{backends[0][0]}" }}']
    elif arm == "least-load":
        lines += ['module = "builtin:model-router"', "config = { scoring = { prefix_affinity = false } }"]
    else:
        lines += ['module = "builtin:model-router"']
        if SCORING:
            lines.append(f"config = {{ scoring = {{ {SCORING} }} }}")
    return "\n".join(lines) + "\n"


def run_one(binary: Path, arm: str, rate: float, duration: float, work: Path) -> dict:
    procs = Processes()
    try:
        backends = procs.mocks(binary, work, ENGINE["backends"], [
            "--engine", "vllm",
            "--kv-blocks", str(ENGINE["kv_blocks"]),
            "--prefill-us-per-token", str(ENGINE["prefill_us_per_token"]),
            "--token-interval-ms", str(ENGINE["token_interval_ms"]),
            "--max-batch", str(ENGINE["max_batch"]),
            "--answer-tokens", str(WORKLOAD.max_tokens),
        ])
        listen, _ = procs.gateway(binary, work, arm,
                                  lambda listen, admin, state: config_toml(arm, listen, admin, state, backends))
        names = [n for n, _ in backends]
        headers_for = (lambda n: {"x-pin-backend": names[n % len(names)]}) if arm == "round-robin" else None
        result = run_rate(f"http://127.0.0.1:{listen}", MODEL, rate, duration, WORKLOAD,
                          timeout_s=120.0, headers_for=headers_for)
        hits = queries = 0.0
        for _, port in backends:
            h, q = engine_counters(f"http://127.0.0.1:{port}")
            hits, queries = hits + h, queries + q
        summary = result.summary()
        summary["arm"] = arm
        summary["prefix_hit_rate"] = hits / queries if queries else None
        return summary
    finally:
        procs.stop_all()


def fmt(value, spec, missing="—"):
    return missing if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    out = [
        "| rate (req/s) | router | ok / sent | TTFT p50 (s) | TTFT p90 (s) | output tok/s | engine prefix hit rate | busiest / mean | backends per tenant |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['rate']:g} | {r['arm']} | {r['ok']} / {r['sent']} | {fmt(r['ttft_p50_s'], '.2f')} | "
            f"{fmt(r['ttft_p90_s'], '.2f')} | {r['output_tokens_per_s']:.0f} | "
            f"{fmt(r['prefix_hit_rate'], '.0%')} | {fmt(r['max_over_mean_load'], '.2f')} | "
            f"{fmt(r.get('backends_per_tenant'), '.1f')} |"
        )
    return "\n".join(out)


def sustainable(rows: list[dict], arm: str) -> dict | None:
    ok = [r for r in rows if r["arm"] == arm and r["errors"] == 0
          and r["ttft_p90_s"] is not None and r["ttft_p90_s"] <= SLO_P90_S]
    return max(ok, key=lambda r: r["rate"]) if ok else None


def verdict(rows: list[dict]) -> str:
    best = sustainable(rows, "sluice")
    if best is None:
        return "The sluice arm sustained none of the rates (TTFT p90 under the SLO, no errors)."
    rate = best["rate"]
    base = next((r for r in rows if r["arm"] == "least-load" and r["rate"] == rate), None)
    lines = [f"Highest rate the sluice arm sustains (no errors, TTFT p90 ≤ {SLO_P90_S:g} s): **{rate:g} req/s**."]
    if base and base["ttft_p90_s"] and best["ttft_p90_s"]:
        ttft = base["ttft_p90_s"] / best["ttft_p90_s"]
        tokens = best["output_tokens_per_s"] / base["output_tokens_per_s"] if base["output_tokens_per_s"] else None
        lines.append(f"- TTFT p90 against least-load: {base['ttft_p90_s']:.2f} s / {best['ttft_p90_s']:.2f} s = "
                     f"**{ttft:.1f}×** lower (target ≥ 5×: {'met' if ttft >= 5 else 'not met'}).")
        if tokens is not None:
            lines.append(f"- Output tokens/s against least-load: **{tokens:.2f}×** "
                         f"(target ≥ 1.3×: {'met' if tokens >= 1.3 else 'not met'}).")
    balance = best["max_over_mean_load"]
    if balance is not None:
        lines.append(f"- Busiest backend over the mean: **{balance:.2f}** "
                     f"(target ≤ 1.5: {'met' if balance <= 1.5 else 'not met'}).")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two rates, 15 s each")
    parser.add_argument("--rates", help="comma-separated request rates (req/s)")
    parser.add_argument("--duration", type=float, help="seconds of arrivals per rate")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"some of {','.join(ARMS)}")
    parser.add_argument("--scoring", default="",
                        help="the sluice arm's scoring keys as inline TOML, e.g. 'affinity_balance = 0.5'")
    parser.add_argument("--index-capacity", type=int, default=0,
                        help="[prefix_cache] capacity for the gateway (default: the gateway's default)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "prefix-results.json"))
    args = parser.parse_args()
    global SCORING, INDEX_CAPACITY
    SCORING = args.scoring
    INDEX_CAPACITY = args.index_capacity
    rates = [float(r) for r in args.rates.split(",")] if args.rates else (
        [10.0, 30.0] if args.quick else [10.0, 20.0, 30.0, 40.0])
    duration = args.duration or (15.0 if args.quick else 30.0)
    arms = [a for a in args.arms.split(",") if a]
    unknown = set(arms) - set(ARMS)
    if unknown:
        parser.error(f"unknown arms: {', '.join(sorted(unknown))}")
    binary = sluice_binary()
    work = Path(tempfile.mkdtemp(prefix="sluice-prefix-bench-"))
    log(f"work directory {work}")
    rows = []
    for rate in rates:
        for arm in arms:
            log(f"{arm} at {rate:g} req/s for {duration:g} s")
            row = run_one(binary, arm, rate, duration, work)
            log(f"  ok {row['ok']}/{row['sent']}, TTFT p90 {fmt(row['ttft_p90_s'], '.2f')} s, "
                f"hit rate {fmt(row['prefix_hit_rate'], '.0%')}, busiest/mean {fmt(row['max_over_mean_load'], '.2f')}")
            rows.append(row)
    Path(args.out).write_text(json.dumps({"engine": ENGINE, "workload": vars(WORKLOAD), "duration_s": duration,
                                          "rows": rows}, indent=1))
    print(table(rows))
    print()
    print(verdict(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

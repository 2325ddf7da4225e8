"""A scripted chat-completions server on loopback, for tests, the API-path benchmark and notebook 03 (paper §3).

It speaks enough of the OpenAI chat-completions protocol for the real `openai` client
(`POST .../chat/completions`, also Azure's `/openai/deployments/<name>/chat/completions?api-version=`),
so the client's own request building, error mapping and timeouts are exercised, not mocked.

`responder(body, n)` decides each answer (n counts requests from 0) and returns a `Reply`: text with a
finish reason, an HTTP error status, a refusal, or a delay longer than the client's timeout. The server
keeps the request bodies it saw, and of the key header only its sha256 (never the key itself).
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


@dataclass
class Reply:
    text: str | None = ""
    finish_reason: str = "stop"
    status: int = 200
    refusal: str | None = None
    delay: float = 0.0
    retry_after: str | None = None


def ok(text: str) -> Reply:
    return Reply(text=text)


class ChatServer:
    """`with ChatServer(responder, latency=0.0) as srv: srv.base_url` -> 'http://127.0.0.1:PORT/v1'."""

    def __init__(self, responder: Callable[[dict, int], Reply], latency: float = 0.0):
        self.responder = responder
        self.latency = latency
        self.bodies: list[dict] = []
        self.paths: list[str] = []
        self.auth_sha256: list[str] = []  # sha256 of each Authorization / api-key header, never the header
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def calls(self) -> int:
        return len(self.bodies)

    def start(self) -> "ChatServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "ChatServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body leave at once (no 40 ms delayed-ACK stall)

            def do_POST(self):  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("content-length", 0) or 0))
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    return self._send(400, {"error": {"message": "invalid JSON", "type": "invalid_request_error"}})
                if not self.path.split("?")[0].endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                auth = self.headers.get("authorization") or self.headers.get("api-key") or ""
                with server._lock:
                    n = len(server.bodies)
                    server.bodies.append(body)
                    server.paths.append(self.path)
                    server.auth_sha256.append(hashlib.sha256(auth.encode()).hexdigest())
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    reply = server.responder(body, n)
                    wait = reply.delay + server.latency
                    if wait:
                        time.sleep(wait)
                finally:
                    with server._lock:
                        server.in_flight -= 1
                if reply.status != 200:
                    headers = {"retry-after": reply.retry_after} if reply.retry_after else {}
                    return self._send(reply.status, {"error": {"message": f"scripted HTTP {reply.status}",
                                                              "type": "server_error"}}, headers)
                msg = {"role": "assistant", "content": reply.text, "refusal": reply.refusal}
                self._send(200, {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": 0,
                                 "model": body.get("model", ""),
                                 "choices": [{"index": 0, "finish_reason": reply.finish_reason, "message": msg,
                                              "logprobs": None}],
                                 "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}})

            def _send(self, status: int, obj: dict, headers: dict | None = None):
                data = json.dumps(obj).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

            def log_message(self, *a):
                pass

        return Handler

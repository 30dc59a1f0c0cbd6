"""A tiny OpenAI-compatible chat completions server for the tests of the ``openai-vlm``
environment: stdlib ``http.server`` on 127.0.0.1 in a thread, recording every request.

It answers like a model that copies its last demonstration's answer (the text after the
last ``Short answer:`` that has one), with one log-probability per answer of ln(0.8).
``script`` (a list consumed one request at a time, then ``mode``) makes it fail:
``"status:503"``, ``"nonjson"``, ``"nochoices"``, ``"empty"``, ``"long"``,
``"nologprobs"``, ``"slow"`` (sleeps ``delay`` seconds first).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LOGPROB = math.log(0.8)


class FakeVLM:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.mode = "ok"
        self.script: list[str] = []
        self.delay = 2.0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                size = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(size) or b"{}")
                with fake.lock:
                    fake.requests.append(body)
                    fake.headers.append({k.lower(): v for k, v in self.headers.items()})
                    mode = fake.script.pop(0) if fake.script else fake.mode
                if self.path != "/v1/chat/completions":
                    return self.send(404, {"error": {"message": f"no route {self.path}"}})
                fake.respond(self, mode, body)

            def send(self, code: int, doc: Any, raw: bytes | None = None) -> None:
                data = raw if raw is not None else json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # many requests in flight at once
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def start(self) -> FakeVLM:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def copied_answer(body: dict[str, Any]) -> str:
        parts = body["messages"][-1]["content"]
        text = "".join(p.get("text", "") for p in parts if p["type"] == "text")
        found = [a.strip() for a in re.findall(r"Short answer:([^\n]*)\n", text)]
        return found[-1] if found else "nothing"

    def respond(self, handler: Any, mode: str, body: dict[str, Any]) -> None:
        if mode.startswith("status:"):
            code = int(mode.split(":")[1])
            message = {
                400: "This model's maximum context length is 4096 tokens. However, you requested 9000 tokens",
                413: "image too large",
                429: "rate limit reached",
                503: "server busy",
            }.get(code, "failure")
            return handler.send(code, {"error": {"message": message, "code": code}})
        if mode == "nonjson":
            return handler.send(200, None, b"<html>proxy error</html>")
        if mode == "nochoices":
            return handler.send(200, {"object": "chat.completion", "choices": []})
        if mode == "slow":
            time.sleep(self.delay)
        answer = self.copied_answer(body)
        finish = "stop"
        if mode == "empty":
            answer = ""
        if mode == "long":
            answer, finish = "word " * 3000, "length"
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": answer},
            "finish_reason": finish,
        }
        if body.get("logprobs") and mode != "nologprobs":
            tokens = [{"token": answer, "logprob": LOGPROB, "top_logprobs": []}] if answer else []
            choice["logprobs"] = {"content": tokens}
        handler.send(200, {"id": "x", "object": "chat.completion", "choices": [choice]})

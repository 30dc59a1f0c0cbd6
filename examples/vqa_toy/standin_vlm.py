"""A stand-in for a vision-language model behind an OpenAI-compatible API, for the toy task.

    python examples/vqa_toy/standin_vlm.py --manifest TASK/manifest.jsonl [--port 8000]

Serves ``POST /v1/chat/completions`` and ``GET /v1/models`` on 127.0.0.1 (standard
library only: :class:`http.server.ThreadingHTTPServer`, one thread per connection), and
``GET /stats`` (chat requests so far, and their answers by HTTP status). It stands in for
a real model served by vLLM or SGLang so that the whole path -- prompt with base64 images, answer,
VQA accuracy, log-probabilities -- runs in a test on a laptop, deterministically.

**How it answers.** It recognises each image of the request by the SHA-256 of its bytes
(a ``data:`` URL; an ``http(s)`` URL is matched as written in the manifest) and looks the
item up in the task's manifest (``make_task.py`` writes the hidden fields it reads:
``question_type``, ``shape``, ``colour``, ``count``, ``background``). The last image is
the query, the ones before it the demonstrations, in order. The text of the prompt is not
read, so any prompt template works.

A demonstration *supports* the query when it asks the same type of question; its
support is 1 for a clear picture and 0.25 for a murky one, times 0.5 for each place it
stands before the last (the last demonstration weighs most, as real models weigh the
most recent example most). The model answers correctly when the summed support reaches
what the query needs -- 0.5 for a clear query picture, 1.0 for a murky one (for S = 2: a
murky query is answered only with a clear demonstration of its question type in the
last place) -- and otherwise copies the most common answer of its last demonstration, a
failure real models show. Cosine similarity of picture embeddings prefers look-alikes,
which for a murky query are murky demonstrations: a selector that learns which
demonstrations help has room above cosine top-S.

**Log-probabilities** (when the request asks with ``"logprobs": true`` and the server was
not started with ``--no-logprobs``): one token per answer word; the first token's
distribution is a softmax over the answers of the question's type, with logit
``4 * (support - need)`` for the true answer, 0 for the copied one and -3 for the rest,
so the probability of the true answer grows with the support.

**Faults**, for testing a client: ``--fault MODE`` makes the requests chosen by
``--fault-first N`` (the first N), ``--fault-every N`` (every N-th) or ``--fault-query
ID`` (those whose query is item ID) -- all requests when none is given -- fail as MODE
says: ``slow`` (waits ``--fault-delay`` seconds more), ``drop`` (closes the connection
without an answer), ``non-json`` (a 200 with an HTML body), ``malformed`` (JSON without
``choices``), ``empty`` (an empty answer), ``long`` (an answer that runs to
``max_tokens``, ``finish_reason: "length"``), ``context-too-long`` and
``image-too-large`` (400, in vLLM's error format), ``rate-limit`` (429) and
``server-error`` (500). ``--max-context`` and ``--max-image-bytes`` refuse real requests
over those limits the same way. ``--latency`` delays every answer.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import math
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

#: weight of a demonstration one place further from the end
DECAY = 0.5
#: support of a same-type demonstration, by its picture's background
SUPPORT = {"clear": 1.0, "murky": 0.25}
#: support a query needs to be answered correctly, by its picture's background
NEED = {"clear": 0.5, "murky": 1.0}
#: logits of the answer distribution (see the module docstring)
TRUE_SCALE, COPY_LOGIT, OTHER_LOGIT = 4.0, 0.0, -3.0
#: pseudo-tokens an image costs in the prompt (for usage and --max-context)
IMAGE_TOKENS = 64
VALUES = {
    "colour": ("red", "green", "blue", "yellow"),
    "shape": ("circle", "square", "triangle"),
    "count": ("1", "2", "3"),
}
FAULTS = (
    "slow",
    "drop",
    "non-json",
    "malformed",
    "empty",
    "long",
    "context-too-long",
    "image-too-large",
    "rate-limit",
    "server-error",
)
HIDDEN_FIELDS = ("question_type", "shape", "colour", "count", "background")


class StandinError(Exception):
    """A request the stand-in refuses: HTTP status and message."""

    def __init__(self, status: int, message: str, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


@dataclass(frozen=True)
class ToyItem:
    """What the stand-in knows of one manifest item."""

    id: int
    question_type: str
    truth: str
    background: str
    #: the most common of the item's human answers (what a demonstration shows)
    shown_answer: str


@dataclass(frozen=True)
class Reply:
    """The stand-in's answer to one query with its demonstrations."""

    answer: str
    support: float
    need: float
    #: (answer, probability) of the first answer token, most likely first
    distribution: tuple[tuple[str, float], ...]


def _most_common(answers: Sequence[str]) -> str:
    counts = Counter(answers)
    # ties: the answer seen first
    return max(answers, key=lambda a: counts[a]) if answers else ""


def load_items(manifest: Path) -> tuple[dict[int, ToyItem], dict[str, int]]:
    """The toy task's items by id, and each image's key (SHA-256 of a local file, or the
    URL as written) -> item id. A manifest line without the hidden fields of
    ``make_task.py`` is a ``ValueError`` naming the line."""
    items: dict[int, ToyItem] = {}
    images: dict[str, int] = {}
    folder = manifest.resolve().parent
    with open(manifest, encoding="utf-8") as fh:
        for number, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            obj = json.loads(text)
            missing = [f for f in ("id", "image", "answers", *HIDDEN_FIELDS) if f not in obj]
            if missing:
                raise ValueError(
                    f"{manifest}:{number}: not an item of the toy task (no {', '.join(missing)}); "
                    "the stand-in reads manifests written by make_task.py"
                )
            qtype = obj["question_type"]
            truth = {"colour": obj["colour"], "shape": obj["shape"], "count": str(obj["count"])}
            items[obj["id"]] = ToyItem(
                id=obj["id"],
                question_type=qtype,
                truth=truth[qtype],
                background=obj["background"],
                shown_answer=_most_common(obj["answers"]),
            )
            image = obj["image"]
            if image.startswith(("http://", "https://")):
                images[image] = obj["id"]
            else:
                path = Path(image) if Path(image).is_absolute() else folder / image
                images[hashlib.sha256(path.read_bytes()).hexdigest()] = obj["id"]
    return items, images


class StandinModel:
    """The stand-in's answers (no HTTP): see the module docstring for the rule."""

    def __init__(self, items: Mapping[int, ToyItem]) -> None:
        self.items = dict(items)

    def support(self, query: ToyItem, demos: Sequence[ToyItem]) -> float:
        """Summed support of ``demos`` (in prompt order) for ``query``."""
        total = 0.0
        for distance, demo in enumerate(reversed(demos)):
            if demo.question_type == query.question_type:
                total += DECAY**distance * SUPPORT[demo.background]
        return total

    def reply(self, query_id: int, demo_ids: Sequence[int]) -> Reply:
        """The answer to query ``query_id`` shown the demonstrations ``demo_ids`` in order."""
        query = self.items[query_id]
        demos = [self.items[i] for i in demo_ids]
        support, need = self.support(query, demos), NEED[query.background]
        copied = demos[-1].shown_answer if demos else VALUES[query.question_type][0]
        logits = {value: OTHER_LOGIT for value in VALUES[query.question_type]}
        logits[copied] = COPY_LOGIT
        # the true answer last, so that it wins where it coincides with the copied one
        logits[query.truth] = TRUE_SCALE * (support - need)
        if copied == query.truth:
            logits[query.truth] = max(COPY_LOGIT, logits[query.truth])
        top = max(logits.values())
        weights = {a: math.exp(z - top) for a, z in logits.items()}
        total = sum(weights.values())
        # most likely first; on a tie, the true answer first (as the rule answers)
        dist = sorted(
            ((a, w / total) for a, w in weights.items()),
            key=lambda p: (-p[1], p[0] != query.truth),
        )
        answer = query.truth if support >= need or copied == query.truth else copied
        return Reply(answer, support, need, tuple(dist))


@dataclass
class Fault:
    """Which requests fail, and how (see the module docstring)."""

    mode: str
    first: int = 0
    every: int = 0
    queries: frozenset[int] = frozenset()
    delay: float = 5.0

    def applies(self, number: int, query_id: int | None) -> bool:
        """Whether request ``number`` (1-based) about ``query_id`` fails."""
        if not (self.first or self.every or self.queries):
            return True
        return (
            (self.first > 0 and number <= self.first)
            or (self.every > 0 and number % self.every == 0)
            or (query_id is not None and query_id in self.queries)
        )


@dataclass
class Settings:
    """How the server behaves; may be changed while it runs (tests do)."""

    model_name: str = "toy-vlm"
    latency: float = 0.0
    logprobs: bool = True
    max_context: int = 4096
    max_image_bytes: int = 1 << 20
    fault: Fault | None = None
    counts: Counter[int] = field(default_factory=Counter)


def _image_urls(messages: Any) -> tuple[list[str], int]:
    """The image URLs of the chat messages in order, and the prompt's pseudo-token count."""
    if not isinstance(messages, list) or not messages:
        raise StandinError(400, "'messages' must be a non-empty list")
    urls: list[str] = []
    tokens = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        parts: Iterable[Any] = [content] if isinstance(content, str) else content or []
        for part in parts:
            if isinstance(part, str):
                tokens += len(part.split())
            elif isinstance(part, dict) and part.get("type") == "text":
                tokens += len(str(part.get("text", "")).split())
            elif isinstance(part, dict) and part.get("type") == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, dict) else image
                if not isinstance(url, str):
                    raise StandinError(400, "an image_url part has no 'url'")
                urls.append(url)
                tokens += IMAGE_TOKENS
            else:
                raise StandinError(400, f"unknown content part {str(part)[:80]!r}")
    return urls, tokens


class StandinServer(ThreadingHTTPServer):
    """The HTTP server: the model, the image index and the settings."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        model: StandinModel,
        images: Mapping[str, int],
        settings: Settings,
    ) -> None:
        super().__init__(address, _Handler)
        self.model, self.images, self.settings = model, dict(images), settings
        self.lock = threading.Lock()
        self.requests = 0

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client that gave up (timed out, cancelled its requests) closes its side
        # while an answer is on its way: routine for a server, not worth a traceback
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        """The base URL clients use (``http://127.0.0.1:PORT/v1``)."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def next_request(self) -> int:
        """Count a chat request; its 1-based number."""
        with self.lock:
            self.requests += 1
            return self.requests

    def item_of(self, url: str, position: int) -> int:
        """The item id of an image URL of the request."""
        if url.startswith("data:"):
            head, _, data = url.partition(",")
            if not head.endswith(";base64"):
                raise StandinError(400, f"image {position}: a data URL must be base64")
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise StandinError(400, f"image {position}: invalid base64 data") from None
            if len(raw) > self.settings.max_image_bytes:
                raise StandinError(400, _too_large(position, len(raw), self.settings))
            key = hashlib.sha256(raw).hexdigest()
        else:
            key = url
        if key not in self.images:
            raise StandinError(400, f"image {position} is not a picture of the task's manifest")
        return self.images[key]

    def complete(self, body: Mapping[str, Any], number: int) -> tuple[int, Any]:
        """Status and JSON answer of one chat completion request."""
        settings = self.settings
        if body.get("model") not in (None, settings.model_name):
            raise StandinError(
                404, f"The model `{body.get('model')}` does not exist.", "NotFoundError"
            )
        urls, tokens = _image_urls(body.get("messages"))
        if not urls:
            raise StandinError(400, "the request has no image: the last image is the query")
        ids = [self.item_of(url, k) for k, url in enumerate(urls, start=1)]
        query_id, demo_ids = ids[-1], ids[:-1]
        fault = settings.fault
        mode = fault.mode if fault is not None and fault.applies(number, query_id) else None
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 256)
        if mode == "context-too-long" or tokens + max_tokens > settings.max_context:
            raise StandinError(
                400,
                f"This model's maximum context length is {settings.max_context} tokens. "
                f"However, you requested {tokens + max_tokens} tokens ({tokens} in the "
                f"messages, {max_tokens} in the completion). Please reduce the length of "
                "the messages or completion.",
            )
        if mode == "image-too-large":
            raise StandinError(400, _too_large(len(urls), settings.max_image_bytes + 1, settings))
        if mode == "rate-limit":
            raise StandinError(429, "Too many requests, slow down", "RateLimitError")
        if mode == "server-error":
            raise StandinError(500, "internal error (injected)", "InternalServerError")
        if mode == "slow" and fault is not None:
            time.sleep(fault.delay)
        reply = self.model.reply(query_id, demo_ids)
        words = reply.answer.split()
        finish = "stop"
        if mode == "empty":
            words = []
        elif mode == "long" or len(words) > max_tokens:
            words = (words or ["and"]) * max_tokens
            words, finish = words[:max_tokens], "length"
        answer = " ".join(words)
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": answer},
            "finish_reason": finish,
            "logprobs": None,
        }
        if body.get("logprobs") and settings.logprobs:
            choice["logprobs"] = _logprobs(reply, words, int(body.get("top_logprobs") or 0))
        answer_json = {
            "id": f"chatcmpl-standin-{number}",
            "object": "chat.completion",
            "created": 0,
            "model": settings.model_name,
            "choices": [choice],
            "usage": {
                "prompt_tokens": tokens,
                "completion_tokens": len(words),
                "total_tokens": tokens + len(words),
            },
        }
        if mode == "malformed":
            del answer_json["choices"]
        return 200, answer_json


def _too_large(position: int, size: int, settings: Settings) -> str:
    return (
        f"image {position} is too large: {size} bytes, at most "
        f"{settings.max_image_bytes} bytes are accepted"
    )


def _logprobs(reply: Reply, words: Sequence[str], top: int) -> dict[str, Any]:
    probs = dict(reply.distribution)
    content = []
    for k, word in enumerate(words):
        if k == 0:
            p = probs.get(word, 1e-6)
            alternatives = [
                {"token": a, "logprob": math.log(q), "bytes": list(a.encode())}
                for a, q in reply.distribution[:top]
            ]
        else:  # later words of a long answer: nearly certain, no alternatives
            p, alternatives = 0.99, []
        content.append(
            {
                "token": word,
                "logprob": math.log(p),
                "bytes": list(word.encode()),
                "top_logprobs": alternatives,
            }
        )
    return {"content": content}


class _Handler(BaseHTTPRequestHandler):
    server: StandinServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: a test run makes thousands of requests

    def _send(self, status: int, payload: Any, content_type: str = "application/json") -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except ConnectionError:  # the client is gone: nobody to answer
            self.close_connection = True
            return
        if self.command == "POST" and self.path.rstrip("/") == "/v1/chat/completions":
            with self.server.lock:
                self.server.settings.counts[status] += 1

    def do_GET(self) -> None:
        settings = self.server.settings
        if self.path.rstrip("/") == "/v1/models":
            model = {"id": settings.model_name, "object": "model", "created": 0}
            self._send(200, {"object": "list", "data": [{**model, "owned_by": "standin"}]})
        elif self.path.rstrip("/") == "/stats":
            with self.server.lock:
                counts = {str(k): v for k, v in sorted(settings.counts.items())}
                self._send(200, {"requests": self.server.requests, "by_status": counts})
        else:
            self._send(404, _error(f"no route {self.path}", "NotFoundError", 404))

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if len(raw) < length:  # the client left half way through its request
            self.close_connection = True
            return
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send(404, _error(f"no route {self.path}", "NotFoundError", 404))
            return
        number = self.server.next_request()
        settings = self.server.settings
        if settings.latency > 0:
            time.sleep(settings.latency)
        try:
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise StandinError(400, "the request body is not JSON") from None
            if not isinstance(body, dict):
                raise StandinError(400, "the request body must be a JSON object")
            fault = settings.fault
            if fault is not None and fault.mode in ("drop", "non-json"):
                query = _peek_query(self.server, body)
                if fault.applies(number, query):
                    if fault.mode == "drop":
                        self.close_connection = True
                        return  # no answer at all: the client sees the connection close
                    self._send(200, b"<html><body>502 Bad Gateway</body></html>", "text/html")
                    return
            status, answer = self.server.complete(body, number)
            self._send(status, answer)
        except StandinError as exc:
            self._send(exc.status, _error(exc.message, exc.kind, exc.status))


def _peek_query(server: StandinServer, body: Mapping[str, Any]) -> int | None:
    try:
        urls, _ = _image_urls(body.get("messages"))
        return server.item_of(urls[-1], len(urls)) if urls else None
    except StandinError:
        return None


def _error(message: str, kind: str, status: int) -> dict[str, Any]:
    # vLLM's error body (OpenAI's nests the same fields under "error"; both are given)
    return {
        "object": "error",
        "message": message,
        "type": kind,
        "param": None,
        "code": status,
        "error": {"message": message, "type": kind, "param": None, "code": status},
    }


def start(
    manifest: Path, host: str = "127.0.0.1", port: int = 0, settings: Settings | None = None
) -> StandinServer:
    """A running stand-in server (in a daemon thread); ``server.shutdown()`` stops it."""
    items, images = load_items(manifest)
    server = StandinServer((host, port), StandinModel(items), images, settings or Settings())
    threading.Thread(target=server.serve_forever, daemon=True, name="standin-vlm").start()
    return server


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")
    parser.add_argument("--model-name", default="toy-vlm")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to each answer")
    parser.add_argument("--no-logprobs", action="store_true", help="never return logprobs")
    parser.add_argument("--max-context", type=int, default=4096, help="prompt + answer tokens")
    parser.add_argument("--max-image-bytes", type=int, default=1 << 20)
    parser.add_argument("--fault", choices=FAULTS)
    parser.add_argument("--fault-first", type=int, default=0, metavar="N")
    parser.add_argument("--fault-every", type=int, default=0, metavar="N")
    parser.add_argument("--fault-query", type=int, action="append", default=[], metavar="ID")
    parser.add_argument("--fault-delay", type=float, default=5.0, metavar="SECONDS")
    args = parser.parse_args(argv)
    fault = None
    if args.fault:
        fault = Fault(
            args.fault, args.fault_first, args.fault_every, frozenset(args.fault_query),
            args.fault_delay,
        )  # fmt: skip
    settings = Settings(
        model_name=args.model_name,
        latency=args.latency,
        logprobs=not args.no_logprobs,
        max_context=args.max_context,
        max_image_bytes=args.max_image_bytes,
        fault=fault,
    )
    try:
        server = start(args.manifest, args.host, args.port, settings)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        print(f"standin_vlm.py: {exc}", file=sys.stderr)
        return 2
    print(
        f"standin_vlm: serving {settings.model_name} on {server.url} "
        f"({len(server.model.items)} items)",
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

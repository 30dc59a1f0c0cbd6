"""A judge over HTTP: ``lever-train serve-judge NAME`` serves an installed environment.

Two endpoints, both JSON:

* ``GET /health``: ``{"status": "ok", "name", "version", "cheap", "max_batch"}`` (the
  environment's name and version after ``configure``; a client stores verdicts under them);
* ``POST /judge``: ``{"query_ids": [q, ...], "sequences": [[g, ...], ...]}`` (one sequence
  of global ids per query id) -> ``{"verdicts": [...], "name", "version"}``, one verdict
  (the ``VERDICT_FIELDS``) per pair, in order.

The environment is called in a pool of ``threads`` worker threads, so the event loop keeps
answering (health checks, other batches, refusals) while a batch is judged; ``--threads 1``
serialises the calls for an environment that is not thread-safe. Every refusal is a 4xx
with one JSON line ``{"error": "..."}`` naming the field and what was expected (malformed
JSON 400, wrong types or counts 422, a body over ``max_body_bytes`` or a batch over
``max_batch`` 413, a missing or wrong bearer token 401); an environment that fails answers
500 with ``"transient": true`` (worth retrying), one whose answer is unusable (the wrong
count, a field that is not a number in [0, 1]) 500 with ``"transient": false``. The server
never answers with a traceback and keeps serving after any of these.

When ``LEVER_JUDGE_TOKEN`` is set in the server's environment, both endpoints require
``Authorization: Bearer <token>``. The token is read from the environment only, never
from a command-line option (which would show in ``ps`` and in shell history), and is never
printed.

starlette and uvicorn come with the ``serve`` extra (``pip install
'lever-trainer[serve]'``): this module imports them only when a server is built.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import LeverError
from .judge import Environment, check_verdict, environments_from_plugins
from .plugins import load_plugins

if TYPE_CHECKING:
    from starlette.requests import Request

#: The environment variable holding the bearer token (server and client).
TOKEN_VARIABLE = "LEVER_JUDGE_TOKEN"
#: What to do when starlette, uvicorn or httpx are missing.
INSTALL_HINT = "pip install 'lever-trainer[serve]'"
#: Largest id accepted in a request (ids are stored as SQLite integers).
MAX_ID = 2**63 - 1


@dataclass(frozen=True)
class Limits:
    """What one request may hold, and how many batches are judged at once."""

    #: Bytes of one request body.
    max_body_bytes: int = 16 * 2**20
    #: (query, sequence) pairs of one batch.
    max_batch: int = 4096
    #: Ids in one sequence.
    max_length: int = 256
    #: Worker threads calling the environment (batches judged at once).
    threads: int = 8


class BadRequest(Exception):
    """A request the server refuses: ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_id(value: Any, where: str) -> int:
    if not _is_int(value):
        shown = json.dumps(value)[:40] if _jsonable(value) else repr(value)[:40]
        raise BadRequest(422, f"{where} is {shown}, expected an integer id")
    if not 0 <= value <= MAX_ID:
        raise BadRequest(422, f"{where} is {value}, expected an id in [0, 2^63)")
    return int(value)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def parse_batch(body: bytes, limits: Limits) -> tuple[list[int], list[list[int]]]:
    """The query ids and sequences of a ``/judge`` request body, or :class:`BadRequest`
    naming the field and what was expected."""
    try:
        doc = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise BadRequest(400, f"the body is not JSON ({str(exc)[:80]})") from None
    if not isinstance(doc, dict):
        raise BadRequest(
            422,
            f"the body is a JSON {type(doc).__name__}, expected an object with "
            "query_ids and sequences",
        )
    for field in ("query_ids", "sequences"):
        if field not in doc:
            raise BadRequest(422, f"{field} is missing (expected query_ids and sequences)")
        if not isinstance(doc[field], list):
            raise BadRequest(422, f"{field} is a JSON {_kind(doc[field])}, expected a list")
    unknown = sorted(set(doc) - {"query_ids", "sequences"})
    if unknown:
        raise BadRequest(422, f"unknown field {unknown[0]!r} (expected query_ids and sequences)")
    raw_q, raw_s = doc["query_ids"], doc["sequences"]
    if len(raw_q) != len(raw_s):
        raise BadRequest(
            422, f"{len(raw_q)} query_ids but {len(raw_s)} sequences (expected one per query id)"
        )
    if len(raw_q) > limits.max_batch:
        raise BadRequest(
            413, f"{len(raw_q)} pairs in one batch, this server takes at most {limits.max_batch}"
        )
    query_ids = [_check_id(q, f"query_ids[{i}]") for i, q in enumerate(raw_q)]
    sequences = []
    for i, seq in enumerate(raw_s):
        if not isinstance(seq, list):
            raise BadRequest(422, f"sequences[{i}] is a JSON {_kind(seq)}, expected a list of ids")
        if not 1 <= len(seq) <= limits.max_length:
            raise BadRequest(
                422, f"sequences[{i}] holds {len(seq)} ids, expected 1 to {limits.max_length}"
            )
        sequences.append([_check_id(g, f"sequences[{i}][{j}]") for j, g in enumerate(seq)])
    return query_ids, sequences


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _kind(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


class _JudgeService:
    """The endpoints and their helpers around one configured environment: its name and
    version, the request limits, the optional bearer token and the worker pool."""

    def __init__(
        self,
        env: Environment,
        plugin: str,
        limits: Limits,
        token: str | None,
        say: Callable[[str], None],
        json_response: Any,
    ) -> None:
        self.env = env
        self.plugin = plugin
        self.limits = limits
        self.token = token
        self.say = say
        #: starlette's ``JSONResponse`` (imported only when a server is built).
        self.json_response = json_response
        self.name, self.version = env.name, str(env.version)
        #: verdict fields the environment may leave unavailable (None)
        self.optional_fields = (
            *(getattr(env, "optional_fields", ()) or ()),
            *(getattr(env, "unavailable_fields", ()) or ()),
        )
        self.pool = ThreadPoolExecutor(
            max_workers=limits.threads, thread_name_prefix=f"judge {self.name}"
        )
        self.asynchronous = inspect.iscoroutinefunction(env.judge)

    def error(self, status: int, message: str, **extra: Any) -> Any:
        """The JSON refusal ``{"error": message, ...}`` with ``status``."""
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return self.json_response({"error": message, **extra}, status_code=status, headers=headers)

    def refused(self, request: Request) -> Any:
        """The 401 answer when a token is required and not given; None when allowed."""
        if self.token is None:
            return None
        given = request.headers.get("authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            return None
        what = "a wrong bearer token" if given else "no bearer token"
        return self.error(401, f"{what}: this server requires the token in {TOKEN_VARIABLE}")

    async def health(self, request: Request) -> Any:
        """``GET /health``: the environment's identity and this server's batch limit."""
        denied = self.refused(request)
        if denied is not None:
            return denied
        return self.json_response(
            {
                "status": "ok",
                "name": self.name,
                "version": self.version,
                "cheap": bool(self.env.cheap),
                "max_batch": self.limits.max_batch,
                "optional_fields": list(self.optional_fields),
            }
        )

    async def read_body(self, request: Request) -> bytes:
        """The request body, refused (413) as soon as it is known to exceed the limit."""
        limit = self.limits.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise BadRequest(400, f"Content-Length is {length[:20]!r}, expected a number")
            if int(length) > limit:
                raise BadRequest(
                    413,
                    f"the body has {int(length)} bytes, this server takes at most {limit}",
                )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BadRequest(413, f"the body exceeds {limit} bytes, this server's limit")
            chunks.append(chunk)
        return b"".join(chunks)

    async def call_env(self, query_ids: list[int], sequences: list[list[int]]) -> Any:
        """The environment's answer for one batch: awaited, or run in the worker pool."""
        if self.asynchronous:
            return await self.env.judge(query_ids, sequences)  # type: ignore[misc]
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self.env.judge, query_ids, sequences)

    def checked(self, answers: Any, query_ids: list[int], sequences: list[list[int]]) -> list[Any]:
        """The environment's answers as verdicts, one per pair; LeverError when unusable."""
        plugin, name = self.plugin, self.name
        if isinstance(answers, str | bytes | Mapping) or not isinstance(answers, Sequence):
            raise LeverError(
                f"plugin {plugin}: environment {name} returned a {type(answers).__name__}, "
                "expected a list of verdicts"
            )
        if len(answers) != len(query_ids):
            raise LeverError(
                f"plugin {plugin}: environment {name} returned {len(answers)} verdicts for "
                f"{len(query_ids)} sequences"
            )
        return [
            check_verdict(a, plugin, name, q, s, self.optional_fields)
            for a, q, s in zip(answers, query_ids, sequences, strict=True)
        ]

    async def judge(self, request: Request) -> Any:
        """``POST /judge``: one verdict per (query id, sequence) pair, or a refusal."""
        denied = self.refused(request)
        if denied is not None:
            return denied
        name = self.name
        try:
            query_ids, sequences = parse_batch(await self.read_body(request), self.limits)
        except BadRequest as exc:
            return self.error(exc.status, exc.message)
        if not query_ids:
            return self.json_response({"verdicts": [], "name": name, "version": self.version})
        try:
            answers = await self.call_env(query_ids, sequences)
        except LeverError as exc:  # the environment refused the batch (an id it lacks)
            return self.error(422, f"environment {name} refused the batch: {exc}")
        except Exception as exc:
            message = f"environment {name} failed: {type(exc).__name__}: {exc}"
            self.say(f"serve-judge: {message}")
            return self.error(500, message, transient=True)
        try:
            verdicts = self.checked(answers, query_ids, sequences)
        except LeverError as exc:
            self.say(f"serve-judge: {exc}")
            return self.error(500, str(exc), transient=False)
        return self.json_response({"verdicts": verdicts, "name": name, "version": self.version})

    async def crash(self, request: Request, exc: Exception) -> Any:
        """Any unexpected failure: a one-line 500 (transient), logged, no traceback."""
        message = f"internal error: {type(exc).__name__}: {exc}"
        self.say(f"serve-judge: {message}")
        return self.error(500, message, transient=True)


def make_app(
    env: Environment,
    plugin: str,
    limits: Limits = Limits(),
    token: str | None = None,
    log: Callable[[str], None] | None = None,
) -> Any:
    """The starlette application serving ``env`` (already configured)."""
    try:
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.responses import JSONResponse
        from starlette.routing import Route
    except ImportError:
        raise LeverError(f"serving a judge needs starlette and uvicorn: {INSTALL_HINT}") from None

    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    service = _JudgeService(env, plugin, limits, token, say, JSONResponse)

    async def http_error(request: Request, exc: Exception) -> Any:
        assert isinstance(exc, HTTPException)
        return service.error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    app = Starlette(
        routes=[
            Route("/health", service.health, methods=["GET"]),
            Route("/judge", service.judge, methods=["POST"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: service.crash},
    )
    app.state.pool = service.pool
    return app


def find_environment(
    name: str, options: Mapping[str, Any], plugins_on: Sequence[str] = (), warn: Any = None
) -> tuple[str, Environment]:
    """``(plugin, environment)`` of the installed environment ``name``, configured with
    ``options`` (the declared defaults of the active plugins' options under them)."""
    plugins = load_plugins(list(plugins_on), warn=warn)
    envs = environments_from_plugins(plugins)
    if name not in envs:
        known = ", ".join(sorted(envs)) or "none; install an environment plugin"
        raise LeverError(f"no active plugin provides environment {name!r} (available: {known})")
    plugin, env = envs[name]
    try:
        env.configure({**plugins.option_defaults(), **options})
    except LeverError:
        raise
    except Exception as exc:
        raise LeverError(
            f"plugin {plugin}: environment {name} could not be configured: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return plugin, env


def serve_judge(
    name: str,
    options: Mapping[str, Any],
    host: str,
    port: int,
    limits: Limits,
    plugins_on: Sequence[str] = (),
    access_log: bool = False,
    echo: Callable[[str], None] = print,
    warn: Callable[[str], None] | None = None,
) -> None:
    """Serve the environment ``name`` on ``host:port`` until interrupted."""
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise LeverError(f"serve-judge needs starlette and uvicorn: {INSTALL_HINT}") from None
    plugin, env = find_environment(name, options, plugins_on, warn)
    sock = listening_socket(host, port)
    token = os.environ.get(TOKEN_VARIABLE) or None
    app = make_app(env, plugin, limits, token, warn)
    echo(
        f"serving environment {env.name} {env.version} (plugin {plugin}) on "
        f"http://{host}:{port} ({limits.threads} threads, at most {limits.max_batch} pairs "
        f"a batch; {'bearer token required' if token else f'no token: {TOKEN_VARIABLE} unset'})"
    )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=access_log,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        app.state.pool.shutdown(wait=False, cancel_futures=True)
        sock.close()


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (uvicorn listens on it); one line when it cannot be."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise LeverError(f"--host: cannot listen on {host} ({exc.strerror or exc})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise LeverError(
            f"--port: cannot listen on {host}:{port} ({exc.strerror or exc})"
        ) from None
    return sock


__all__ = [
    "INSTALL_HINT",
    "TOKEN_VARIABLE",
    "BadRequest",
    "Limits",
    "find_environment",
    "make_app",
    "parse_batch",
    "serve_judge",
]

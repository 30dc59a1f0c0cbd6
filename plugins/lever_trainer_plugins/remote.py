"""Environment ``remote``: a judge served over HTTP by ``lever-train serve-judge``.

``--judge remote --judge-url URL`` (repeatable) judges on one or more servers. At
``configure`` each server's ``/health`` says which environment it serves: the run takes
that name and version as its own, so verdicts are stored under the served environment's
name and version — the same store key as the same environment judged in process (an
environment's version changes whenever its verdicts would, so where it is judged does not
matter). All servers must serve the same name and version.

``judge`` splits the pairs it gets into batches of ``--remote-batch-size`` and keeps up to
``--remote-concurrency`` requests in flight per server (httpx's async client), all servers
taking batches from one queue, so a faster server takes more. A transient failure
(no connection, no answer within ``--remote-timeout``, HTTP 408, 429 or a 5xx the server
marks transient) is retried ``--remote-retries`` times with exponential backoff and
jitter; a server still failing is then skipped (one warning line naming it) and its
batches go to the others; it gets another chance after ``RETRY_DOWN_AFTER`` seconds. When
every server has failed, one line names each with its cause. A refusal (4xx) or an
unusable answer (not JSON, the wrong count, another environment) fails at once: another
server would not do better.

The bearer token comes from ``LEVER_JUDGE_TOKEN`` only: it is not an option, so it never
reaches ``run_config.json``, a checkpoint, a log or the store. httpx comes with the
``serve`` extra.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from lever_trainer.api import About, Environment, LeverError, Option, PluginError, hookimpl

from ._http import check_server_url

#: The environment variable holding the bearer token.
TOKEN_VARIABLE = "LEVER_JUDGE_TOKEN"
#: Seconds a server that failed is skipped before it is tried again.
RETRY_DOWN_AFTER = 60.0
#: Longest wait between two tries of one request, in seconds.
MAX_BACKOFF = 30.0
INSTALL_HINT = "pip install 'lever-trainer[serve]'"


class ServerDown(Exception):
    """A server failed a request more times than ``--remote-retries`` allows."""


class RemoteEnvironment(Environment):
    """Judges on ``lever-train serve-judge`` servers (see the module docstring)."""

    name = "remote"
    version = "0"

    def __init__(self) -> None:
        self.urls: list[str] = []
        self.timeout, self.retries, self.backoff = 60.0, 3, 0.5
        self.request_size, self.concurrency = 256, 4
        # the judge driver's batch: every server's requests in flight at once, so one
        # driver call keeps them all busy and is stored as soon as it returns
        self.batch_size: int | None = self.request_size * self.concurrency
        self.down: dict[str, float] = {}  # url -> when it failed
        self._jitter = random.Random()  # its own generator: the run's random state stays

    @staticmethod
    def warn(line: str) -> None:
        """One warning line on stderr."""
        print(line, file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ set-up
    def configure(self, options: Mapping[str, Any]) -> None:
        """Read the options, ask every server's ``/health``, take the served name and version."""
        try:
            import httpx
        except ImportError:
            raise LeverError(f"--judge remote needs httpx: {INSTALL_HINT}") from None
        urls = [check_url(u) for u in (JUDGE_URL.of(options) or ())]
        if not urls:
            raise LeverError("--judge remote: name the judge server with --judge-url URL")
        self.urls = list(dict.fromkeys(urls))
        self.timeout = float(REMOTE_TIMEOUT.of(options) or 60.0)
        self.retries = int(REMOTE_RETRIES.of(options) or 0)
        self.backoff = float(REMOTE_BACKOFF.of(options) or 0.0)
        self.request_size = int(REMOTE_BATCH_SIZE.of(options) or 256)
        self.concurrency = int(REMOTE_CONCURRENCY.of(options) or 1)
        self.batch_size = self.request_size * self.concurrency * len(self.urls)
        self.down = {}
        served: dict[str, tuple[str, str, bool, tuple[str, ...]]] = {}
        failed: dict[str, str] = {}
        with httpx.Client(timeout=self.timeout, headers=self.headers()) as client:
            for url in self.urls:
                try:
                    served[url] = self.health(client, url)
                except ServerDown as exc:
                    failed[url] = str(exc)
        if not served:
            raise LeverError(
                "--judge-url: no judge server answered: "
                + "; ".join(f"{u} ({cause})" for u, cause in failed.items())
            )
        if len({(n, v) for n, v, _, _ in served.values()}) > 1:
            raise LeverError(
                "--judge-url: the servers judge differently: "
                + ", ".join(f"{u} serves {n} {v}" for u, (n, v, _, _) in served.items())
            )
        for url, cause in failed.items():
            self.warn(
                f"warning: judge server {url} did not answer ({cause}); judging on the others"
            )
            self.down[url] = time.monotonic()
        self.name, self.version, self.cheap, self.optional_fields = next(iter(served.values()))

    def headers(self) -> dict[str, str]:
        token = os.environ.get(TOKEN_VARIABLE)
        return {"Authorization": f"Bearer {token}"} if token else {}

    def health(self, client: Any, url: str) -> tuple[str, str, bool, tuple[str, ...]]:
        """``(name, version, cheap, optional fields)`` that ``url`` serves;
        :class:`ServerDown` when it does not answer after the retries, LeverError when it
        refuses or is no judge."""
        cause = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.delay(attempt))
            try:
                response = client.get(f"{url}/health")
            except Exception as exc:  # httpx.TransportError and its kin
                cause = describe(exc, self.timeout)
                continue
            doc = answered(url, response)
            if isinstance(doc, str):  # a transient failure: try again
                cause = doc
                continue
            name, version = doc.get("name"), doc.get("version")
            if not isinstance(name, str) or not name or not isinstance(version, str):
                raise PluginError(
                    f"judge server {url}: /health gave no environment name and version "
                    f"(is it a lever-train serve-judge server?)"
                )
            optional = doc.get("optional_fields") or ()
            if not isinstance(optional, list | tuple):
                optional = ()
            fields = tuple(str(f) for f in optional)
            return name, version, bool(doc.get("cheap", False)), fields
        raise ServerDown(cause)

    def delay(self, attempt: int) -> float:
        """Seconds before try ``attempt`` (1, 2, ...): exponential, with jitter."""
        base = min(self.backoff * 2.0 ** (attempt - 1), MAX_BACKOFF)
        return float(base * (0.5 + 0.5 * self._jitter.random()))

    # ------------------------------------------------------------------ judging
    def judge(
        self, query_ids: Sequence[int], sequences: Sequence[Sequence[int]]
    ) -> list[dict[str, float]]:
        """The verdicts of every pair, from the servers (see the module docstring)."""
        if not self.urls:
            raise LeverError("--judge remote: the environment was not configured")
        qids = [int(q) for q in query_ids]
        seqs = [[int(g) for g in s] for s in sequences]
        if not qids:
            return []
        return asyncio.run(self._judge(qids, seqs))

    async def _judge(self, qids: list[int], seqs: list[list[int]]) -> list[dict[str, float]]:
        import httpx

        size = self.request_size
        queue = deque(range(0, len(qids), size))  # each batch by its first index
        results: list[Any] = [None] * len(qids)
        left = len(queue)
        now = time.monotonic()
        urls = [
            u for u in self.urls if now - self.down.get(u, -RETRY_DOWN_AFTER) >= RETRY_DOWN_AFTER
        ]
        urls = urls or list(self.urls)  # all were down: try them all again
        failed: dict[str, str] = {}

        async def worker(client: Any, url: str) -> None:
            nonlocal left
            while left and url not in failed:
                if not queue:
                    await asyncio.sleep(0.005)  # a batch in flight may come back
                    continue
                start = queue.popleft()
                end = min(start + size, len(qids))
                try:
                    verdicts = await self.post(client, url, qids[start:end], seqs[start:end])
                except ServerDown as exc:
                    queue.appendleft(start)
                    if url not in failed:
                        failed[url] = str(exc)
                        self.down[url] = time.monotonic()
                        if len(failed) < len(urls):
                            self.warn(
                                f"warning: judge server {url} failed {self.retries + 1} times "
                                f"({exc}); skipping it, judging on the others"
                            )
                    return
                results[start:end] = verdicts
                left -= 1

        limits = httpx.Limits(max_connections=self.concurrency * len(urls))
        async with httpx.AsyncClient(
            timeout=self.timeout, headers=self.headers(), limits=limits
        ) as client:
            tasks = [
                asyncio.create_task(worker(client, url))
                for url in urls
                for _ in range(self.concurrency)
            ]
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for task in done:
                error = task.exception()
                if error is not None:
                    raise error
        if left:
            raise LeverError(
                "--judge-url: every judge server failed: "
                + "; ".join(f"{u} ({cause})" for u, cause in failed.items())
            )
        for url in urls:
            if url not in failed:
                self.down.pop(url, None)
        return results

    async def post(
        self, client: Any, url: str, qids: list[int], seqs: list[list[int]]
    ) -> list[dict[str, float]]:
        """One batch's verdicts from ``url``, retried; :class:`ServerDown` when it keeps
        failing, LeverError when it refuses the batch or answers something unusable."""
        cause = ""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.delay(attempt))
            try:
                response = await client.post(
                    f"{url}/judge", json={"query_ids": qids, "sequences": seqs}
                )
            except Exception as exc:  # httpx.TransportError and its kin
                cause = describe(exc, self.timeout)
                continue
            doc = answered(url, response)
            if isinstance(doc, str):  # a transient failure: try again
                cause = doc
                continue
            verdicts = doc.get("verdicts")
            if not isinstance(verdicts, list) or len(verdicts) != len(qids):
                got = f"{len(verdicts)} verdicts" if isinstance(verdicts, list) else "no verdicts"
                raise PluginError(f"judge server {url} answered {got} for {len(qids)} sequences")
            if (doc.get("name"), doc.get("version")) != (self.name, self.version):
                raise PluginError(
                    f"judge server {url} now serves {doc.get('name')} {doc.get('version')}, "
                    f"this run judges with {self.name} {self.version}; restart the run"
                )
            return verdicts
        raise ServerDown(cause)


def check_url(url: Any) -> str:
    """``url`` without a trailing slash; LeverError unless http(s) without credentials."""
    return check_server_url(url, "--judge-url", TOKEN_VARIABLE)


def describe(exc: BaseException, timeout: float) -> str:
    """A failed request in a few words."""
    kind = type(exc).__name__
    if "Timeout" in kind:
        return f"no answer within {timeout:g} s"
    return f"{kind}: {exc}"[:200] if str(exc) else kind


def is_transient(response: Any) -> bool:
    """Worth another try: 408, 429, or a 5xx the server does not mark permanent."""
    code = int(response.status_code)
    if code in (408, 429):
        return True
    if code < 500:
        return False
    try:
        doc = response.json()
    except ValueError:
        return True
    return not (isinstance(doc, dict) and doc.get("transient") is False)


def error_text(response: Any) -> str:
    """The server's one-line error, or the start of its body."""
    try:
        doc = response.json()
    except ValueError:
        return repr(response.text[:80])
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        return str(doc["error"])
    return repr(response.text[:80])


def refuse(url: str, response: Any) -> None:
    """LeverError for a refusal (401, 4xx) or a 5xx marked permanent."""
    code = int(response.status_code)
    if code == 401 or code == 403:
        given = "the token in" if os.environ.get(TOKEN_VARIABLE) else "no token: set"
        raise LeverError(
            f"judge server {url} refused the request (HTTP {code}, {given} {TOKEN_VARIABLE}): "
            f"{error_text(response)}"
        )
    if code >= 400:
        raise LeverError(f"judge server {url}: HTTP {code}: {error_text(response)}")


def answered(url: str, response: Any) -> dict[str, Any] | str:
    """The JSON object of a usable answer, or the cause of a transient failure (worth
    asking again); LeverError/PluginError when the server refused or answered nonsense."""
    if is_transient(response):
        return f"HTTP {response.status_code}: {error_text(response)}"
    refuse(url, response)
    return json_of(url, response)


def json_of(url: str, response: Any) -> dict[str, Any]:
    """The JSON object a server answered, or a PluginError saying what came instead."""
    try:
        doc = response.json()
    except ValueError:
        raise PluginError(
            f"judge server {url} answered something that is not JSON: {response.text[:60]!r}"
        ) from None
    if not isinstance(doc, dict):
        raise PluginError(f"judge server {url} answered a JSON {type(doc).__name__}, not an object")
    return doc


_ENV = RemoteEnvironment()


@hookimpl
def about() -> About:
    """What ``lever-train plugins`` shows of this plugin."""
    return About(
        description="environment `remote`: judges on lever-train serve-judge servers (--judge-url)",
        enabled_by_default=True,
    )


@hookimpl
def environments() -> Mapping[str, Environment]:
    """The remote judge."""
    return {"remote": _ENV}


#: The commands that take this plugin's options.
_COMMANDS = ("train", "evaluate", "collect")


JUDGE_URL = Option(
    ("--judge-url",),
    "str",
    (),
    "remote: a judge server's URL (lever-train serve-judge); repeatable, the "
    "batches are spread over them.",
    multiple=True,
    metavar="URL",
    commands=_COMMANDS,
)
REMOTE_TIMEOUT = Option(
    ("--remote-timeout",),
    "float",
    60.0,
    "remote: seconds one request may take before it is retried.",
    min=0.0,
    min_open=True,
    metavar="SECONDS",
    commands=_COMMANDS,
)
REMOTE_RETRIES = Option(
    ("--remote-retries",),
    "int",
    3,
    "remote: retries of a failed request before its server is skipped.",
    min=0,
    commands=_COMMANDS,
)
REMOTE_BACKOFF = Option(
    ("--remote-backoff",),
    "float",
    0.5,
    "remote: seconds before the first retry, doubled at each next one (with jitter).",
    min=0.0,
    metavar="SECONDS",
    commands=_COMMANDS,
)
REMOTE_BATCH_SIZE = Option(
    ("--remote-batch-size",),
    "int",
    256,
    "remote: (query, sequence) pairs per request.",
    min=1,
    commands=_COMMANDS,
)
REMOTE_CONCURRENCY = Option(
    ("--remote-concurrency",),
    "int",
    4,
    "remote: requests in flight per server.",
    min=1,
    commands=_COMMANDS,
)


@hookimpl
def add_options() -> Sequence[Option]:
    """``--judge-url`` and how the servers are asked."""
    return [
        JUDGE_URL,
        REMOTE_TIMEOUT,
        REMOTE_RETRIES,
        REMOTE_BACKOFF,
        REMOTE_BATCH_SIZE,
        REMOTE_CONCURRENCY,
    ]

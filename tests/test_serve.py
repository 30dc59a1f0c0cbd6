"""A judge over HTTP, both ends: ``lever-train serve-judge`` and the ``remote`` environment.

Real servers on 127.0.0.1 (uvicorn in a thread on a socket bound to a free port, or the
``serve-judge`` command in a subprocess), always stopped. The test environments answer a
formula of the query and the sequence, so every expected verdict is computed here by hand.
Without the ``serve`` extra (httpx, starlette, uvicorn) the tests that need a server are
skipped; those that check what a user without it is told always run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lever_digits_env
import pytest
from conftest import assert_user_error, write_json
from lever_digits_env import files
from safetensors.torch import load_file

from lever_trainer.api import Environment, LeverError
from lever_trainer.judge import Judge, VerdictStore
from lever_trainer.serve import Limits, make_app
from lever_trainer_plugins.remote import RemoteEnvironment

pytestmark = pytest.mark.serve
HAVE_SERVE = all(importlib.util.find_spec(m) for m in ("httpx", "starlette", "uvicorn"))
needs_serve = pytest.mark.skipif(
    not HAVE_SERVE, reason="the serve extra (httpx, starlette, uvicorn) is not installed"
)
TOKEN = "tok-3f9a-never-written"
DIGITS = files()


def formula(q: int, seq: Sequence[int]) -> dict[str, float]:
    """The test environments' verdict: correct when q is even; the other fields are
    simple exact fractions of the ids (all in [0, 1])."""
    return {
        "vqa_correct": float(q % 2 == 0),
        "vqa_acc_score": (sum(seq) % 10) / 10,
        "vqa_gt_prob": 1 / (1 + len(seq)),
        "vqa_rel_score": (q % 4) / 4,
    }


class FormulaEnv(Environment):
    """Answers ``formula``; counts its calls; ``fail`` raises on the first N calls."""

    name, version = "formula", "7"

    def __init__(self, fail: int = 0, answer: str = "good", barrier: int = 0) -> None:
        self.fail, self.answer, self.calls = fail, answer, 0
        self.lock = threading.Lock()
        self.barrier = threading.Barrier(barrier, timeout=20) if barrier else None

    def judge(self, query_ids: Sequence[int], sequences: Sequence[Sequence[int]]) -> Any:
        with self.lock:
            self.calls += 1
            calls = self.calls
        if self.barrier is not None:
            self.barrier.wait()  # passes only when `barrier` calls are in at once
        if calls <= self.fail:
            raise RuntimeError(f"GPU fell over on call {calls}")
        out = [formula(q, s) for q, s in zip(query_ids, sequences, strict=True)]
        if self.answer == "short":
            return out[:-1]
        if self.answer == "garbage":
            return [{**v, "vqa_acc_score": "lots"} for v in out]
        return out


@contextlib.contextmanager
def serving(
    env: Environment, limits: Limits | None = None, token: str | None = None
) -> Iterator[str]:
    """``env`` served by uvicorn in a thread on a free port of 127.0.0.1; its base URL."""
    import uvicorn

    app = make_app(env, "test-plugin", limits or Limits(), token, log=lambda line: None)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        app.state.pool.shutdown(wait=False, cancel_futures=True)


def dead_url() -> str:
    """A URL on which nothing listens (a port just released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def remote(*urls: str, **options: Any) -> RemoteEnvironment:
    env = RemoteEnvironment()
    settings = {"remote_timeout": 20.0, "remote_retries": 2, "remote_backoff": 0.01}
    settings.update(remote_batch_size=3, remote_concurrency=2)
    env.configure({"judge_url": urls, **settings, **options})
    return env


def pairs(n: int) -> tuple[list[int], list[list[int]]]:
    return list(range(n)), [[q + 1, 2 * q + 3] for q in range(n)]


# ------------------------------------------------------------------ the server
@needs_serve
def test_digits_verdicts_over_http_equal_the_in_process_ones() -> None:
    doc = json.loads(Path(DIGITS["train"]).read_text())
    qids, seqs = [], []
    for key in [k for k in doc if k.isdigit()][:25]:
        pool = doc[key]["candidate_pool_ids"]
        for j in range(3):  # three sequences per query, from its pool
            qids.append(int(key))
            seqs.append([pool[j], pool[-1 - j]])
    local = lever_digits_env.DigitsEnvironment()
    with serving(lever_digits_env.DigitsEnvironment()) as url:
        env = remote(url, remote_batch_size=7)  # 75 pairs: 11 batches, the last of 5
        assert (env.name, env.version, env.cheap) == ("digits", "1", True)
        assert env.judge(qids, seqs) == local.judge(qids, seqs)  # exact floats over JSON


@needs_serve
def test_bad_requests_get_one_json_line_and_a_4xx_and_the_server_keeps_serving() -> None:
    import httpx

    limits = Limits(max_body_bytes=2000, max_batch=5, max_length=4)
    good = {"query_ids": [0, 1], "sequences": [[5, 6], [7, 8]]}
    with serving(lever_digits_env.DigitsEnvironment(), limits) as url:
        cases: list[tuple[dict[str, Any], int, str]] = [
            ({"content": b'{"query_ids": [1'}, 400, "not JSON"),
            ({"content": b"\xff\xfe"}, 400, "not JSON"),
            ({"content": b'{"query_ids": [NaN], "sequences": [[1]]}'}, 400, "NaN"),
            ({"json": [1, 2]}, 422, "expected an object"),
            ({"json": {"query_ids": [0]}}, 422, "sequences is missing"),
            ({"json": {"query_ids": "0", "sequences": [[1]]}}, 422, "query_ids is a JSON string"),
            ({"json": {**good, "extra": 1}}, 422, "unknown field 'extra'"),
            ({"json": {"query_ids": [0], "sequences": [[1], [2]]}}, 422, "1 query_ids but 2"),
            ({"json": {"query_ids": [0.5], "sequences": [[1]]}}, 422, "query_ids[0] is 0.5"),
            ({"json": {"query_ids": [True], "sequences": [[1]]}}, 422, "query_ids[0] is true"),
            ({"json": {"query_ids": [0], "sequences": [[1, "2"]]}}, 422, 'sequences[0][1] is "2"'),
            ({"json": {"query_ids": [0], "sequences": [5]}}, 422, "sequences[0] is a JSON number"),
            ({"json": {"query_ids": [0], "sequences": [[]]}}, 422, "holds 0 ids, expected 1 to 4"),
            ({"json": {"query_ids": [-1], "sequences": [[1]]}}, 422, "expected an id in"),
            ({"json": {"query_ids": [2**70], "sequences": [[1]]}}, 422, "expected an id in"),
            ({"json": {"query_ids": [0], "sequences": [[1, 99999]]}}, 422, "id 99999 is out"),
            ({"json": {"query_ids": [0] * 6, "sequences": [[1]] * 6}}, 413, "at most 5"),
            ({"content": b" " * 2001}, 413, "at most 2000"),
            # no Content-Length (chunked): the limit holds while reading
            ({"content": iter([b" " * 1500, b" " * 1500])}, 413, "exceeds 2000 bytes"),
        ]
        with httpx.Client(base_url=url, timeout=20) as client:
            for kwargs, status, fragment in cases:
                response = client.post("/judge", **kwargs)
                assert response.status_code == status, (kwargs, response.text)
                assert len(response.text.splitlines()) == 1, response.text
                assert fragment in response.json()["error"], (fragment, response.text)
                assert "Traceback" not in response.text
            for method, path, status in (("GET", "/judge", 405), ("GET", "/nowhere", 404)):
                response = client.request(method, path)
                assert response.status_code == status
                assert set(response.json()) == {"error"}
            # still serving: the same good batch as the environment answers it in process
            response = client.post("/judge", json=good)
            assert response.status_code == 200, response.text
            expected = lever_digits_env.DigitsEnvironment().judge([0, 1], [[5, 6], [7, 8]])
            assert response.json() == {"verdicts": expected, "name": "digits", "version": "1"}
            assert client.post("/judge", json={"query_ids": [], "sequences": []}).json() == {
                "verdicts": [],
                "name": "digits",
                "version": "1",
            }


@needs_serve
def test_batches_are_judged_concurrently_and_health_answers_meanwhile() -> None:
    import httpx

    # the barrier opens only when 4 calls are inside the environment at once: with one
    # thread, or a blocked event loop, this would fail after the barrier's timeout
    env = FormulaEnv(barrier=4)
    with serving(env, Limits(threads=4)) as url:
        client = remote(url, remote_batch_size=1, remote_concurrency=4)
        box: dict[str, Any] = {}
        worker = threading.Thread(target=lambda: box.update(out=client.judge(*pairs(4))))
        worker.start()
        deadline = time.monotonic() + 20
        while env.calls < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        # three calls are held at the barrier: the server still answers its health
        assert httpx.get(f"{url}/health", timeout=5).json()["name"] == "formula"
        worker.join(30)
    qids, seqs = pairs(4)
    assert box["out"] == [formula(q, s) for q, s in zip(qids, seqs, strict=True)]
    assert env.calls == 4


@needs_serve
def test_a_token_is_required_when_set_and_the_client_sends_it(monkeypatch) -> None:
    import httpx

    with serving(FormulaEnv(), token=TOKEN) as url:
        body = {"query_ids": [2], "sequences": [[1, 2]]}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            response = httpx.post(f"{url}/judge", json=body, headers=headers)
            assert response.status_code == 401
            assert "LEVER_JUDGE_TOKEN" in response.json()["error"]
            assert TOKEN not in response.text
        assert httpx.get(f"{url}/health").status_code == 401
        ok = httpx.post(f"{url}/judge", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.json()["verdicts"] == [formula(2, [1, 2])]
        monkeypatch.delenv("LEVER_JUDGE_TOKEN", raising=False)
        with pytest.raises(LeverError, match="HTTP 401, no token: set LEVER_JUDGE_TOKEN"):
            remote(url)
        monkeypatch.setenv("LEVER_JUDGE_TOKEN", "not-it")
        with pytest.raises(LeverError, match="HTTP 401, the token in LEVER_JUDGE_TOKEN"):
            remote(url)
        monkeypatch.setenv("LEVER_JUDGE_TOKEN", TOKEN)
        assert remote(url).judge([3], [[4]]) == [formula(3, [4])]


# ------------------------------------------------------------------ the client
@needs_serve
def test_a_failure_is_retried(capsys) -> None:
    env = FormulaEnv(fail=1)
    with serving(env) as url:
        out = remote(url, remote_concurrency=1).judge(*pairs(2))
    assert out == [formula(0, [1, 3]), formula(1, [2, 5])]
    assert env.calls == 2  # the failed call, then its retry
    assert capsys.readouterr().err == ""  # a retry that succeeds is not worth a warning


@needs_serve
def test_a_server_that_always_fails_ends_with_one_line_naming_it() -> None:
    env = FormulaEnv(fail=10**6)
    with serving(env) as url:
        client = remote(url, remote_retries=2, remote_concurrency=1)
        with pytest.raises(LeverError) as caught:
            client.judge(*pairs(2))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"--judge-url: every judge server failed: {url} (HTTP 500")
    assert "RuntimeError: GPU fell over on call 3" in message
    assert env.calls == 3  # 1 + 2 retries


@pytest.mark.parametrize(
    ("answer", "fragment"),
    [("short", "returned 1 verdicts for 2 sequences"), ("garbage", "vqa_acc_score is 'lots'")],
)
@needs_serve
def test_an_unusable_answer_is_one_line_not_retried_and_nothing_is_stored(
    answer: str, fragment: str, tmp_path: Path
) -> None:
    env = FormulaEnv(answer=answer)
    store = VerdictStore(tmp_path / "v.sqlite")
    with serving(env) as url:
        client = remote(url)
        judge = Judge(client, "remote", store, lambda v: v["vqa_correct"])
        with pytest.raises(LeverError) as caught:
            judge.verdicts(*pairs(2))
    assert "\n" not in str(caught.value) and fragment in str(caught.value)
    assert f"judge server {url}: HTTP 500" in str(caught.value)
    assert env.calls == 1  # a permanent failure: no retry
    assert store.versions("formula") == {}


@needs_serve
def test_a_server_answering_the_wrong_count_or_no_json_is_one_line() -> None:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    async def health(request: Any) -> Any:
        return JSONResponse({"name": "formula", "version": "7"})

    for body in (
        JSONResponse({"verdicts": [formula(0, [1])], "name": "formula", "version": "7"}),
        PlainTextResponse("<html>proxy error page</html>"),
        JSONResponse({"verdicts": [formula(0, [1])] * 2, "name": "formula", "version": "8"}),
    ):

        async def judge(request: Any, body: Any = body) -> Any:
            return body

        app = Starlette(routes=[Route("/health", health), Route("/judge", judge, methods=["POST"])])
        app.state.pool = FakePool()
        with serving_app(app) as url:
            with pytest.raises(LeverError) as caught:
                remote(url).judge(*pairs(2))
        message = str(caught.value)
        assert "\n" not in message and message.startswith(f"judge server {url}")
        assert any(
            s in message
            for s in ("answered 1 verdicts for 2", "not JSON: '<html>", "now serves formula 8")
        ), message


class FakePool:
    def shutdown(self, **kwargs: Any) -> None:
        pass


@contextlib.contextmanager
def serving_app(app: Any) -> Iterator[str]:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive()
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@needs_serve
def test_with_one_server_dead_or_failing_the_other_carries_the_batches(capsys) -> None:
    good, failing = FormulaEnv(), FormulaEnv(fail=10**6)
    qids, seqs = pairs(20)
    expected = [formula(q, s) for q, s in zip(qids, seqs, strict=True)]
    with serving(good) as up, serving(failing) as bad:
        down = dead_url()
        client = remote(down, up, bad, remote_retries=1)
        err = capsys.readouterr().err
        assert err == (
            f"warning: judge server {down} did not answer (ConnectError: [Errno 111] "
            "Connection refused); judging on the others\n"
        )
        assert client.judge(qids, seqs) == expected
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"warning: judge server {bad} failed 2 times")
        assert good.calls == 7  # every batch of 3 (7 batches for 20 pairs) ended there
        # both stay skipped for a while: the next call goes to the good one alone
        calls = failing.calls
        assert client.judge(qids[:3], seqs[:3]) == expected[:3]
        assert failing.calls == calls and good.calls == 8


class SleepyEnv(FormulaEnv):
    """Takes ``seconds`` over every batch."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def judge(self, query_ids: Sequence[int], sequences: Sequence[Sequence[int]]) -> Any:
        with self.lock:
            self.calls += 1  # counted as it starts
        time.sleep(self.seconds)
        return [formula(q, s) for q, s in zip(query_ids, sequences, strict=True)]


@needs_serve
def test_a_server_that_times_out_is_retried_then_skipped(capsys) -> None:
    slow, quick = SleepyEnv(2.0), FormulaEnv()
    qids, seqs = pairs(6)
    with serving(slow, Limits(threads=4)) as late:
        client = remote(late, remote_timeout=0.3, remote_retries=1, remote_concurrency=1)
        with pytest.raises(LeverError) as caught:
            client.judge(qids, seqs)
        assert str(caught.value) == (
            f"--judge-url: every judge server failed: {late} (no answer within 0.3 s)"
        )
        assert slow.calls == 2  # the first try and one retry
        with serving(quick) as up:
            client = remote(late, up, remote_timeout=0.3, remote_retries=1)
            assert client.judge(qids, seqs) == [
                formula(q, s) for q, s in zip(qids, seqs, strict=True)
            ]
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"warning: judge server {late} failed 2 times (no answer within 0.3 s); "
        "skipping it, judging on the others"
    ]


@needs_serve
def test_servers_that_judge_differently_or_none_alive_are_refused() -> None:
    other = FormulaEnv()
    other.version = "8"
    with serving(FormulaEnv()) as a, serving(other) as b:
        with pytest.raises(
            LeverError, match=f"differently: {a} serves formula 7, {b} serves formula 8"
        ):
            remote(a, b)
    down = dead_url()
    with pytest.raises(LeverError, match=f"^--judge-url: no judge server answered: {down} \\("):
        remote(down, remote_retries=0)


def test_urls_are_checked_and_options_are_needed() -> None:
    env = RemoteEnvironment()
    if HAVE_SERVE:
        with pytest.raises(LeverError, match="name the judge server with --judge-url URL"):
            env.configure({"judge_url": ()})
        with pytest.raises(LeverError, match="'ftp://x' is not an http:// or https:// URL"):
            env.configure({"judge_url": ("ftp://x",)})
        with pytest.raises(LeverError, match="put the credentials in LEVER_JUDGE_TOKEN"):
            env.configure({"judge_url": ("http://me:pw@host:1",)})
    with pytest.raises(LeverError, match="not configured"):
        env.judge([1], [[2]])


# ------------------------------------------------------------------ runs
def judge_rank_args(tmp_path: Path, name: str, *judge: str) -> list[Any]:
    doc = json.loads(Path(DIGITS["train"]).read_text())
    keep = [k for k in doc if k.isdigit()][:30]
    data = tmp_path / "d.json"
    if not data.exists():
        write_json(data, {k: doc[k] for k in keep})
    args = ["--beam-data", data, "--img-emb", DIGITS["embeddings"], "--output-dir", tmp_path / name]
    args += ["--store", tmp_path / f"{name}.sqlite", "--plugin", "judge-rank", "--rce-epochs", "0"]
    args += ["--rank-epochs", "2", "--rank-candidates", "5", "--val-ratio", "0.2", "--seed", "3"]
    return [*args, *judge]


def weights(run: Path) -> dict[str, Any]:
    return load_file(str(run / "judge-rank_epoch02.safetensors"))


def stored(path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(
            "SELECT env, version, query, sequence, correct, acc, gt_prob, rel FROM verdicts "
            "ORDER BY query, sequence"
        ).fetchall()


@needs_serve
def test_a_run_judged_remotely_is_bit_identical_and_never_writes_the_token(
    cli, tmp_path, monkeypatch
) -> None:
    local = cli(*judge_rank_args(tmp_path, "local", "--judge", "digits"))
    assert local.exit_code == 0, local.output
    monkeypatch.setenv("LEVER_JUDGE_TOKEN", TOKEN)
    envs = [lever_digits_env.DigitsEnvironment() for _ in range(2)]
    with serving(envs[0], token=TOKEN) as a, serving(envs[1], token=TOKEN) as b:
        args = ["--judge", "remote", "--judge-url", a, "--judge-url", b]
        args += ["--remote-batch-size", "4", "--remote-backoff", "0.01"]
        far = cli(*judge_rank_args(tmp_path, "remote", *args))
    assert far.exit_code == 0, far.output
    assert "judge: environment digits 1 (plugin remote)" in far.output
    ours, theirs = weights(tmp_path / "local"), weights(tmp_path / "remote")
    assert ours.keys() == theirs.keys()
    assert all(ours[k].equal(theirs[k]) for k in ours)
    # the same store key and the same verdicts as the in-process judge
    rows = stored(tmp_path / "remote.sqlite")
    assert rows == stored(tmp_path / "local.sqlite") and rows[0][:2] == ("digits", "1")
    config = json.loads((tmp_path / "remote" / "run_config.json").read_text())
    assert config["plugin_options"]["remote"]["judge_url"] == [a, b]
    for path in [*(tmp_path / "remote").rglob("*"), tmp_path / "remote.sqlite"]:
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert TOKEN not in far.output


# ------------------------------------------------------------------ the command
@needs_serve
def test_serve_judge_command_serves_until_stopped(tmp_path) -> None:
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "LEVER_JUDGE_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lever_trainer", "serve-judge", "digits", "--port", str(port)]
    cmd += ["--digits-task", "t2", "--threads", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", headers=headers)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "serve-judge did not start"
                time.sleep(0.1)
        t2 = lever_digits_env.DigitsEnvironment()
        t2.configure({"digits_task": "t2"})
        assert health.json()["version"] == t2.version != "1"  # --digits-task reached it
        body = {"query_ids": [3], "sequences": [[10, 11]]}
        answer = httpx.post(f"http://127.0.0.1:{port}/judge", json=body, headers=headers)
        assert answer.json()["verdicts"] == t2.judge([3], [[10, 11]])
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0].decode()
    assert out.splitlines()[0].startswith(
        f"serving environment digits {t2.version} (plugin digits) on http://127.0.0.1:{port}"
    )
    assert "bearer token required" in out and TOKEN not in out and "Traceback" not in out


def test_serve_judge_names_an_unknown_environment_in_one_line(cli) -> None:
    if not HAVE_SERVE:
        pytest.skip("the serve extra is not installed")
    assert_user_error(cli("serve-judge", "nope"), "no active plugin provides environment 'nope'")


@needs_serve
def test_serve_judge_names_a_port_in_use_in_one_line(cli) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("serve-judge", "digits", "--port", port)
    assert_user_error(result, f"--port: cannot listen on 127.0.0.1:{port} (Address already in use)")
    assert_user_error(cli("serve-judge", "digits", "--host", "no such host"), "--host: cannot")


@needs_serve
def test_evaluate_judges_over_http_as_in_process(cli, tmp_path) -> None:
    doc = json.loads(Path(DIGITS["test"]).read_text())
    keep = [k for k in doc if k.isdigit()][:12]
    queries = write_json(tmp_path / "q.json", {k: doc[k] for k in keep})
    args = ["evaluate", "--queries", queries, "--img-emb", DIGITS["embeddings"], "--no-store"]
    args += ["--baselines", "cosine,random"]
    local = cli(*args, "--judge", "digits", "--output", tmp_path / "local.json")
    assert local.exit_code == 0, local.output
    with serving(lever_digits_env.DigitsEnvironment()) as url:
        far = cli(*args, "--judge", "remote", "--judge-url", url, "--output", tmp_path / "far.json")
    assert far.exit_code == 0, far.output
    ours = json.loads((tmp_path / "local.json").read_text())
    theirs = json.loads((tmp_path / "far.json").read_text())
    # the same report; only the plugin that reached the judge differs
    assert ours.pop("judge") == {"name": "digits", "version": "1", "plugin": "digits"}
    assert theirs.pop("judge") == {"name": "digits", "version": "1", "plugin": "remote"}
    # the judge's cost is the same but for its wall-clock seconds
    assert (
        ours["judge_cost"].pop("judge_seconds") >= 0
        and theirs["judge_cost"].pop("judge_seconds") >= 0
    )
    assert ours == theirs and "judge: digits 1" in far.output
    assert "judge_correct" in json.dumps(theirs)


def test_without_the_extra_each_end_says_what_to_install(cli, monkeypatch) -> None:
    for module in ("httpx", "starlette", "uvicorn"):
        monkeypatch.setitem(sys.modules, module, None)  # importing it raises ImportError
    assert_user_error(cli("serve-judge", "digits"), "pip install 'lever-trainer[serve]'")
    with pytest.raises(LeverError, match=r"^--judge remote needs httpx: pip install "):
        RemoteEnvironment().configure({"judge_url": ("http://127.0.0.1:1",)})


def test_the_core_imports_without_the_extra() -> None:
    code = (
        "import sys\n"
        "for m in ('httpx', 'starlette', 'uvicorn'): sys.modules[m] = None\n"
        "import lever_trainer.cli, lever_trainer.serve, lever_trainer_plugins.remote\n"
        "from lever_trainer.plugins import load_plugins\n"
        "from lever_trainer.judge import environments_from_plugins\n"
        "print(sorted(environments_from_plugins(load_plugins())))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "'remote'" in out.stdout

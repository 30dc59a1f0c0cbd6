"""The judge fanned out on Ray (``--judge-backend ray``), on a real local Ray cluster.

The tests marked ``ray`` need Ray (``pip install 'lever-trainer[ray]'``; ``tox -e ray``
runs them); the default suite deselects them. The module starts one local cluster
(2 CPUs, no dashboard) for all of them and stops it at the end.
"""

from __future__ import annotations

import json
import random
import re
import sqlite3
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lever_digits_env
import pytest
import torch
from conftest import assert_user_error, write_json
from safetensors.torch import load_file, save_file

from lever_trainer.judge import Environment, Judge, VerdictStore
from lever_trainer.judge_driver import DriverSettings, RoundProgress
from lever_trainer.ray_judge import PluginEnvironment  # imports Ray only when used

FILES = lever_digits_env.files()
DOC = json.loads(Path(FILES["train"]).read_text())
DIGITS = ("lever_trainer_digits", "digits", ("digits",), ())


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    # the test module's own classes travel to the workers by value (tests/ is not
    # importable there)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # "local": a cluster of the tests' own, even when the machine has another (or a
    # stale record of one that ray start left in /tmp/ray)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def digits_factory() -> PluginEnvironment:
    return PluginEnvironment("digits", "digits", ("digits",), (), {})


class SlowDigits:
    """Builds the digits environment, each call made ``seconds`` slower (a slow model)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self) -> Environment:
        env = digits_factory()()
        inner = env.judge

        def judge(query_ids: Sequence[int], sequences: Sequence[Sequence[int]]) -> Any:
            time.sleep(self.seconds)
            return inner(query_ids, sequences)

        env.judge = judge  # type: ignore[method-assign]
        return env


def wait_dead(ray: Any, actor: Any) -> None:
    """Until a call to the killed ``actor`` fails (``ray.kill`` returns before that)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ray.get(actor.describe.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.05)
    raise AssertionError("the killed actor still answers after 30 s")


def pairs(n_queries: int, per_query: int, seed: int = 0) -> tuple[list[int], list[list[int]]]:
    """Ordered 2-shot sequences from the pools of the first digits training queries."""
    rng = random.Random(seed)
    qids, seqs = [], []
    for key in [k for k in DOC if k.isdigit()][:n_queries]:
        pool = DOC[key]["candidate_pool_ids"]
        for _ in range(per_query):
            qids.append(int(key))
            seqs.append(rng.sample(pool, 2))
    return qids, seqs


def store_rows(path: Path) -> list[tuple[Any, ...]]:
    """Every stored verdict with its pool (not the row ids or times, which tell when)."""
    with sqlite3.connect(path) as db:
        return db.execute(
            "SELECT v.env, v.version, v.query, v.sequence, v.correct, v.acc, v.gt_prob, "
            "v.rel, p.pool FROM verdicts v LEFT JOIN verdict_pools p ON p.id = v.pool_id "
            "ORDER BY v.query, v.sequence"
        ).fetchall()


def judged(env: Environment, store: Path, qids: list[int], seqs: list[list[int]], **kw: Any):
    pools = {q: DOC[str(q)]["candidate_pool_ids"] for q in set(qids)}
    settings = DriverSettings(batch_size=6, concurrency=kw.pop("concurrency", 2), retries=3)
    settings = DriverSettings(**{**vars(settings), "backoff": 0.05, **kw})
    judge = Judge(
        env, "digits", VerdictStore(store), lambda v: v["vqa_acc_score"], None, None, settings
    )
    return judge, judge.verdicts(qids, seqs, pools)


@pytest.mark.ray
@pytest.mark.parametrize("workers", [1, 2])
def test_verdicts_through_ray_actors_equal_the_in_process_ones(cluster, tmp_path, workers) -> None:
    from lever_trainer.ray_judge import RayEnvironment

    qids, seqs = pairs(12, 6)  # 72 pairs, 12 batches of 6
    local = digits_factory()()
    _, expected = judged(local, tmp_path / "local.sqlite", qids, seqs)
    remote = RayEnvironment(digits_factory()(), "digits", digits_factory(), workers=workers)
    try:
        assert len(remote.actors) == workers
        judge, got = judged(remote, tmp_path / "ray.sqlite", qids, seqs, concurrency=workers)
        assert got == expected
        assert judge.cost.calls == 72 and judge.cost.batches == 12 and judge.cost.retries == 0
    finally:
        remote.close()
    assert store_rows(tmp_path / "ray.sqlite") == store_rows(tmp_path / "local.sqlite")
    distinct = {(q, tuple(s)) for q, s in zip(qids, seqs, strict=True)}
    assert len(store_rows(tmp_path / "ray.sqlite")) == len(distinct)


@pytest.mark.ray
def test_an_actor_killed_mid_round_is_replaced_and_its_batch_asked_again(cluster, tmp_path) -> None:
    from lever_trainer.ray_judge import RayEnvironment

    qids, seqs = pairs(12, 6, seed=1)
    _, expected = judged(digits_factory()(), tmp_path / "local.sqlite", qids, seqs)
    remote = RayEnvironment(digits_factory()(), "digits", SlowDigits(0.3), workers=2)
    first = remote.actors[0]
    killed: list[int] = []

    def kill_once(progress: RoundProgress) -> None:
        # after the first batch returns, the other actor is still busy with its own:
        # the kill lands on an actor with a batch in flight or about to get one
        if not killed:
            cluster.kill(first, no_restart=True)
            wait_dead(cluster, first)
            killed.append(progress.done)

    try:
        pools = {q: DOC[str(q)]["candidate_pool_ids"] for q in set(qids)}
        settings = DriverSettings(batch_size=6, concurrency=2, retries=3, backoff=0.05)
        judge = Judge(
            remote,
            "digits",
            VerdictStore(tmp_path / "ray.sqlite"),
            lambda v: 0.0,
            None,
            None,
            settings,
        )
        judge.progress = kill_once
        got = judge.verdicts(qids, seqs, pools)
        assert killed == [6]
        assert remote.replaced == 1 and first not in remote.actors and len(remote.actors) == 2
        # the lost batch was asked again (and one handed to the dead actor before Ray
        # reported it dead, if any): 12 batches delivered, each lost one asked again
        assert judge.cost.retries in (1, 2)
        assert judge.cost.batches == 12 + judge.cost.retries
        assert got == expected
    finally:
        remote.close()
    assert store_rows(tmp_path / "ray.sqlite") == store_rows(tmp_path / "local.sqlite")


def _train_args(tmp_path: Path, name: str) -> list[Any]:
    doc = {k: DOC[k] for k in [k for k in DOC if k.isdigit()][:30]}
    data = write_json(tmp_path / "d.json", doc)
    args = ["--beam-data", data, "--img-emb", FILES["embeddings"], "--output-dir", tmp_path / name]
    args += ["--judge", "digits", "--store", tmp_path / f"{name}.sqlite"]
    args += ["--plugin", "judge-rank", "--rce-epochs", "0", "--rank-epochs", "2"]
    args += ["--rank-candidates", "5", "--val-ratio", "0.2", "--seed", "3"]
    return [*args, "--judge-batch-size", "8", "--deterministic"]


@pytest.mark.ray
def test_a_training_run_judged_on_ray_is_bit_identical_to_the_local_one(
    cluster, cli, tmp_path
) -> None:
    local = cli(*_train_args(tmp_path, "local"))
    assert local.exit_code == 0, local.output
    ray_args = [*_train_args(tmp_path, "ray"), "--judge-backend", "ray", "--judge-workers", "2"]
    remote = cli(*ray_args)
    assert remote.exit_code == 0, remote.output
    weights = sorted(p.name for p in (tmp_path / "local").rglob("*.safetensors"))
    assert weights and weights == sorted(p.name for p in (tmp_path / "ray").rglob("*.safetensors"))
    for name in weights:
        a = load_file(str(next((tmp_path / "local").rglob(name))))
        b = load_file(str(next((tmp_path / "ray").rglob(name))))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert store_rows(tmp_path / "ray.sqlite") == store_rows(tmp_path / "local.sqlite")
    # the options are recorded; the actors are gone once the run ends
    recorded = json.loads((tmp_path / "ray" / "run_config.json").read_text())["options"]
    assert recorded["judge_backend"] == "ray" and recorded["judge_workers"] == 2
    deadline = time.monotonic() + 30
    while cluster.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cluster.available_resources().get("CPU", 0) == 2


class SlowPluginEnvironment:
    """Stands in for :class:`PluginEnvironment` in a run: the same environment, each call
    0.1 s slower, so that a round lasts long enough to lose an actor in it."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        self.inner = PluginEnvironment(*args, **kw)

    def __call__(self) -> Environment:
        env = self.inner()
        inner = env.judge

        def judge(query_ids: Sequence[int], sequences: Sequence[Sequence[int]]) -> Any:
            time.sleep(0.1)
            return inner(query_ids, sequences)

        env.judge = judge  # type: ignore[method-assign]
        return env


@pytest.mark.ray
def test_an_actor_killed_in_a_training_run_is_replaced_and_the_run_ends_the_same(
    cluster, cli, tmp_path, monkeypatch
) -> None:
    import lever_trainer.ray_judge as ray_judge

    made: list[Any] = []

    class KillingRayEnvironment(ray_judge.RayEnvironment):
        """Kills its first actor as the third batch of the run is handed out (the first
        two are in flight or just back)."""

        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            self.handed, self.killed = 0, None
            made.append(self)

        async def judge(self, query_ids: Sequence[int], sequences: Sequence[Sequence[int]]):
            self.handed += 1
            if self.handed == 3:
                self.killed = self.actors[0]
                cluster.kill(self.killed, no_restart=True)
                wait_dead(cluster, self.killed)
            return await super().judge(query_ids, sequences)

    monkeypatch.setattr(ray_judge, "PluginEnvironment", SlowPluginEnvironment)
    monkeypatch.setattr(ray_judge, "RayEnvironment", KillingRayEnvironment)
    local = cli(*_train_args(tmp_path, "local"))
    assert local.exit_code == 0, local.output
    ray_args = [*_train_args(tmp_path, "ray"), "--judge-backend", "ray", "--judge-workers", "2"]
    remote = cli(*ray_args)
    assert remote.exit_code == 0, remote.output
    (env,) = made
    assert env.killed is not None and env.replaced == 1
    # the batches lost with the actor (the one in flight on it, and one handed to it
    # before its replacement) were asked again: epoch 1's 121 verdicts plus at most 8
    # (the batch size) per retry
    first = next(ln for ln in remote.output.splitlines() if "judge-rank epoch 1/2" in ln)
    found = re.search(r"judge: (\d+) calls in .* (\d+) retr(?:y|ies)", first)
    assert found is not None, first
    calls, retries = int(found.group(1)), int(found.group(2))
    assert retries in (1, 2) and 121 < calls <= 121 + 8 * retries, first
    weights = sorted(p.name for p in (tmp_path / "local").glob("*.safetensors"))
    assert weights
    for name in weights:
        a, b = load_file(str(tmp_path / "local" / name)), load_file(str(tmp_path / "ray" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert store_rows(tmp_path / "ray.sqlite") == store_rows(tmp_path / "local.sqlite")


@pytest.mark.ray
def test_a_stopped_local_run_resumed_on_ray_ends_as_the_uninterrupted_one(
    cluster, cli, tmp_path
) -> None:
    """The backend and the worker count change how verdicts are fetched, not what they
    are: a run stopped by its judge budget, resumed with --judge-backend ray, ends with
    the weights of a run that was neither stopped nor sent to Ray. (The whole run asks
    130 verdicts: 6 in the starting validation (one greedy pick per validation query),
    121 in epoch 1 and 3 in epoch 2, as its epoch lines say; a budget of 127, asked one at a time, stops it at the start of epoch 2,
    which Ray then judges.)"""
    whole = cli(*_train_args(tmp_path, "whole"))
    assert whole.exit_code == 0, whole.output
    args = _train_args(tmp_path, "split")
    stopped = cli(*args, "--judge-max-calls", "127", "--judge-batch-size", "1")
    assert stopped.exit_code == 3, stopped.output
    assert "stopped by the judge budget (--judge-max-calls 127:" in stopped.output
    run = tmp_path / "split"
    resumed = cli(
        "--resume",
        run,
        "--judge-max-calls",
        "0",
        "--judge-backend",
        "ray",
        "--judge-workers",
        "2",
        "--judge-batch-size",
        "2",
    )
    assert resumed.exit_code == 0, resumed.output
    assert "judge: 3 calls" in resumed.output  # epoch 2's verdicts came from the Ray workers
    weights = sorted(p.name for p in (tmp_path / "whole").glob("*.safetensors"))
    assert weights
    for name in weights:
        a, b = load_file(str(tmp_path / "whole" / name)), load_file(str(run / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    recorded = json.loads((run / "run_config.json").read_text())
    assert recorded["options"]["judge_backend"] == "ray"
    assert recorded["resumes"][-1]["changed"]["judge_workers"] == [1, 2]


class Flaky:
    """Builds the digits environment whose first call in each actor fails with
    ``error`` (a class and a message)."""

    def __init__(self, error: type[BaseException], message: str) -> None:
        self.error, self.message = error, message

    def __call__(self) -> Environment:
        env = digits_factory()()
        inner, calls = env.judge, []

        def judge(query_ids: Sequence[int], sequences: Sequence[Sequence[int]]) -> Any:
            calls.append(1)
            if len(calls) == 1:
                raise self.error(self.message)
            return inner(query_ids, sequences)

        env.judge = judge  # type: ignore[method-assign]
        return env


@pytest.mark.ray
def test_errors_raised_in_an_actor_count_as_in_process(cluster, tmp_path) -> None:
    from lever_trainer.errors import PluginError
    from lever_trainer.judge_driver import TransientJudgeError
    from lever_trainer.ray_judge import RayEnvironment

    qids, seqs = pairs(2, 3)  # one batch of 6
    _, expected = judged(digits_factory()(), tmp_path / "local.sqlite", qids, seqs)
    # transient: asked again (the actor answers the second call)
    remote = RayEnvironment(digits_factory()(), "digits", Flaky(TransientJudgeError, "busy"))
    try:
        judge, got = judged(remote, tmp_path / "t.sqlite", qids, seqs, concurrency=1)
        assert got == expected and judge.cost.retries == 1 and remote.replaced == 0
    finally:
        remote.close()
    # anything else: the run ends with one line naming the cause, not Ray's traceback
    remote = RayEnvironment(digits_factory()(), "digits", Flaky(ValueError, "bad prompt"))
    try:
        with pytest.raises(PluginError) as failed:
            judged(remote, tmp_path / "p.sqlite", qids, seqs, concurrency=1)
    finally:
        remote.close()
    line = str(failed.value)
    assert "\n" not in line and "ValueError: bad prompt (batch 1 of 1, first query" in line


@pytest.mark.ray
def test_actors_of_another_environment_version_stop_the_run(cluster) -> None:
    from lever_trainer.errors import PluginError
    from lever_trainer.ray_judge import RayEnvironment

    other = PluginEnvironment("digits", "digits", ("digits",), (), {"digits_task": "t1"})
    with pytest.raises(PluginError, match=r"runs as digits 1\+[0-9a-f]{12} in a Ray actor"):
        RayEnvironment(digits_factory()(), "digits", other, workers=1)


def test_ray_options_without_the_ray_backend_are_named_in_a_warning(cli, tmp_path) -> None:
    result = cli(*_train_args(tmp_path, "run"), "--judge-workers", "4", "--rank-epochs", "1")
    assert result.exit_code == 0, result.output
    assert (
        "warning: --judge-workers apply only with --judge-backend ray; this run judges in "
        "its own process"
    ) in result.output


def test_without_ray_the_backend_says_how_to_install_it(cli, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    result = cli(*_train_args(tmp_path, "run"), "--judge-backend", "ray")
    assert_user_error(result, "--judge-backend ray", "pip install 'lever-trainer[ray]'")


@pytest.mark.ray
def test_collect_judged_on_ray_writes_the_local_file(cluster, cli, tmp_path) -> None:
    """``lever-train collect --judge-backend ray``: the same RL data, byte for byte, and
    the same store rows as the in-process collect (its beam search depends only on the
    verdicts, not on which actor gave them or in what order they came back)."""
    test = json.loads(Path(FILES["test"]).read_text())
    keys = [k for k in test if k.isdigit()][:8]
    pools = write_json(
        tmp_path / "pools.json", {k: test[k]["candidate_pool_ids"][:9] for k in keys}
    )

    def collect(name: str, *more: object) -> Any:
        return cli(
            "collect", pools, "--judge", "digits", "--shots", "2", "--beam-size", "3",
            "--random", "2", "--cosine", "--img-emb", FILES["embeddings"],
            "--store", tmp_path / f"{name}.sqlite", "--output", tmp_path / f"{name}.json",
            "--judge-batch-size", "16", *more,
        )  # fmt: skip

    local = collect("local")
    assert local.exit_code == 0, local.output
    on_ray = collect("ray", "--judge-backend", "ray", "--judge-workers", "2")
    assert on_ray.exit_code == 0, on_ray.output
    written = (tmp_path / "ray.json").read_bytes()
    assert written == (tmp_path / "local.json").read_bytes()
    assert len(json.loads(written)) == 8 + 1  # the queries and _meta
    assert store_rows(tmp_path / "ray.sqlite") == store_rows(tmp_path / "local.sqlite")


@pytest.mark.ray
def test_the_openai_vlm_judge_on_ray_actors_equals_in_process(cluster, tmp_path) -> None:
    """An ``async def judge`` environment with its own options (``openai-vlm`` against a
    fake OpenAI-compatible server on 127.0.0.1) built and configured in two Ray actors:
    the same verdicts, answers and store rows as in process."""
    pytest.importorskip("httpx")
    from vlm_fake import FakeVLM

    from lever_trainer.ray_judge import RayEnvironment

    (tmp_path / "img").mkdir()
    lines = []
    for gid in range(6):
        (tmp_path / "img" / f"{gid}.png").write_bytes(b"\x89PNG picture %d" % gid)
        answers = ["red", "blue", "green"][gid % 3 : gid % 3 + 1] * 10
        item = {"id": gid, "image": f"img/{gid}.png", "question": f"q{gid}?", "answers": answers}
        lines.append(json.dumps(item) + "\n")
    (tmp_path / "items.jsonl").write_text("".join(lines))
    emb = torch.eye(6)[:, :4] + 0.1
    save_file({"emb": emb}, str(tmp_path / "emb.safetensors"))
    server = FakeVLM().start()
    options = {
        "vlm_url": server.url, "vlm_model": "tiny-vlm", "vlm_timeout": 5.0,
        "vlm_manifest": str(tmp_path / "items.jsonl"), "img_emb": str(tmp_path / "emb.safetensors"),
    }  # fmt: skip
    factory = PluginEnvironment("openai-vlm", "openai-vlm", ("openai-vlm",), (), options)
    qids = [0, 0, 3, 3, 4, 5]
    seqs = [[1, 2], [2, 1], [0, 1], [4, 5], [3, 0], [1, 4]]
    settings = DriverSettings(batch_size=2, concurrency=2, retries=0)

    def run(env: Environment, name: str) -> list[Any]:
        judge = Judge(
            env, "openai-vlm", VerdictStore(tmp_path / name), lambda v: 0.0, None, None, settings
        )
        return judge.verdicts(qids, seqs)

    try:
        expected = run(factory(), "local.sqlite")
        remote = RayEnvironment(factory(), "openai-vlm", factory, workers=2)
        try:
            got = run(remote, "ray.sqlite")
        finally:
            remote.close()
    finally:
        server.stop()
    assert got == expected and len(got) == 6
    assert {v["vqa_pred_answer"] for v in got} >= {
        "blue",
        "green",
    }  # the fake copies the last answer
    with (
        sqlite3.connect(tmp_path / "ray.sqlite") as ray_db,
        sqlite3.connect(tmp_path / "local.sqlite") as db,
    ):
        query = "SELECT version, query, sequence, correct, acc, gt_prob, rel, answer FROM verdicts ORDER BY query, sequence"
        assert ray_db.execute(query).fetchall() == db.execute(query).fetchall()

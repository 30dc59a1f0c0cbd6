"""Judges as plugins: the digits environment, the verdict store, bad judges."""

from __future__ import annotations

import json
import math
import multiprocessing
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import lever_digits_env
import pytest
from conftest import builtin_registry

from lever_trainer.data import DataOptions, load_rl_data
from lever_trainer.errors import LeverError, PluginError
from lever_trainer.judge import (
    VERDICT_FIELDS,
    Environment,
    Judge,
    VerdictStore,
    export_rl_data,
)

FILES = lever_digits_env.files()


def test_digits_environment_reproduces_the_logged_verdicts() -> None:
    """Every logged candidate of the training file carries the original judge's verdict
    (rounded to 6 decimals): ours gives the same fields."""
    doc = json.loads(Path(FILES["train"]).read_text())
    queries, sequences, logged = [], [], []
    for key, value in doc.items():
        if key.isdigit():
            for cand in value["pointer_candidates"]:
                queries.append(int(key))
                sequences.append(cand["pointer_global"])
                logged.append(cand)
    got = lever_digits_env.DigitsEnvironment().judge(queries, sequences)
    assert len(got) == len(logged) > 6000
    for verdict, cand in zip(got, logged, strict=True):
        assert verdict["vqa_correct"] == cand["vqa_correct"]
        for name in VERDICT_FIELDS[1:]:
            assert abs(verdict[name] - cand[name]) <= 5.1e-7, (name, verdict, cand)


class Counting(Environment):
    """A tiny judge: correct when the sequence's last id is even; counts its calls."""

    name, version, cheap = "toy", "1", True

    def __init__(self) -> None:
        self.asked: list[tuple[int, tuple[int, ...]]] = []

    def judge(self, query_ids: Sequence[int], sequences: Sequence[Sequence[int]]) -> list[dict]:
        self.asked += [(q, tuple(s)) for q, s in zip(query_ids, sequences, strict=True)]
        return [
            {
                "vqa_correct": float(s[-1] % 2 == 0),
                "vqa_acc_score": 0.5,
                "vqa_gt_prob": 0.25,
                "vqa_rel_score": 0.0,
            }
            for s in sequences
        ]


def reward(verdict) -> float:
    return verdict["vqa_correct"] + verdict["vqa_acc_score"]


def test_verdicts_are_stored_and_never_judged_twice(tmp_path: Path) -> None:
    env = Counting()
    judge = Judge(env, "toy-plugin", VerdictStore(tmp_path / "v.sqlite"), reward)
    first = judge.verdicts([1, 1, 2], [[3, 4], [4, 3], [3, 4]])
    assert [v["vqa_correct"] for v in first] == [1.0, 0.0, 1.0]
    assert first[0] == {
        "vqa_correct": 1.0,
        "vqa_acc_score": 0.5,
        "vqa_gt_prob": 0.25,
        "vqa_rel_score": 0.0,
    }
    again = judge.verdicts([1, 2, 1], [[3, 4], [3, 4], [3, 4]])
    assert len(env.asked) == 3 and again[0] == first[0]
    assert judge.calls == {1: 2, 2: 1}
    # a new process (a new Judge) reads them from the store instead of judging
    env2 = Counting()
    later = Judge(env2, "toy-plugin", VerdictStore(tmp_path / "v.sqlite"), reward)
    assert later.rewards([1], [[4, 3]]) == ([0.5], [0.0])
    assert env2.asked == [] and later.calls_per_query([1]) == 0.0


def _write_many(path: str, offset: int) -> None:
    judge = Judge(Counting(), "toy", VerdictStore(path), reward)
    for q in range(20):
        judge.verdicts([q] * 10, [[offset + i, i] for i in range(10)])


def test_concurrent_runs_share_one_store(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.sqlite")
    VerdictStore(path).close()
    procs = [
        multiprocessing.get_context("spawn").Process(target=_write_many, args=(path, o))
        for o in (100, 200)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    rows = sqlite3.connect(path).execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]
    assert rows == 2 * 20 * 10


def test_store_of_another_environment_version_is_not_reused(tmp_path: Path) -> None:
    store = tmp_path / "v.sqlite"
    Judge(Counting(), "toy", VerdictStore(store), reward).verdicts([1], [[3, 4]])
    newer = Counting()
    newer.version = "2"
    warnings: list[str] = []
    judge = Judge(newer, "toy", VerdictStore(store), reward, warn=warnings.append)
    judge.verdicts([1], [[3, 4]])
    assert newer.asked == [(1, (3, 4))]
    assert len(warnings) == 1 and "version 1 (1 verdicts)" in warnings[0]
    assert "not of this run's version 2" in warnings[0]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"this is no database, just text" * 100, "the verdict store is damaged .* move it aside"),
        (None, r"not a lever-train verdict store \(it holds tables other\)"),
    ],
)
def test_corrupt_or_foreign_store_is_a_clear_error(tmp_path: Path, content, message) -> None:
    path = tmp_path / "v.sqlite"
    if content is None:
        sqlite3.connect(path).execute("CREATE TABLE other (x)").connection.commit()
    else:
        path.write_bytes(content)
    with pytest.raises(LeverError, match=message):
        VerdictStore(path)


class Bad(Environment):
    name, version = "bad", "1"

    def __init__(self, answer) -> None:
        self.answer = answer

    def judge(self, query_ids, sequences):
        return self.answer(query_ids, sequences)


def boom(q, s):
    raise RuntimeError("model server unreachable")


def _exits(q, s):
    raise SystemExit(0)


def _interrupts(q, s):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    "answer, message",
    [
        (boom, "plugin badp: environment bad failed: RuntimeError: model server unreachable"),
        (lambda q, s: [], "plugin badp: environment bad returned 0 verdicts for 2 sequences"),
        (
            lambda q, s: [{"vqa_correct": 1, "vqa_acc_score": math.nan}] * len(q),
            r"plugin badp: environment bad judged query 1 sequence \[3, 4\]: vqa_acc_score is nan",
        ),
        (
            lambda q, s: [{"vqa_correct": 0.5}] * len(q),
            "vqa_correct is 0.5, expected 0 or 1",
        ),
        (lambda q, s: ["yes"] * len(q), "expected a mapping of verdict fields, got str"),
        (
            lambda q, s: [{"correct": 1}] * len(q),
            r"judged query 1 sequence \[3, 4\]: verdict field vqa_correct is missing",
        ),
        (
            lambda q, s: [{"vqa_correct": 1, "vqa_acc_score": 0.5, "vqa_gt_prob": 0.5}] * len(q),
            "verdict field vqa_rel_score is missing",
        ),
        (
            lambda q, s: [dict.fromkeys(VERDICT_FIELDS, 1.0) | {"vqa_gt_prob": 1.5}] * len(q),
            r"vqa_gt_prob is 1.5, expected a number in \[0, 1\]",
        ),
        (
            lambda q, s: [dict.fromkeys(VERDICT_FIELDS, True)] * len(q),
            "vqa_correct is True, expected a number",
        ),
        (_exits, "plugin badp: environment bad failed: SystemExit: 0"),
        (_interrupts, "plugin badp: environment bad failed: KeyboardInterrupt"),
    ],
)
def test_a_bad_judge_answer_names_the_plugin(tmp_path: Path, answer, message) -> None:
    judge = Judge(Bad(answer), "badp", VerdictStore(tmp_path / "v.sqlite"), reward)
    with pytest.raises(PluginError, match=message):
        judge.verdicts([1, 1], [[3, 4], [5, 6]])
    # nothing of a failed call is stored
    assert VerdictStore(tmp_path / "v.sqlite").versions("bad") == {}


def test_export_gives_rl_data_that_trains(tmp_path: Path) -> None:
    store = VerdictStore(tmp_path / "v.sqlite")
    judge = Judge(Counting(), "toy", store, reward)
    judge.verdicts([7, 7, 9], [[10, 11], [11, 12], [10, 12]], pools={7: [10, 11, 12], 9: [12, 10]})
    doc = export_rl_data(store, "toy", "1")
    assert doc["7"]["candidate_pool_ids"] == [10, 11, 12]
    assert [c["pointer"] for c in doc["7"]["pointer_candidates"]] == [[0, 1], [1, 2]]
    assert doc["9"]["pointer_candidates"][0]["pointer_global"] == [10, 12]
    path = tmp_path / "exported.json"
    path.write_text(json.dumps(doc))
    table, report = load_rl_data(path, DataOptions(), builtin_registry())
    assert report.candidates_total == 3 and table.query_ids.tolist() == [7, 9]
    # raw reward hard_plus_soft = vqa_correct + vqa_acc_score
    assert table.rewards_raw[0, :2].tolist() == [0.5, 1.5]


def test_the_digits_task_option_picks_a_sibling_task_and_keeps_its_verdicts_apart(
    cli, tmp_path
) -> None:
    """--digits-task t2: that task's judge (its own parameters) under a version of its own."""
    import lever_digits_env

    t2 = lever_digits_env.files("t2")
    split = json.loads(Path(t2["split"]).read_text())["predictor"]
    env = lever_digits_env.DigitsEnvironment()
    env.configure({"digits_task": "t2"})
    assert env.params["threshold"] == split["threshold"] == 25.0
    assert env.version.startswith("1+") and env.version != "1"
    assert env.embeddings.shape == (1797, 16)
    env.configure({"digits_task": "t0"})
    assert env.version == "1" and env.params["recency"] == 0.85
    test = json.loads(Path(t2["test"]).read_text())
    queries = {k: v for k, v in list(test.items()) if k.isdigit()}
    qfile = tmp_path / "q.json"
    qfile.write_text(json.dumps(dict(list(queries.items())[:5])))
    args = ["evaluate", "--queries", qfile, "--img-emb", t2["embeddings"], "--judge", "digits"]
    args += ["--store", tmp_path / "v.sqlite", "--baselines", "cosine", "--output"]
    result = cli(*args, tmp_path / "e.json", "--digits-task", "t2")
    assert result.exit_code == 0, result.output
    stored = VerdictStore(tmp_path / "v.sqlite").versions("digits")
    assert list(stored) == [
        lever_digits_env.DigitsEnvironment(lever_digits_env.TASKS["t2"]).version
    ]
    bad = cli(*args, tmp_path / "e2.json", "--digits-task", str(tmp_path / "nowhere"))
    assert bad.exit_code != 0
    assert "--digits-task" in bad.output and "Traceback" not in bad.output


class Sleepy(Environment):
    name, version = "sleepy", "1"

    def judge(self, query_ids, sequences):
        import time

        time.sleep(30)
        return []


def test_a_judge_call_past_its_timeout_is_a_plugin_error(tmp_path: Path) -> None:
    import time

    judge = Judge(Sleepy(), "sleepp", None, reward, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(PluginError, match=r"plugin sleepp: environment sleepy gave no answer within 0\.3 s for 1 sequences \(--judge-timeout\)"):  # fmt: skip
        judge.verdicts([1], [[3, 4]])
    assert time.monotonic() - started < 5


def test_a_stop_request_ends_the_wait_for_the_judge(tmp_path: Path) -> None:
    import time

    from lever_trainer.errors import JudgeStopped

    judge = Judge(Sleepy(), "sleepp", None, reward)
    started = time.monotonic()
    judge.stop_reason = lambda: "SIGTERM" if time.monotonic() - started > 0.3 else None
    with pytest.raises(JudgeStopped, match="SIGTERM"):
        judge.verdicts([1], [[3, 4]])
    assert time.monotonic() - started < 5


def test_a_stop_during_the_start_validation_is_one_line(tmp_path: Path) -> None:
    """No snapshot exists yet: the line says there is nothing to resume."""
    import time

    from test_trainer import make_trainer

    data = tmp_path / "d.json"
    doc = json.loads(Path(FILES["train"]).read_text())
    data.write_text(json.dumps({k: doc[k] for k in [k for k in doc if k.isdigit()][:20]}))
    judge = Judge(Sleepy(), "sleepp", None, reward)
    trainer = make_trainer((data, Path(FILES["embeddings"])), tmp_path / "run", judge=judge)
    started = time.monotonic()
    trainer.stop_requested = "SIGTERM"
    with pytest.raises(LeverError, match="stopped by SIGTERM while waiting for the judge, before this run wrote its first snapshot: nothing to resume"):  # fmt: skip
        trainer.fit()
    assert time.monotonic() - started < 10

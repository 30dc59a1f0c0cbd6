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
            {"vqa_correct": float(s[-1] % 2 == 0), "vqa_acc_score": 0.5, "vqa_gt_prob": 0.25}
            for s in sequences
        ]


def reward(verdict) -> float:
    return verdict["vqa_correct"] + verdict["vqa_acc_score"]


def test_verdicts_are_stored_and_never_judged_twice(tmp_path: Path) -> None:
    env = Counting()
    judge = Judge(env, "toy-plugin", VerdictStore(tmp_path / "v.sqlite"), reward)
    first = judge.verdicts([1, 1, 2], [[3, 4], [4, 3], [3, 4]])
    assert [v["vqa_correct"] for v in first] == [1.0, 0.0, 1.0]
    assert first[0]["vqa_rel_score"] == 0.0  # a missing field counts as 0
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
        (b"this is no database, just text" * 100, "not a readable verdict store"),
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

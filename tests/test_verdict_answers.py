"""The verdict store keeps the judged model's answer and unavailable (NULL) fields: an
environment declares the fields it cannot always give; a reward mode that reads one
stops with one line; format 2 stores are upgraded in place; export writes the answer."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import builtin_registry

from lever_trainer.data import DataOptions, load_rl_data
from lever_trainer.errors import LeverError, PluginError
from lever_trainer.judge import (
    ANSWER_FIELD,
    STORE_FORMAT,
    Environment,
    Judge,
    UnavailableFieldError,
    VerdictStore,
    export_rl_data,
)
from lever_trainer.rewards import RewardParams, clip_reward


class Answering(Environment):
    """Answers "two" when the sequence's last id is even (correct), else "three"; gives
    no vqa_gt_prob (like a server without log-probabilities)."""

    name, version = "answering", "1"
    optional_fields = ("vqa_gt_prob",)

    def __init__(self, gt_prob: Any = None, answer: Any = "keep") -> None:
        self.gt_prob, self.answer = gt_prob, answer
        self.asked = 0

    def judge(self, query_ids: Sequence[int], sequences: Sequence[Sequence[int]]) -> list[dict]:
        self.asked += len(sequences)
        out = []
        for s in sequences:
            right = s[-1] % 2 == 0
            verdict: dict[str, Any] = {
                "vqa_correct": float(right),
                "vqa_acc_score": 1.0 if right else 0.0,
                "vqa_rel_score": 0.5,
                ANSWER_FIELD: ("two" if right else "three")
                if self.answer == "keep"
                else self.answer,
            }
            if self.gt_prob != "absent":
                verdict["vqa_gt_prob"] = self.gt_prob
            out.append(verdict)
        return out


def mode_reward(mode: str):
    raw = builtin_registry().raw_fn(mode)
    params = RewardParams()

    def reward(verdict: Mapping[str, Any]) -> float:
        return clip_reward(float(raw(verdict, params)))

    return reward


def test_answer_and_unavailable_field_are_stored_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "v.sqlite"
    judge = Judge(Answering(), "p", VerdictStore(path), mode_reward("hard_plus_soft"))
    got = judge.verdicts([1, 1], [[3, 4], [4, 3]])
    assert got[0] == {
        "vqa_correct": 1.0,
        "vqa_acc_score": 1.0,
        "vqa_gt_prob": None,
        "vqa_rel_score": 0.5,
        ANSWER_FIELD: "two",
    }
    with sqlite3.connect(path) as db:
        rows = sorted(db.execute("SELECT sequence, gt_prob, answer FROM verdicts").fetchall())
    assert rows == [("3,4", None, "two"), ("4,3", None, "three")]
    # a new process reads the same verdicts from the store, judging nothing
    env = Answering()
    again = Judge(env, "p", VerdictStore(path), mode_reward("hard_plus_soft"))
    assert again.verdicts([1, 1], [[3, 4], [4, 3]]) == got and env.asked == 0
    # hard_plus_soft reads vqa_correct and vqa_acc_score only: 1 + 1 and 0 + 0
    assert again.rewards([1, 1], [[3, 4], [4, 3]]) == ([2.0, 0.0], [1.0, 0.0])


def test_a_missing_optional_field_is_unavailable_too(tmp_path: Path) -> None:
    judge = Judge(Answering(gt_prob="absent"), "p", None, mode_reward("hard_plus_soft"))
    assert judge.verdicts([1], [[2, 4]])[0]["vqa_gt_prob"] is None


def test_a_reward_mode_reading_an_unavailable_field_stops_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "v.sqlite"
    judge = Judge(Answering(), "p", VerdictStore(path), mode_reward("hard01_plus_gtprob"))
    with pytest.raises(UnavailableFieldError) as err:
        judge.rewards([1], [[3, 4]])
    line = str(err.value)
    assert isinstance(err.value, LeverError) and "\n" not in line
    assert "vqa_gt_prob" in line and "environment answering" in line and "query 1" in line
    # the verdict obtained before the stop is stored
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0] == 1


def test_a_given_optional_field_is_read_as_usual() -> None:
    judge = Judge(Answering(gt_prob=0.25), "p", None, mode_reward("hard01_plus_gtprob"))
    # hard01_plus_gtprob: wh*h + ws*g = 1 + 0.25 for the correct one, 0 + 0.25 else
    assert judge.rewards([1, 1], [[3, 4], [4, 3]]) == ([1.25, 0.25], [1.0, 0.0])


def test_an_undeclared_missing_field_is_a_plugin_error() -> None:
    env = Answering()
    env.optional_fields = ()
    judge = Judge(env, "p", None, mode_reward("hard_plus_soft"))
    with pytest.raises(PluginError, match="vqa_gt_prob is None, expected a number"):
        judge.verdicts([1], [[3, 4]])


def test_vqa_correct_is_never_optional() -> None:
    class NoCorrect(Answering):
        optional_fields = ("vqa_correct", "vqa_gt_prob")

        def judge(self, query_ids, sequences):
            return [
                {k: v for k, v in d.items() if k != "vqa_correct"}
                for d in super().judge(query_ids, sequences)
            ]

    judge = Judge(NoCorrect(), "p", None, mode_reward("hard_plus_soft"))
    with pytest.raises(PluginError, match="verdict field vqa_correct is missing"):
        judge.verdicts([1], [[3, 4]])


def test_an_answer_that_is_not_text_is_a_plugin_error() -> None:
    judge = Judge(Answering(answer=42), "p", None, mode_reward("hard_plus_soft"))
    with pytest.raises(PluginError, match="vqa_pred_answer is a int, expected a string"):
        judge.verdicts([1], [[3, 4]])


def _format_2_store(path: Path) -> None:
    """A store as format 2 wrote it (no answer column, every field NOT NULL)."""
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE lever_store (key TEXT PRIMARY KEY, value TEXT)")
        db.execute("INSERT INTO lever_store VALUES ('format', '2')")
        db.execute(
            "CREATE TABLE verdict_pools (id INTEGER PRIMARY KEY, env TEXT, version TEXT, "
            "query INTEGER, pool TEXT, UNIQUE (env, version, query, pool))"
        )
        db.execute(
            "CREATE TABLE verdicts (env TEXT, version TEXT, query INTEGER, sequence TEXT, "
            "correct REAL NOT NULL, acc REAL NOT NULL, gt_prob REAL NOT NULL, "
            "rel REAL NOT NULL, created REAL, pool_id INTEGER, "
            "PRIMARY KEY (env, version, query, sequence))"
        )
        db.execute("INSERT INTO verdict_pools VALUES (1, 'answering', '1', 3, '4,5,6')")
        db.execute(
            "INSERT INTO verdicts VALUES ('answering', '1', 3, '4,5', 1, 0.5, 0.25, 0, 1.0, 1)"
        )
        db.execute(
            "INSERT INTO verdicts VALUES ('answering', '1', 8, '9,1', 0, 0.5, 0.25, 0, 2.0, NULL)"
        )


def test_a_format_2_store_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    _format_2_store(path)
    store = VerdictStore(path)
    assert store.db.execute("SELECT value FROM lever_store").fetchone()[0] == STORE_FORMAT == "3"
    # its verdicts are kept as they were, with their pools and no answer
    assert list(store.iter_verdicts("answering", "1")) == [
        (
            3,
            [4, 5],
            {"vqa_correct": 1.0, "vqa_acc_score": 0.5, "vqa_gt_prob": 0.25, "vqa_rel_score": 0.0},
            [4, 5, 6],
        ),
        (
            8,
            [9, 1],
            {"vqa_correct": 0.0, "vqa_acc_score": 0.5, "vqa_gt_prob": 0.25, "vqa_rel_score": 0.0},
            None,
        ),
    ]
    # and it now takes answers and unavailable fields
    judge = Judge(Answering(), "p", store, mode_reward("hard_plus_soft"))
    judge.verdicts([3], [[5, 4]])
    assert store.get("answering", "1", [(3, "5,4")])[(3, "5,4")][ANSWER_FIELD] == "two"
    assert store.get("answering", "1", [(3, "5,4")])[(3, "5,4")]["vqa_gt_prob"] is None
    store.close()
    # opening the upgraded store again changes nothing
    again = VerdictStore(path)
    assert len(list(again.iter_verdicts("answering", "1"))) == 3


def test_export_writes_the_answer_and_null_for_unavailable(tmp_path: Path) -> None:
    store = VerdictStore(tmp_path / "v.sqlite")
    judge = Judge(Answering(), "p", store, mode_reward("hard_plus_soft"))
    judge.verdicts([1, 1], [[3, 4], [4, 3]], {1: [3, 4, 5]})
    doc = export_rl_data(store, "answering", "1")
    cands = doc["1"]["pointer_candidates"]
    assert [c[ANSWER_FIELD] for c in cands] == ["two", "three"]
    assert [c["vqa_gt_prob"] for c in cands] == [None, None]
    # the RL data reader takes the extra key and the null (a missing field counts as 0)
    path = tmp_path / "exported.json"
    path.write_text(json.dumps(doc))
    table, _ = load_rl_data(path, DataOptions(), builtin_registry())
    assert table.pool_ids[0, :3].tolist() == [3, 4, 5]


def test_a_field_given_in_no_verdict_refuses_its_reward_mode_before_any_call() -> None:
    env = Answering(gt_prob=0.5)
    env.unavailable_fields = ("vqa_gt_prob",)
    with pytest.raises(UnavailableFieldError) as err:
        Judge(env, "p", None, mode_reward("hard01_plus_gtprob"))
    assert "needs vqa_gt_prob" in str(err.value) and "environment answering" in str(err.value)
    assert env.asked == 0
    # another unavailable field, another mode that reads it
    with pytest.raises(UnavailableFieldError, match="needs vqa_rel_score"):
        env.unavailable_fields = ("vqa_rel_score",)
        Judge(env, "p", None, mode_reward("hard_plus_gtprob_plus_rel"))
    # a mode that does not read it is fine, and the field may then be None
    env.unavailable_fields = ("vqa_gt_prob",)
    env.gt_prob = None
    judge = Judge(env, "p", None, mode_reward("hard_plus_soft"))
    assert judge.rewards([1], [[3, 4]]) == ([2.0], [1.0])


def test_export_verdicts_command_writes_the_answers(tmp_path: Path, cli) -> None:
    store = VerdictStore(tmp_path / "v.sqlite")
    Judge(Answering(), "p", store, mode_reward("hard_plus_soft")).verdicts(
        [5], [[3, 4]], {5: [3, 4]}
    )
    store.close()
    out = tmp_path / "rl.json"
    result = cli(
        "export-verdicts", "--store", tmp_path / "v.sqlite", "--judge", "answering", "--output", out
    )
    assert result.exit_code == 0, result.output
    (cand,) = json.loads(out.read_text())["5"]["pointer_candidates"]
    assert cand[ANSWER_FIELD] == "two" and cand["vqa_gt_prob"] is None and cand["vqa_correct"] == 1

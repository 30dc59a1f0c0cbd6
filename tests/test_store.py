"""The verdict store damaged, locked, shared by runs with different pools, and upgraded
from its first format."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import lever_digits_env
import pytest
import torch
from conftest import assert_user_error, builtin_registry
from test_online import digits40, reward  # noqa: F401 (a fixture)
from test_trainer import make_trainer

from lever_trainer import hookimpl
from lever_trainer.data import DataOptions, load_rl_data
from lever_trainer.errors import StoreError
from lever_trainer.judge import (
    STORE_FORMAT,
    VERDICT_FIELDS,
    Judge,
    VerdictStore,
    export_rl_data,
)
from lever_trainer.trainer import SNAPSHOT_NAME
from lever_trainer_plugins.policy_bilinear import CosineBilinearPolicy

FILES = lever_digits_env.files()


def verdict(correct: float = 1.0) -> dict[str, float]:
    return {"vqa_correct": correct, "vqa_acc_score": 0.5, "vqa_gt_prob": 0.25, "vqa_rel_score": 0}


def filled_store(path: Path, queries: int = 300) -> Path:
    store = VerdictStore(path)
    for q in range(queries):
        items = [(q, f"{q + i},{q + i + 1}", verdict(float(i % 2))) for i in range(8)]
        store.put("digits", "1", items, {q: list(range(q, q + 10))})
    store.close()
    return path


def damage(path: Path, how: str) -> None:
    if how == "garbage":
        size = path.stat().st_size
        with open(path, "r+b") as fh:
            fh.seek(size // 2)
            fh.write(b"\xde\xad\xbe\xef" * 2048)
        return
    db = sqlite3.connect(path)
    with db:
        if how == "no-table":
            db.execute("DROP TABLE verdicts")
        elif how == "no-column":
            db.execute("ALTER TABLE verdicts RENAME COLUMN gt_prob TO something_else")
        elif how == "bad-row":
            db.execute("UPDATE verdicts SET sequence = 'a,' || sequence WHERE query = 7")
        elif how == "text-field":
            db.execute("UPDATE verdicts SET acc = 'high' WHERE query = 7")
    db.close()


@pytest.mark.parametrize("how", ["garbage", "no-table", "no-column", "bad-row", "text-field"])
def test_a_damaged_store_is_one_line_naming_it(cli, tmp_path, how) -> None:
    store = filled_store(tmp_path / "v.sqlite")
    damage(store, how)
    before = store.read_bytes()
    result = cli(
        "export-verdicts", "--store", store, "--judge", "digits", "--output", tmp_path / "o.json"
    )
    assert_user_error(result, str(store))
    assert "damaged" in result.output and "move it aside" in result.output
    assert store.read_bytes() == before
    assert not (tmp_path / "o.json").exists()


@pytest.mark.parametrize("how", ["garbage", "no-table", "no-column", "text-field"])
def test_training_with_a_damaged_store_is_one_line(cli, tmp_path, how) -> None:
    """The digits judge's verdicts of the validation queries are what the store is read
    for first: the damage surfaces there."""
    doc = json.loads(Path(FILES["train"]).read_text())
    keys = [k for k in doc if k.isdigit()][:20]
    data = tmp_path / "d.json"
    data.write_text(json.dumps({k: doc[k] for k in keys}))
    store = tmp_path / "v.sqlite"
    env = lever_digits_env.DigitsEnvironment()
    # verdicts of every query the run will meet, so the store is read on every call
    filled = VerdictStore(store)
    for k in keys:
        seqs = [c["pointer_global"] for c in doc[k]["pointer_candidates"]]
        judged = env.judge([int(k)] * len(seqs), seqs)
        filled.put("digits", "1", [(int(k), ",".join(map(str, s)), v) for s, v in zip(seqs, judged, strict=True)])  # fmt: skip
    for q in range(20000, 20300):  # pages enough for damage in the middle to matter
        filled.put("digits", "1", [(q, f"{i},{i + 1}", verdict()) for i in range(8)])
    filled.close()
    if how == "text-field":
        with sqlite3.connect(store) as db:
            db.execute("UPDATE verdicts SET acc = 'high'")
    else:
        damage(store, how)
    result = cli(
        "--beam-data", data, "--img-emb", FILES["embeddings"], "--output-dir",
        tmp_path / "run", "--judge", "digits", "--store", store, "--rce-epochs", "1",
        "--grpo-epochs", "0", "--device", "cpu",
    )  # fmt: skip
    assert_user_error(result, str(store), "damaged")


def test_a_store_locked_too_long_is_one_line(tmp_path) -> None:
    path = filled_store(tmp_path / "v.sqlite", queries=2)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process's write, never committed
    try:
        store = VerdictStore(path, busy_seconds=0.2)
        assert store.get("digits", "1", [(0, "0,1")])  # reading still works
        with pytest.raises(StoreError, match=r"stayed locked by another process for 0\.2 s"):
            store.put("digits", "1", [(5, "1,2", verdict())])
    finally:
        holder.rollback()
        holder.close()


class LocksTheStore:
    """Another process takes the store's write lock when the RCE epoch ends."""

    def __init__(self, path: Path) -> None:
        self.path, self.holder = path, None

    @hookimpl
    def on_epoch_end(self, state, metrics) -> None:
        if state.phase == "rce" and self.holder is None:
            self.holder = sqlite3.connect(self.path, isolation_level=None)
            self.holder.execute("BEGIN IMMEDIATE")


def test_a_locked_store_in_a_phase_keeps_the_snapshot_and_says_resume(digits40, tmp_path):  # noqa: F811
    path = tmp_path / "v.sqlite"
    locker = LocksTheStore(path)
    judge = Judge(lever_digits_env.DigitsEnvironment(), "digits", VerdictStore(path, 0.2), reward)
    trainer = make_trainer(
        digits40,
        tmp_path / "run",
        extra=(("locker", locker),),
        enable=("online", "locker"),
        judge=judge,
        policy=CosineBilinearPolicy(32, 2, 0.1, "reverse"),
        rce_epochs=1,
        online_epochs=2,
        online_samples=2,
    )
    try:
        with pytest.raises(StoreError, match="stayed locked") as info:
            trainer.fit()
    finally:
        locker.holder.rollback()
        locker.holder.close()
    assert info.value.snapshot is True
    snap = torch.load(tmp_path / "run" / SNAPSHOT_NAME, weights_only=True)
    assert (snap["phase"], snap["epoch"]) == ("rce", 1)


def test_the_cli_says_resume_with_after_a_store_error(cli, tmp_path, monkeypatch) -> None:
    """The line for a store that fails inside a phase names the snapshot to resume from."""
    import lever_trainer.judge as judge_module

    doc = json.loads(Path(FILES["train"]).read_text())
    keys = [k for k in doc if k.isdigit()][:20]
    data = tmp_path / "d.json"
    data.write_text(json.dumps({k: doc[k] for k in keys}))
    real_put = judge_module.VerdictStore.put

    def put(self, env, version, items, pools=None):
        items = list(items)
        if len(items) > 20:  # an online round's verdicts (validation asks for 4)
            raise StoreError(f"{self.path}: the verdict store stayed locked (test)")
        return real_put(self, env, version, items, pools)

    monkeypatch.setattr(judge_module.VerdictStore, "put", put)
    run = tmp_path / "run"
    result = cli(
        "--beam-data", data, "--img-emb", FILES["embeddings"], "--output-dir", run,
        "--judge", "digits", "--store", tmp_path / "v.sqlite", "--plugin", "online",
        "--rce-epochs", "1", "--grpo-epochs", "0", "--online-epochs", "1", "--device", "cpu",
    )  # fmt: skip
    assert_user_error(result, "stayed locked", f"resume with: lever-train --resume {run}")


def test_runs_with_different_pools_share_a_store_and_the_export_trains(tmp_path) -> None:
    """Query 7 judged with pool A by one run and pool B by another: each verdict keeps its
    pool; the export's pool for query 7 is their union, and it loads and trains."""
    from lever_trainer.judge import Environment

    class Toy(Environment):
        name, version = "toy", "1"

        def judge(self, query_ids, sequences):
            return [verdict(float(s[-1] % 2 == 0)) for s in sequences]

    path = tmp_path / "v.sqlite"
    Judge(Toy(), "toy", VerdictStore(path), reward).verdicts(
        [7, 7], [[10, 11], [11, 12]], pools={7: [10, 11, 12]}
    )
    Judge(Toy(), "toy", VerdictStore(path), reward).verdicts(
        [7, 7], [[777, 10], [11, 12]], pools={7: [777, 10, 13]}
    )
    store = VerdictStore(path)
    pools = {tuple(seq): pool for _, seq, _, pool in store.iter_verdicts("toy", "1")}
    assert pools == {(10, 11): [10, 11, 12], (11, 12): [10, 11, 12], (777, 10): [777, 10, 13]}
    doc = export_rl_data(store, "toy", "1")
    assert doc["7"]["candidate_pool_ids"] == [10, 11, 12, 777, 13]
    assert [c["pointer"] for c in doc["7"]["pointer_candidates"]] == [[0, 1], [1, 2], [3, 0]]
    assert doc["_meta"]["queries_with_several_pools"] == 1
    exported = tmp_path / "exported.json"
    exported.write_text(json.dumps(doc))
    table, _ = load_rl_data(exported, DataOptions(), builtin_registry())
    assert table.pool_ids[0, :5].tolist() == [10, 11, 12, 777, 13]
    assert table.sequences[0, :3].tolist() == [[0, 1], [1, 2], [3, 0]]


def test_a_first_format_store_is_upgraded_with_its_pools(tmp_path) -> None:
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    with db:
        db.execute("CREATE TABLE lever_store (key TEXT PRIMARY KEY, value TEXT)")
        db.execute("INSERT INTO lever_store VALUES ('format', '1')")
        db.execute(
            "CREATE TABLE verdicts (env TEXT, version TEXT, query INTEGER, sequence TEXT, "
            "correct REAL, acc REAL, gt_prob REAL, rel REAL, created REAL, "
            "PRIMARY KEY (env, version, query, sequence))"
        )
        db.execute(
            "CREATE TABLE pools (env TEXT, version TEXT, query INTEGER, pool TEXT, "
            "PRIMARY KEY (env, version, query))"
        )
        db.execute("INSERT INTO verdicts VALUES ('toy', '1', 3, '4,5', 1, 0.5, 0.25, 0, 1.0)")
        db.execute("INSERT INTO verdicts VALUES ('toy', '1', 8, '9,1', 0, 0.5, 0.25, 0, 2.0)")
        db.execute("INSERT INTO pools VALUES ('toy', '1', 3, '4,5,6')")
    db.close()
    store = VerdictStore(path)
    got = list(store.iter_verdicts("toy", "1"))
    assert got == [
        (3, [4, 5], dict(zip(VERDICT_FIELDS, (1.0, 0.5, 0.25, 0.0), strict=True)), [4, 5, 6]),
        (8, [9, 1], dict(zip(VERDICT_FIELDS, (0.0, 0.5, 0.25, 0.0), strict=True)), None),
    ]
    # format 1 goes straight to the current format (3: answers, unavailable fields)
    assert store.db.execute("SELECT value FROM lever_store").fetchone()[0] == STORE_FORMAT

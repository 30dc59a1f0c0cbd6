"""Fault injection on the judge path, through the real command line.

A judge that raises, returns garbage, exits, fakes an interrupt or hangs at a random
verdict of an online run: the run ends with one line and a non-zero status (a hung one
stops on SIGTERM), and ``--resume`` then ends bit-identical to an uninterrupted run,
while the shared store holds each verdict once, every one complete and true.

The judge is ``tests/fault_judge`` (an entry point in a ``.dist-info``), put on the
``PYTHONPATH`` of each ``lever-train`` subprocess.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import lever_digits_env
import pytest
from safetensors.torch import load_file

from lever_trainer.metrics import COST_METRICS

FAULT_JUDGE = Path(__file__).parent / "fault_judge"
FILES = lever_digits_env.files()
RUN_ARGS = (
    "--judge", "faulty", "--plugin", "online", "--rce-epochs", "1", "--grpo-epochs", "0",
    "--online-epochs", "3", "--online-samples", "4", "--batch-size", "8", "--device", "cpu",
)  # fmt: skip

pytestmark = pytest.mark.slow


def lever_train(*args: object, fault: str | None = None, hung: Path | None = None, wait=True):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(FAULT_JUDGE), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("FAULT_JUDGE", None)
    if fault:
        env["FAULT_JUDGE"] = fault
        env["FAULT_JUDGE_HUNG"] = str(hung)
    command = [sys.executable, "-m", "lever_trainer", *map(str, args)]
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    doc = json.loads(Path(FILES["train"]).read_text())
    keys = [k for k in doc if k.isdigit()][:40]
    path = tmp_path_factory.mktemp("faults") / "train40.json"
    path.write_text(json.dumps({k: doc[k] for k in keys}))
    return path


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> tuple[Path, int]:
    """The uninterrupted run, and how many verdicts it asked of its judge."""
    root = tmp_path_factory.mktemp("reference")
    code, out = lever_train(
        "--beam-data", data, "--img-emb", FILES["embeddings"], "--output-dir", root / "run",
        "--store", root / "store.sqlite", *RUN_ARGS,
    )  # fmt: skip
    assert code == 0, out
    with sqlite3.connect(root / "store.sqlite") as db:
        verdicts = db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]
    return root / "run", int(verdicts)


def weights(run: Path) -> dict[str, dict]:
    return {p.name: load_file(str(p)) for p in sorted(run.glob("*.safetensors"))}


def records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(line).items() if k not in (*COST_METRICS, "time")}
        for line in lines
    ]


def check_store(path: Path) -> None:
    """Each verdict once, all four fields, each the digits judge's own answer."""
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT query, sequence, correct, acc, gt_prob, rel FROM verdicts"
        ).fetchall()
    keys = [(q, s) for q, s, *_ in rows]
    assert len(keys) == len(set(keys)) > 0
    truth = lever_digits_env.DigitsEnvironment().judge(
        [q for q, _ in keys], [[int(g) for g in s.split(",")] for _, s in keys]
    )
    for (q, s, *fields), verdict in zip(rows, truth, strict=True):
        expected = [verdict[f] for f in ("vqa_correct", "vqa_acc_score", "vqa_gt_prob")]
        assert fields[:3] == expected and fields[3] == verdict.get("vqa_rel_score"), (q, s)


# the fault's place: a verdict drawn at random (seeded, so a failure can be replayed)
@pytest.mark.parametrize(
    "kind, seed",
    [("raise", 1), ("garbage", 2), ("exit", 3), ("interrupt", 4), ("hang", 5), ("raise", 6)],
)
def test_resume_after_a_judge_fault_is_bit_identical(data, reference, tmp_path, kind, seed):
    full, total = reference
    at = random.Random(seed).randrange(total)
    run, store = tmp_path / "run", tmp_path / "store.sqlite"
    args = ("--beam-data", data, "--img-emb", FILES["embeddings"], "--output-dir", run)
    args += ("--store", store, *RUN_ARGS)
    hung = tmp_path / "hung"
    if kind == "hang":
        proc = lever_train(*args, fault=f"hang:{at}", hung=hung, wait=False)
        deadline = time.monotonic() + 240
        while not hung.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        code = proc.returncode
        assert time.monotonic() - signalled < 10, "SIGTERM did not end the wait for the judge"
    else:
        code, out = lever_train(*args, fault=f"{kind}:{at}")
    assert code != 0, f"fault {kind} at verdict {at} of {total}: the run did not fail\n{out}"
    assert "Traceback" not in out, out
    check_store(store)
    if "resume with" in out:
        code, out = lever_train("--resume", run)
    else:  # the fault came before the first snapshot: start again
        assert kind != "hang" and "error:" in out, out
        code, out = lever_train(*args, "--overwrite")
    assert code == 0, out
    check_store(store)
    mine, theirs = weights(run), weights(full)
    assert list(mine) == list(theirs)
    for name, tensors in theirs.items():
        for key, value in tensors.items():
            assert (mine[name][key] == value).all(), (kind, at, name, key)
    assert records(run) == records(full)


def test_a_fault_message_is_one_line_with_the_resume_command(data, tmp_path) -> None:
    """After the first round's verdicts, the second round's call fails: one line naming
    the plugin and what it raised, the snapshot, and how to resume."""
    run = tmp_path / "run"
    args = ("--beam-data", data, "--img-emb", FILES["embeddings"], "--output-dir", run)
    code, out = lever_train(*args, "--no-store", *RUN_ARGS, fault="exit:200")
    assert code == 2, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    assert "plugin fault-judge: environment faulty failed: SystemExit: 0" in errors[0]
    assert f"resume with: lever-train --resume {run}" in errors[0]
    assert "done:" not in out

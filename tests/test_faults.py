"""Numerical faults, checkpoint retention and the best checkpoint."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import make_trainer

from lever_trainer import RewardChoice, hookimpl
from lever_trainer.checkpoint import read_metadata
from lever_trainer.errors import LeverError


class NanReward:
    """RCE rewards that are NaN for the queries in ``poisoned`` (all queries when None)."""

    def __init__(self, poisoned: set[int] | None) -> None:
        self.poisoned = poisoned

    @hookimpl
    def select_reward(self, phase: str) -> RewardChoice | None:
        def compute(batch):
            rewards = batch.rewards_raw.clone()
            for i, qid in enumerate(batch.query_ids.tolist()):
                if self.poisoned is None or qid in self.poisoned:
                    rewards[i] = float("nan")
            return rewards

        return RewardChoice("nan", "poisoned", compute) if phase == "rce" else None


def test_non_finite_steps_are_skipped_and_counted(demo_files, tmp_path) -> None:
    trainer = make_trainer(
        demo_files,
        tmp_path / "run",
        extra=(("nan", NanReward({0, 1})),),
        enable=("nan",),
        batch_size=4,
    )
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    metrics = trainer.state.history[-1]
    # queries 0 and 1 sit in one or two of the epoch's batches of 4: those steps are skipped
    assert metrics["skipped_steps"] in (1, 2)
    assert any("skipped" in line for line in trainer.log_lines)
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())
    assert any(not torch.equal(start[k], v) for k, v in trainer.model.state_dict().items())
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))


def test_consecutive_non_finite_steps_stop_the_run(demo_files, tmp_path) -> None:
    out = tmp_path / "run"
    trainer = make_trainer(
        demo_files,
        out,
        extra=(("nan", NanReward(None)),),
        enable=("nan",),
        batch_size=4,
        max_bad_steps=3,
        rce_epochs=2,
    )
    with pytest.raises(LeverError) as err:
        trainer.fit()
    message = str(err.value)
    assert message.startswith("phase rce epoch 1 step 3: 3 consecutive steps with a non-finite")
    assert "query ids " in message and "--max-bad-steps 3" in message
    assert not list(out.glob("*.safetensors"))  # nothing written over a good checkpoint
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())


def test_keep_last_removes_older_checkpoints_after_the_new_one(demo_files, tmp_path) -> None:
    out = tmp_path / "run"
    trainer = make_trainer(demo_files, out, rce_epochs=3, grpo_epochs=1, keep_last=2)
    trainer.fit()
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "best.safetensors",  # not an epoch checkpoint: --keep-last leaves it alone
        "grpo_epoch01.safetensors",
        "rce_epoch03.safetensors",
    ]


def test_best_checkpoint_is_kept_apart(demo_files, tmp_path) -> None:
    out = tmp_path / "run"
    trainer = make_trainer(
        demo_files, out, rce_epochs=3, keep_last=1, best_metric="val_loss", best_mode="min"
    )
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    meta = read_metadata(out / "best.safetensors")
    assert meta["best_metric"] == "val_loss"
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "best.safetensors",
        "rce_epoch03.safetensors",
    ]
    # the candidate checkpoint selection chose (tests/test_retention.py tests the rule):
    # its value is the one recorded, and its weights are in best.safetensors
    state = trainer.state
    candidates = [{"phase": "start", "epoch": 0, **state.start_metrics}, *state.history]
    where = (meta["phase"], meta["epoch"])
    chosen = next(e for e in candidates if (e["phase"], e["epoch"]) == where)
    assert meta["best_value"] == pytest.approx(chosen["val_loss"])
    best = load_file(str(out / "best.safetensors"))
    if where == ("start", 0):
        assert all(torch.equal(v, start[k]) for k, v in best.items())
    elif where == ("rce", 3):
        final = load_file(str(out / "rce_epoch03.safetensors"))
        assert all(torch.equal(v, final[k]) for k, v in best.items())


def test_unknown_best_metric_is_a_user_error(demo_files, tmp_path) -> None:
    trainer = make_trainer(demo_files, tmp_path / "run", best_metric="accuracy")
    with pytest.raises(LeverError, match=r"--best-metric: no metric named 'accuracy' \(known: "):
        trainer.fit()


def test_plugin_failure_keeps_last_completed_step_and_resumes_exactly(demo_files, tmp_path) -> None:
    from lever_trainer.errors import PluginError
    from lever_trainer.trainer import SNAPSHOT_NAME

    settings = {"rce_epochs": 2, "grpo_epochs": 1, "batch_size": 8}
    full = make_trainer(demo_files, tmp_path / "full", **settings)
    full.fit()

    class Faulty:
        @hookimpl
        def on_step_end(self, state) -> None:
            if (state.phase, state.epoch, state.step_in_epoch) == ("rce", 2, 3):
                raise RuntimeError("disk quota of my logger")

    out = tmp_path / "run"
    broken = make_trainer(
        demo_files, out, extra=(("faulty", Faulty()),), enable=("faulty",), **settings
    )
    with pytest.raises(PluginError, match="plugin faulty failed in hook on_step_end: RuntimeError"):
        broken.fit()
    snapshot = torch.load(out / SNAPSHOT_NAME, weights_only=True)
    assert (snapshot["phase"], snapshot["epoch"], snapshot["step_in_epoch"]) == ("rce", 2, 3)
    resumed = make_trainer(demo_files, out, **settings)
    resumed.fit(resume=snapshot)
    for key, value in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


def test_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(
    demo_files, tmp_path, monkeypatch
) -> None:
    import errno

    import lever_trainer.checkpoint as ckpt

    out = tmp_path / "run"
    trainer = make_trainer(demo_files, out, rce_epochs=2)
    real = ckpt.os.fsync
    calls = {"n": 0}

    def failing_fsync(fd: int) -> None:
        # the second epoch's checkpoint hits a full disk while it is being written
        if trainer.state.epoch == 2:
            calls["n"] += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(ckpt.os, "fsync", failing_fsync)
    with pytest.raises(
        LeverError,
        match=r"rce_epoch02.safetensors: cannot write checkpoint \(No space left on device\)",
    ):
        trainer.fit()
    assert calls["n"] >= 1
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics.jsonl",
        "rce_epoch01.safetensors",
        "resume.pt",
        "steps.jsonl",
    ]
    assert read_metadata(out / "rce_epoch01.safetensors")["epoch"] == 1
    load_file(str(out / "rce_epoch01.safetensors"))


def test_unwritable_output_directory_is_a_clear_error(cli, demo_files, tmp_path) -> None:
    import os

    from conftest import assert_user_error

    if os.geteuid() == 0:
        # root ignores directory permissions: make the output path a file's child instead
        blocker = tmp_path / "file"
        blocker.write_text("x")
        result = cli(
            "--beam-data",
            demo_files[0],
            "--img-emb",
            demo_files[1],
            "--output-dir",
            blocker / "run",
            "--rce-epochs",
            "1",
            "--hidden-dim",
            "16",
        )
        assert_user_error(result, str(blocker))
        return
    locked = tmp_path / "locked"  # pragma: no cover - CI runs as root
    locked.mkdir(mode=0o500)
    result = cli(
        "--beam-data",
        demo_files[0],
        "--img-emb",
        demo_files[1],
        "--output-dir",
        locked / "run",
        "--rce-epochs",
        "1",
        "--hidden-dim",
        "16",
    )
    assert_user_error(result, str(locked))

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
        "grpo_epoch1.safetensors",
        "rce_epoch3.safetensors",
    ]


def test_best_checkpoint_is_kept_apart(demo_files, tmp_path) -> None:
    out = tmp_path / "run"
    trainer = make_trainer(
        demo_files, out, rce_epochs=3, keep_last=1, best_metric="val_loss", best_mode="min"
    )
    trainer.fit()
    losses = [h["val_loss"] for h in trainer.state.history]
    best_epoch = losses.index(min(losses)) + 1
    meta = read_metadata(out / "best.safetensors")
    assert meta["epoch"] == best_epoch and meta["best_value"] == pytest.approx(min(losses))
    assert meta["best_metric"] == "val_loss"
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "best.safetensors",
        "rce_epoch3.safetensors",
    ]
    if best_epoch == 3:
        assert all(
            torch.equal(v, load_file(str(out / "rce_epoch3.safetensors"))[k])
            for k, v in load_file(str(out / "best.safetensors")).items()
        )


def test_unknown_best_metric_is_a_user_error(demo_files, tmp_path) -> None:
    trainer = make_trainer(demo_files, tmp_path / "run", best_metric="accuracy")
    with pytest.raises(LeverError, match=r"--best-metric: no metric named 'accuracy' \(known: "):
        trainer.fit()

"""Exact resume: an interrupted and resumed run ends with the uninterrupted run's weights."""

from __future__ import annotations

import pytest
import torch
from test_trainer import make_trainer, phase_named

from lever_trainer import hookimpl
from lever_trainer.trainer import SNAPSHOT_NAME, StopRequested

SETTINGS = {"rce_epochs": 2, "grpo_epochs": 2, "batch_size": 8, "grpo_lr": 1e-3}


def weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def comparable(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in history]


@pytest.mark.parametrize(
    "stop_at",
    [("rce", 1, 2), ("rce", 2, 4), ("grpo", 1, 1), ("grpo", 2, 3)],
    ids=["rce-mid-epoch1", "rce-end-epoch2", "grpo-mid-epoch1", "grpo-mid-epoch2"],
)
def test_interrupted_then_resumed_equals_uninterrupted(demo_files, tmp_path, stop_at) -> None:
    full = make_trainer(demo_files, tmp_path / "full", **SETTINGS)
    full.fit()

    class Stopper:
        @hookimpl
        def on_step_end(self, state) -> None:
            if (state.phase, state.epoch, state.step_in_epoch) == stop_at:
                interrupted.stop_requested = "test"

    out = tmp_path / "run"
    interrupted = make_trainer(
        demo_files, out, extra=(("stopper", Stopper()),), enable=("stopper",), **SETTINGS
    )
    with pytest.raises(StopRequested) as stopped:
        interrupted.fit()
    assert (stopped.value.phase, stopped.value.epoch, stopped.value.step) == stop_at
    snapshot = torch.load(out / SNAPSHOT_NAME, weights_only=True)
    assert (snapshot["phase"], snapshot["epoch"], snapshot["step_in_epoch"]) == stop_at

    resumed = make_trainer(demo_files, out, **SETTINGS)  # a fresh process would start like this
    resumed.fit(resume=snapshot)
    final, expected = weights(resumed), weights(full)
    for key, value in expected.items():
        assert torch.equal(final[key], value), key
    assert phase_named(resumed, "grpo").kl_beta == phase_named(full, "grpo").kl_beta
    assert comparable(resumed.state.history) == comparable(full.state.history)


def test_snapshot_after_every_epoch_is_the_newest_complete_state(demo_files, tmp_path) -> None:
    out = tmp_path / "run"
    trainer = make_trainer(demo_files, out, **SETTINGS)
    trainer.fit()
    snapshot = torch.load(out / SNAPSHOT_NAME, weights_only=True)
    assert (snapshot["phase"], snapshot["epoch"]) == ("grpo", 2)
    assert snapshot["step_in_epoch"] == trainer.state.steps_per_epoch
    for key, value in weights(trainer).items():
        assert torch.equal(snapshot["model"][key], value)


class Counter:
    """A plugin with state: it counts optimiser steps, and keeps the count in snapshots."""

    def __init__(self) -> None:
        self.count = 0

    @hookimpl
    def on_step_end(self, state) -> None:
        self.count += 1

    @hookimpl
    def plugin_state_dict(self, state) -> dict:
        return {"count": self.count}

    @hookimpl
    def load_plugin_state(self, state, saved: dict) -> None:
        self.count = saved["count"]


def test_plugin_state_travels_through_the_snapshot(demo_files, tmp_path) -> None:
    full_counter = Counter()
    full = make_trainer(
        demo_files,
        tmp_path / "full",
        extra=(("counter", full_counter),),
        enable=("counter",),
        **SETTINGS,
    )
    full.fit()

    class Stopper:
        @hookimpl
        def on_step_end(self, state) -> None:
            if (state.phase, state.epoch, state.step_in_epoch) == ("grpo", 1, 2):
                first.stop_requested = "test"

    out = tmp_path / "run"
    first = make_trainer(
        demo_files,
        out,
        extra=(("counter", Counter()), ("stopper", Stopper())),
        enable=("counter", "stopper"),
        **SETTINGS,
    )
    with pytest.raises(StopRequested):
        first.fit()
    snapshot = torch.load(out / SNAPSHOT_NAME, weights_only=True)
    assert snapshot["plugins"]["counter"] == {"count": 2 * 4 + 2}
    second_counter = Counter()
    second = make_trainer(
        demo_files, out, extra=(("counter", second_counter),), enable=("counter",), **SETTINGS
    )
    second.fit(resume=snapshot)
    assert second_counter.count == full_counter.count == 4 * 4

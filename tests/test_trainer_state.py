"""The trainer owns its state: ``Trainer.state_dict()`` / ``load_state_dict()``, which
resume snapshots store, and the random state taken once per step."""

from __future__ import annotations

import torch
from test_trainer import make_trainer, phase_named


def test_the_random_state_is_captured_once_per_step(demo_files, tmp_path, monkeypatch) -> None:
    from lever_trainer import snapshot

    captures: list[int] = []
    real = snapshot.capture_rng

    def counted(generator):
        captures.append(1)
        return real(generator)

    monkeypatch.setattr(snapshot, "capture_rng", counted)
    trainer = make_trainer(demo_files, tmp_path / "run", rce_epochs=2, batch_size=8)
    trainer.fit()
    # 40 demo queries, 20 % validation: 32 training rows, 4 steps of 8 per epoch. One
    # capture when the trainer is built, then per epoch one after its order is drawn,
    # one per step and one when the epoch closes: 1 + 2 * (1 + 4 + 1) = 13
    assert trainer.state.steps_per_epoch == 4
    assert len(captures) == 1 + 2 * (1 + 4 + 1)


def test_trainer_state_dict_round_trips_into_a_new_trainer(demo_files, tmp_path) -> None:
    first = make_trainer(demo_files, tmp_path / "a", rce_epochs=1, grpo_epochs=1, batch_size=8)
    first.fit()
    saved = first.state_dict(epoch_closed=True)
    # the same output directory: a plugin's state may describe its files (steps-jsonl)
    second = make_trainer(demo_files, tmp_path / "a", rce_epochs=1, grpo_epochs=1, batch_size=8)
    second.load_state_dict(saved)
    again = second.state_dict(epoch_closed=True)
    # the epoch's progress comes back when its phase starts again (Trainer.run_phase)
    progress = {"epoch_order", "epoch_sums", "epoch_counted", "epoch_skipped"}
    assert set(again) == set(saved) - progress
    for key in ("history", "metrics", "global_step", "bad_steps", "phases", "plugins", "keeper"):
        assert comparable_value(again[key]) == comparable_value(saved[key]), key
    assert all(torch.equal(again["model"][k], v) for k, v in saved["model"].items())
    assert torch.equal(again["rng_shuffle"], saved["rng_shuffle"])
    assert phase_named(second, "grpo").kl_beta == phase_named(first, "grpo").kl_beta


def comparable_value(value):
    """Tensors as lists, so that nested records compare with ``==``."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: comparable_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [comparable_value(v) for v in value]
    return value

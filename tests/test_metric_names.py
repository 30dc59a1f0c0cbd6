"""Metrics declared once: each phase's ``metric_names`` is what its epochs report, and
``--best-metric``, early stopping and the docs go by it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_trainer import make_trainer

from lever_trainer.api import Phase, hookimpl
from lever_trainer.errors import LeverError, PluginError
from lever_trainer.metrics import JUDGE_COST_METRICS, TRAINER_METRICS
from lever_trainer.plugins import load_plugins
from lever_trainer.trainer import collect_phases

ROOT = Path(__file__).resolve().parents[1]


def builtin_phases() -> dict[str, Phase]:
    plugins = load_plugins(enable=["online", "judge-rank"])
    return {p.name: p for p in collect_phases(plugins)}


def test_a_run_reports_exactly_what_its_phases_and_the_trainer_declare(
    demo_files: Any, tmp_path: Path
) -> None:
    trainer = make_trainer(demo_files, tmp_path / "run", rce_epochs=1, grpo_epochs=1)
    trainer.fit()
    phases = builtin_phases()
    validation = {"val_loss", "policy_reward@1", "val_queries"}  # a few, not the subject
    for row in trainer.state.history:
        reported = {k for k in row if k not in ("phase", "epoch")}
        declared = set(phases[row["phase"]].metric_names or ())
        own = reported - set(TRAINER_METRICS) - trainer.state.metric_names.difference(declared)
        # what is neither the trainer's nor validation's is the phase's, and all of it
        assert own == declared, (row["phase"], own ^ declared)
        assert validation <= reported and "skipped_steps" not in reported  # no bad step
        assert {"train_loss", "train_grad_norm", "train_lr", "epoch_seconds"} <= reported


def test_grpo_and_rce_declare_every_value_their_loss_returns() -> None:
    phases = builtin_phases()
    grpo, rce = phases["grpo"].metric_names, phases["rce"].metric_names
    assert grpo is not None and rce is not None
    # docs/logs.md#metrics lists 13 GRPO step values besides the loss, and kl_beta
    assert len([n for n in grpo if n.startswith("train_")]) == 13 and "kl_beta" in grpo
    assert set(rce) == {"train_tau", "train_ess"}


class Chatty(Phase):
    """A phase whose loss returns a value it does not declare."""

    name = "chatty"
    order = 25
    needs_reward = False
    metric_names = ("train_declared",)

    def epochs(self, state: Any) -> int:
        return 1

    def learning_rate(self, state: Any) -> float:
        return 1e-3

    def loss(self, state: Any, batch: Any) -> dict[str, torch.Tensor]:
        loss = sum(p.sum() for p in state.model.parameters()) * 0.0
        return {"loss": loss, "declared": loss.detach(), "surprise": loss.detach()}


class ChattyPlugin:
    @hookimpl
    def phases(self) -> list[Phase]:
        return [Chatty()]


def test_a_loss_value_its_phase_does_not_declare_stops_the_run(
    demo_files: Any, tmp_path: Path
) -> None:
    trainer = make_trainer(
        demo_files, tmp_path / "run", enable=("chatty",), disable=("rce",),
        extra=(("chatty", ChattyPlugin()),),
    )  # fmt: skip
    with pytest.raises(PluginError) as err:
        trainer.fit()
    assert str(err.value) == (
        "phase chatty: loss reports train_surprise, which its metric_names does not declare"
    )


@pytest.mark.parametrize("name", ["train_entropy", "train_lr", "train_clip_high", "kl_beta"])
def test_best_metric_accepts_every_declared_metric(
    demo_files: Any, tmp_path: Path, name: str
) -> None:
    trainer = make_trainer(demo_files, tmp_path / "run", grpo_epochs=1, best_metric=name)
    trainer.check_settings(trainer.phases_to_run(None))  # no error


def test_best_metric_names_the_known_ones_when_refusing(demo_files: Any, tmp_path: Path) -> None:
    trainer = make_trainer(demo_files, tmp_path / "run", best_metric="train_entropi")
    with pytest.raises(LeverError) as err:
        trainer.check_settings(trainer.phases_to_run(None))
    message = str(err.value)
    assert message.startswith("--best-metric: no metric named 'train_entropi' (known: ")
    assert "train_lr" in message and "train_ess" in message
    assert "train_entropy" not in message  # GRPO has no epochs in this run


def test_early_stopping_refuses_a_metric_no_epoch_reports(demo_files: Any, tmp_path: Path) -> None:
    trainer = make_trainer(
        demo_files, tmp_path / "run", enable=("early-stopping",), early_stop_metric="train_kl",
        grpo_epochs=0, early_stop_patience=1, early_stop_mode="auto", early_stop_min_delta=0.0,
        early_stop_phases="all",
    )  # fmt: skip
    with pytest.raises(LeverError, match=r"--early-stop-metric 'train_kl': no epoch of this run"):
        trainer.fit()


def test_the_metric_table_of_the_docs_lists_every_declared_metric() -> None:
    table = (ROOT / "docs" / "logs.md").read_text().split("## Metrics", 1)[1]
    names = {n for p in builtin_phases().values() for n in p.metric_names or ()}
    names |= set(TRAINER_METRICS) | set(JUDGE_COST_METRICS)
    missing = sorted(n for n in names if f"`{n}`" not in table)
    assert not missing, f"docs/logs.md#metrics does not list {missing}"

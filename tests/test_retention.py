"""Choosing best.safetensors: the start competes, only a difference beyond the noise wins,
and a run that does not beat its start says so and keeps the start."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import make_trainer

from lever_trainer.checkpoint import read_metadata
from lever_trainer.retention import BEST_NAME, CheckpointKeeper, Comparison

T = torch.tensor
WEIGHTS = {"w": torch.zeros(2)}


def epoch(keeper: CheckpointKeeper, n: int, per_query: torch.Tensor) -> None:
    """Let epoch ``n`` with these per-query values of ``score`` compete."""
    keeper.save(
        f"rce_epoch{n:02d}.safetensors",
        {"w": torch.full((2,), float(n))},
        {"phase": "rce", "epoch": n},
        {"score": float(per_query.mean())},
        has_validation=True,
        per_query={"score": per_query},
        label=f"rce epoch {n}",
    )


def test_only_a_difference_beyond_the_noise_replaces_the_best(tmp_path) -> None:
    keeper = CheckpointKeeper(tmp_path, best_metric="score")
    start = T([0.0] * 10)
    keeper.consider_start({"score": 0.0}, {"score": start})
    assert keeper.start_is_best and keeper.best_value == 0.0
    # epoch 1: 3 queries up, 2 down (d = +1 x3, -1 x2): mean 0.1, sd sqrt(0.5444) = 0.7379,
    # half 1.96 * 0.7379 / sqrt(10) = 0.4573: within the noise, the start stays
    e1 = T([1.0, 1.0, 1.0, -1.0, -1.0] + [0.0] * 5)
    epoch(keeper, 1, e1)
    assert keeper.start_is_best and not (tmp_path / BEST_NAME).exists()
    last = keeper.last
    assert last is not None and last.within_noise and last.against == "start"
    assert last.difference == pytest.approx(0.1) and last.half_width == pytest.approx(0.4573, 1e-3)
    # epoch 2: 9 queries up by 1, one down by 1 against the start: mean 0.8, half 0.392
    e2 = T([1.0] * 9 + [-1.0])
    epoch(keeper, 2, e2)
    assert keeper.best_label == "rce epoch 2" and keeper.last is not None
    assert keeper.last.replaced and keeper.last.difference == pytest.approx(0.8)
    meta = read_metadata(tmp_path / BEST_NAME)
    assert (meta["epoch"], meta["best_metric"]) == (2, "score")
    assert meta["best_value"] == pytest.approx(0.8)
    # epoch 3 is better on average than epoch 2 (0.9 > 0.8), but only on one query:
    # the paired difference (one query +1) is noise, epoch 2 stays
    e3 = T([1.0] * 10)
    epoch(keeper, 3, e3)
    assert keeper.best_label == "rce epoch 2" and read_metadata(tmp_path / BEST_NAME)["epoch"] == 2
    # the largest difference against the start: epoch 2's (epoch 3 met epoch 2)
    assert keeper.closest is not None and keeper.closest.label == "rce epoch 2"


def test_the_value_rule_takes_any_better_mean_and_the_start_still_competes(tmp_path) -> None:
    keeper = CheckpointKeeper(tmp_path, best_metric="score", paired=False)
    keeper.consider_start({"score": 0.0}, {"score": T([0.0] * 10)})
    epoch(keeper, 1, T([-1.0] * 10))  # worse than the start: the start stays
    assert keeper.start_is_best and not (tmp_path / BEST_NAME).exists()
    epoch(keeper, 2, T([1.0, 1.0, 1.0, -1.0, -1.0] + [0.0] * 5))  # mean 0.1: within noise
    assert keeper.best_label == "rce epoch 2" and read_metadata(tmp_path / BEST_NAME)["epoch"] == 2


def test_smaller_is_better_and_training_metrics_compare_plainly(tmp_path) -> None:
    keeper = CheckpointKeeper(tmp_path, best_metric="score", best_mode="min")
    keeper.consider_start({"score": 1.0}, {"score": T([1.0, 1.0, 1.0])})
    epoch(keeper, 1, T([0.5, 0.5, 0.5]))  # lower on every query by 0.5: clearly better
    assert keeper.best_label == "rce epoch 1"
    # a metric without per-query values (a training metric): the plain comparison, and
    # the start does not compete (it has no value)
    plain = CheckpointKeeper(tmp_path / "plain", best_metric="train_loss", best_mode="min")
    (tmp_path / "plain").mkdir()
    plain.consider_start({"val_loss": 3.0}, {})
    assert plain.best_label is None
    for n, loss in ((1, 2.0), (2, 1.9999), (3, 2.5)):
        plain.save(f"e{n}.safetensors", WEIGHTS, {"epoch": n}, {"train_loss": loss}, True)
    assert plain.best_label == "e2.safetensors" and plain.best_value == 1.9999


def test_the_keeper_state_resumes_the_same_choice(tmp_path) -> None:
    """The per-query values of the best go through the snapshot: a resumed keeper decides
    the next epoch exactly as the uninterrupted one."""
    whole = CheckpointKeeper(tmp_path / "a", best_metric="score")
    (tmp_path / "a").mkdir()
    whole.consider_start({"score": 0.0}, {"score": T([0.0] * 10)})
    epoch(whole, 1, T([1.0] * 9 + [-1.0]))
    resumed = CheckpointKeeper(tmp_path / "a", best_metric="score")
    resumed.load_state_dict(whole.state_dict())
    assert torch.equal(resumed.best_per_query, whole.best_per_query)
    nxt = T([1.0] * 10)
    epoch(whole, 2, nxt)
    epoch(resumed, 2, nxt)
    assert resumed.last == whole.last and resumed.best_label == whole.best_label


def test_an_older_snapshot_without_per_query_values_still_loads(tmp_path) -> None:
    keeper = CheckpointKeeper(tmp_path, best_metric="score")
    keeper.load_state_dict({"saved": [], "best_value": 0.5})
    assert keeper.best_per_query is None and keeper.best_label is None
    epoch(keeper, 1, T([0.6, 0.6]))  # nothing to pair with: the plain comparison
    assert keeper.best_label == "rce epoch 1"


# -------------------------------------------------------------- through the trainer
def frozen(files, out, **cfg):
    """A run whose training cannot move the policy (learning rate 0)."""
    return make_trainer(files, out, rce_epochs=2, rce_lr=0.0, **cfg)


def test_a_run_that_does_not_beat_its_start_says_so_and_keeps_the_start(
    demo_files, tmp_path
) -> None:
    out = tmp_path / "run"
    trainer = frozen(demo_files, out)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    lines = trainer.log_lines
    verdict = [ln for ln in lines if ln.startswith("training did not beat the starting policy")]
    assert len(verdict) == 1 and lines[-1] == verdict[0]
    value = trainer.state.start_metrics["policy_reward@1"]
    n = len(trainer.state.val)
    assert f"policy_reward@1 {value:.4f} -> {value:.4f}" in verdict[0]
    assert f"paired difference +0.0000 +- 0.0000, 95 %, {n} queries" in verdict[0]
    assert verdict[0].endswith("best.safetensors is the starting policy")
    meta = read_metadata(out / BEST_NAME)
    assert (meta["phase"], meta["epoch"]) == ("start", 0)
    assert meta["best_metric"] == "policy_reward@1" and meta["best_value"] == value
    assert meta["policy"]["name"] == trainer.model.policy_name and "train_config" in meta
    best = load_file(str(out / BEST_NAME))
    assert set(best) == set(start) and all(torch.equal(best[k], start[k]) for k in start)
    assert trainer.state.best == {"label": "start", "metric": "policy_reward@1", "value": value}


def test_a_run_that_beats_its_start_says_by_how_much(demo_files, tmp_path) -> None:
    # validation loss falls on every query as RCE fits the logged rewards
    out = tmp_path / "run"
    trainer = make_trainer(
        demo_files, out, rce_epochs=3, rce_lr=1e-2, best_metric="val_loss", best_mode="min"
    )
    trainer.fit()
    verdict = trainer.log_lines[-1]
    assert verdict.startswith("training beat the starting policy on validation: val_loss ")
    meta = read_metadata(out / BEST_NAME)
    assert meta["phase"] == "rce" and verdict.endswith(f"is rce epoch {meta['epoch']}")
    chosen = trainer.state.history[meta["epoch"] - 1]["val_loss"]
    assert chosen < trainer.state.start_metrics["val_loss"]


def test_validation_reports_queries_and_intervals(demo_files, tmp_path) -> None:
    trainer = frozen(demo_files, tmp_path / "run")
    trainer.fit()
    n = len(trainer.state.val)
    for metrics in (trainer.state.start_metrics, *trainer.state.history):
        assert metrics["val_queries"] == n
        for name in ("val_loss", "policy_reward@1", "policy_correct@1"):
            low, high = metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"]
            assert low <= metrics[name] <= high
    start_line = next(ln for ln in trainer.log_lines if ln.startswith("start: "))
    assert f"(n = {n} validation queries, 95 % intervals)" in start_line
    low = trainer.state.start_metrics["policy_correct@1_ci_low"]
    assert (
        f"policy_correct@1 {trainer.state.start_metrics['policy_correct@1']:.4f} [{low:.3f}, "
        in (start_line)
    )


def test_the_too_small_warning_comes_once_and_names_val_ratio(demo_files, tmp_path) -> None:
    trainer = frozen(demo_files, tmp_path / "run", val_ratio=0.2)
    keeper = trainer.keeper
    noisy = Comparison("rce epoch 1", 0.62, "start", 0.60, 0.02, 0.05, 8, replaced=False)
    for _ in range(3):
        keeper.last = noisy
        trainer.report_selection()
    warnings = [ln for ln in trainer.log_lines if ln.startswith("warning: the validation split")]
    assert warnings == [
        "warning: the validation split (8 queries) is too small to tell rce epoch 1 from "
        "start: policy_reward@1 0.6200 vs 0.6000 (start): +0.0200 +- 0.0500 (paired 95 %, 8 "
        "queries) is within the noise, so best.safetensors stays start; a larger --val-ratio "
        "(now 0.2) narrows the noise"
    ]
    # a difference whose noise is below 1 % of the value is not the split's fault
    quiet = CheckpointKeeper(tmp_path, best_metric="policy_reward@1")
    trainer.keeper = quiet
    quiet.last = Comparison("rce epoch 2", 0.6001, "start", 0.6, 0.0001, 0.004, 5000, False)
    trainer.report_selection()
    assert not quiet.warned_noise

"""The training variants: each plugin's numbers by hand, the hooks they answer, their
effect on a run, exact resume with their state, and the step diagnostics."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import assert_user_error
from test_trainer import make_trainer, phase_named

from lever_trainer import TrainConfig, TrainState, hookimpl
from lever_trainer import losses as L
from lever_trainer.data import make_batch
from lever_trainer.errors import LeverError, PluginError
from lever_trainer.trainer import SNAPSHOT_NAME, StopRequested
from lever_trainer_plugins import (
    advantages,
    early_stopping,
    easy_first,
    kl,
    lr_schedule,
    rce_weights,
    reference_sync,
    skip_zero_variance,
    surrogates,
)

TOL = 1e-6


def bare_state(**options: Any) -> TrainState:
    """A TrainState without a trainer, for calling one plugin's hook directly."""
    return TrainState(TrainConfig(), None, None, None, Path("."), options=options)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- RCE weights
@pytest.mark.parametrize("i", range(10))
def test_top1_only_reproduces_the_upstream_vector(reference, i: int) -> None:
    """Upstream's ``rce_loss_top1_only``: cross-entropy of the first sequence, averaged
    over its steps. Its log-probs are the reference's own ``log_probs``."""
    p = f"q{i}."
    logprobs, labels = reference[p + "log_probs"], reference[p + "beam_labels"]
    mask = torch.ones_like(logprobs, dtype=torch.bool)
    batch = SimpleNamespace(sequences=labels, cand_mask=mask)
    weights = rce_weights.top1_only.rce_weights(batch, reference[p + "beam_rewards_raw"])
    loss = L.weighted_sequence_loss(logprobs, weights, mask)
    assert loss.item() == pytest.approx(reference[p + "rce_loss_top1_only"].item(), abs=1e-5)
    # by hand: -log_probs[0] / S
    assert loss.item() == pytest.approx(-logprobs[0, 0].item() / 2, abs=TOL)


@pytest.mark.parametrize("i", range(10))
def test_default_rce_weights_reproduce_the_spec_losses(reference, i: int) -> None:
    p = f"q{i}."
    logprobs = reference[p + "log_probs"]
    mask = torch.ones_like(logprobs, dtype=torch.bool)
    batch = SimpleNamespace(cand_mask=mask)
    for kind, key in (("raw", "beam_rewards_raw"), ("norm", "beam_rewards")):
        for tau in (1, 2):
            w = rce_weights.rce_softmax.rce_weights(batch, reference[p + key], float(tau))
            loss = L.weighted_sequence_loss(logprobs, w, mask)
            assert loss.item() == pytest.approx(
                reference[f"{p}rce_loss_{kind}_t{tau}"].item(), abs=1e-5
            )


def test_effective_sample_size_by_hand() -> None:
    mask = torch.tensor([[True, True, False], [True, True, True], [True, True, True]])
    weights = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.5, 0.25, 0.25]])
    ess = L.effective_sample_size(weights, mask)
    # 1 / (0.25 + 0.25) = 2; 1; 1 / (0.25 + 0.0625 + 0.0625) = 2.666...
    assert torch.allclose(ess, torch.tensor([2.0, 1.0, 1 / 0.375]))
    # top1-only's weight 1/S on one sequence is one effective sample
    assert L.effective_sample_size(torch.tensor([[0.5, 0.0]]), mask[:1, :2]).item() == 1.0


# --------------------------------------------------------------------------- surrogates
RATIO = torch.tensor([[0.7, 1.1, 1.35, 0.9]])
ADV = torch.tensor([[-1.0, 1.0, 2.0, -0.5]])


def test_ppo_clip_by_hand() -> None:
    out = surrogates.ppo_clip.policy_objective(bare_state(clip_epsilon=0.2), RATIO, ADV)
    # min(rA, clamp(r, 0.8, 1.2) A): -0.8 (clamp binds, low), 1.1, 2.4 (binds, high), -0.45
    assert torch.allclose(out.objective, torch.tensor([[-0.8, 1.1, 2.4, -0.45]]))
    assert out.clipped_low.tolist() == [[True, False, False, False]]
    assert out.clipped_high.tolist() == [[False, False, True, False]]


def test_clip_higher_by_hand() -> None:
    state = bare_state(clip_epsilon=0.2, clip_epsilon_high=0.28)
    out = surrogates.clip_higher.policy_objective(state, RATIO, ADV)
    # the upper bound moves to 1.28: 1.35 * 2 = 2.7 -> 1.28 * 2 = 2.56
    assert torch.allclose(out.objective, torch.tensor([[-0.8, 1.1, 2.56, -0.45]]))
    assert out.clipped_high.tolist() == [[False, False, True, False]]
    wide = surrogates.clip_higher.policy_objective(
        bare_state(clip_epsilon=0.2, clip_epsilon_high=0.4), RATIO, ADV
    )
    assert wide.objective[0, 2].item() == pytest.approx(2.7) and not wide.clipped_high.any()


def test_dual_clip_by_hand() -> None:
    state = bare_state(clip_epsilon=0.2, dual_clip_c=3.0)
    ratio = torch.tensor([[4.0, 2.0, 0.5, 4.0]])
    adv = torch.tensor([[-1.0, -1.0, -1.0, 1.0]])
    out = surrogates.dual_clip.policy_objective(state, ratio, adv)
    # A < 0: max(min(rA, clamp(r)A), 3A): max(-4, -3) = -3 (capped); -2; min(-0.5, -0.8) = -0.8
    # A > 0 is PPO's: min(4, 1.2) = 1.2
    assert torch.allclose(out.objective, torch.tensor([[-3.0, -2.0, -0.8, 1.2]]))
    assert out.clipped_high.tolist() == [[True, False, False, True]]
    assert out.clipped_low.tolist() == [[False, False, True, False]]


# --------------------------------------------------------------------------- KL estimators
def test_kl_estimators_by_hand() -> None:
    ln2 = math.log(2.0)
    log_ratio = torch.tensor([[ln2, 0.0, -ln2]])
    assert torch.allclose(kl.kl_k1.kl_estimate(log_ratio), torch.tensor([[-ln2, 0.0, ln2]]))
    assert torch.allclose(
        kl.kl_k2.kl_estimate(log_ratio), torch.tensor([[ln2**2 / 2, 0.0, ln2**2 / 2]])
    )
    # r - 1 - log r: 2 - 1 - ln 2, 0, 0.5 - 1 + ln 2
    assert torch.allclose(
        kl.kl_k3.kl_estimate(log_ratio), torch.tensor([[1 - ln2, 0.0, ln2 - 0.5]])
    )


@pytest.mark.parametrize("i", range(10))
def test_default_surrogate_and_kl_reproduce_the_reference_grpo(reference, i: int) -> None:
    p = f"q{i}."
    new, rewards = reference[p + "log_probs"], reference[p + "beam_rewards"]
    mask = torch.ones_like(new, dtype=torch.bool)
    state = bare_state(clip_epsilon=0.2)
    for old_kind in ("const", "var"):
        log_ratio = L.bounded_log_ratio(new, reference[f"{p}old_log_probs_{old_kind}"], mask)
        adv = L.group_advantages(rewards, mask)
        obj = surrogates.ppo_clip.policy_objective(state, torch.exp(log_ratio), adv)
        name = f"{p}grpo_norm_{old_kind}_topNone"
        ppo = -L.masked_mean(obj.objective, mask).mean()
        kl_value = L.masked_mean(kl.kl_k3.kl_estimate(log_ratio), mask).mean()
        assert ppo.item() == pytest.approx(reference[name + ".ppo_loss"].item(), abs=1e-5)
        assert kl_value.item() == pytest.approx(reference[name + ".kl"].item(), abs=1e-5)


def test_kl_target_controller_by_hand() -> None:
    state = bare_state(kl_target=0.05, kl_horizon=10.0)
    # error = clamp(kl / target - 1, -0.2, 0.2); beta * (1 + error / horizon)
    assert kl.kl_target.adapt_kl_beta(state, 0.1, 1.0) == pytest.approx(1.02)  # error 1 -> 0.2
    assert kl.kl_target.adapt_kl_beta(state, 0.055, 1.0) == pytest.approx(1.01)  # 0.1
    assert kl.kl_target.adapt_kl_beta(state, 0.0, 2.0) == pytest.approx(1.96)  # -1 -> -0.2
    assert kl.kl_target.adapt_kl_beta(state, 0.05, 0.3) == pytest.approx(0.3)


# --------------------------------------------------------------------------- advantages
REWARDS = torch.tensor([[1.0, 2.0, 6.0, 2.0], [5.0, 0.0, 0.0, 0.0], [3.0, 3.0, 3.0, 0.0]])
MASK = torch.tensor(
    [[True, True, True, False], [True, False, False, False], [True, True, True, False]]
)


def test_group_center_by_hand() -> None:
    adv = advantages.group_center.compute_advantages(REWARDS, MASK)
    # mean 3: -2, -1, 3; a group of one: 0; an all-equal group: 0; padding 0
    assert adv.tolist() == [[-2.0, -1.0, 3.0, 0.0], [0.0] * 4, [0.0] * 4]


def test_rloo_by_hand() -> None:
    adv = advantages.rloo.compute_advantages(REWARDS, MASK)
    # r_j - mean of the others: 1 - 4 = -3, 2 - 3.5 = -1.5, 6 - 1.5 = 4.5
    assert torch.allclose(adv[0], torch.tensor([-3.0, -1.5, 4.5, 0.0]))
    assert adv[1:].abs().sum() == 0


def test_rank_advantage_by_hand() -> None:
    rewards = torch.tensor([[1.0, 2.0, 6.0, 2.0], [5.0, 0.0, 0.0, 0.0], [3.0, 3.0, 3.0, 0.0]])
    mask = torch.tensor([[True] * 4, [True, False, False, False], [True, True, True, False]])
    adv = advantages.rank_advantage.compute_advantages(rewards, mask)
    # ranks from the top: 6 -> 0, the two 2s share (1 + 2) / 2 = 1.5, 1 -> 3; n = 4:
    # 1 - 2 * rank / 3 = -1, 0, 1, 0; one candidate: 0; all equal: shared rank 1 -> 0
    assert torch.allclose(adv[0], torch.tensor([-1.0, 0.0, 1.0, 0.0]))
    assert adv[1:].abs().sum() == 0


def test_zero_variance_filter_by_hand() -> None:
    batch = SimpleNamespace(rewards_raw=REWARDS, cand_mask=MASK)
    # a group of one and an all-equal group carry no signal
    assert skip_zero_variance.filter_groups(batch).tolist() == [True, False, False]


# --------------------------------------------------------------------------- the GRPO step
def grpo_setup(demo_files, tmp_path, **kwargs: Any) -> tuple[Any, Any, Any]:
    """An eval-mode trainer in its GRPO phase, a batch of 8 queries with a reference that
    makes the clip bind, and the phase object."""
    trainer = make_trainer(demo_files, tmp_path / "run", rce_epochs=0, grpo_epochs=1, **kwargs)
    trainer.resolve_rewards()
    state = trainer.state
    state.phase, state.epoch = "grpo", 1
    phase = phase_named(trainer, "grpo")
    phase.start(state, resumed=False)
    trainer.model.eval()
    table = state.train
    ref = trainer.compute_logprobs(table) - 0.3 * torch.linspace(-1, 1, table.rewards_raw.shape[1])
    batch = make_batch(table, torch.arange(8), trainer.emb, ref)
    return trainer, phase, batch


def by_hand_grpo(trainer, batch, skip: torch.Tensor | None = None) -> dict[str, float]:
    """The GRPO step of docs/algorithm.md#grpo-loss with the default plugins, one query at a time, in plain
    tensor code: keep the top 3 by normalised reward, z-score advantages, clipped
    surrogate, k3."""
    model = trainer.model
    ppo, kls, ratios, flags_low, flags_high, advs, ents = [], [], [], [], [], [], []
    zero_var = 0
    used = 0
    for i in range(len(batch)):
        n = int(batch.cand_mask[i].sum())
        norm = batch.rewards_norm[i, :n]
        order = sorted(range(n), key=lambda j: (-float(norm[j]), j))[:3]
        keep = sorted(order)
        seqs = batch.sequences[i, keep]
        enc = model.encode(batch.query_emb[i : i + 1], batch.cand_emb[i : i + 1])
        logits, _ = model.decode(enc, labels=seqs[None])
        new = L.sequence_logprobs(logits, seqs[None])[0]
        ratio = torch.exp(new - batch.ref_logprobs[i, keep])
        r = norm[keep]
        std = r.std() if len(r) > 1 else torch.tensor(0.0)
        adv = ((r - r.mean()) / max(float(std), 0.1)).clamp(-5, 5) if len(r) > 1 else r * 0
        raw = batch.rewards_raw[i, keep]
        flat = bool(raw.max() == raw.min())
        zero_var += flat
        p_step = torch.softmax(logits[0], -1)
        ents.append(-(p_step * torch.log(p_step.clamp_min(1e-45))).sum(-1).mean(-1))
        ratios.append(ratio)
        advs.append(adv)
        flags_low.append((ratio < 0.8) & (adv < 0))
        flags_high.append((ratio > 1.2) & (adv > 0))
        if skip is not None and flat:
            continue
        used += 1
        ppo.append(-torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv).mean())
        kls.append((ratio - 1 - torch.log(ratio)).mean())
    all_ratio, all_adv = torch.cat(ratios), torch.cat(advs)
    return {
        "ppo": float(torch.stack(ppo).mean()),
        "kl": float(torch.stack(kls).mean()),
        "mean_ratio": float(torch.stack([r.mean() for r in ratios]).mean()),
        "max_ratio": float(all_ratio.max()),
        "clip_low": float(torch.cat(flags_low).float().mean()),
        "clip_high": float(torch.cat(flags_high).float().mean()),
        "adv_mean": float(all_adv.mean()),
        "adv_std": float(all_adv.std()),
        "entropy": float(torch.cat(ents).mean()),
        "zero_var_groups": zero_var / len(batch),
        "skipped_groups": 0.0 if skip is None else (len(batch) - used) / len(batch),
        "kept": float(sum(len(r) for r in ratios)) / len(batch),
    }


@torch.no_grad()
def test_grpo_step_loss_and_diagnostics_by_hand(demo_files, tmp_path) -> None:
    trainer, phase, batch = grpo_setup(demo_files, tmp_path)
    out = phase.loss(trainer.state, batch)
    expected = by_hand_grpo(trainer, batch)
    assert expected["clip_low"] + expected["clip_high"] > 0  # the clip binds somewhere
    for key, value in expected.items():
        assert out[key].item() == pytest.approx(value, abs=1e-5), key
    assert out["loss"].item() == pytest.approx(expected["ppo"] + 0.1 * expected["kl"], abs=1e-5)
    assert out["kl_beta"].item() == pytest.approx(0.1)
    # the same numbers as the reference's batched function
    keep = L.top_k_mask(batch.rewards_norm, batch.cand_mask, 3)
    spec = L.grpo_loss(
        L.sequence_logprobs(*_tf(trainer, batch)),
        batch.ref_logprobs,
        L.group_advantages(batch.rewards_norm, keep),
        keep,
        0.2,
        0.1,
    )
    assert out["loss"].item() == pytest.approx(spec["loss"].item(), abs=1e-5)


def _tf(trainer, batch) -> tuple[torch.Tensor, torch.Tensor]:
    enc = trainer.model.encode(batch.query_emb, batch.cand_emb, batch.pool_mask)
    return trainer.model.decode(enc, batch.pool_mask, batch.sequences)[0], batch.sequences


@torch.no_grad()
def test_skip_zero_variance_leaves_flat_groups_out_of_the_loss(demo_files, tmp_path) -> None:
    trainer, phase, batch = grpo_setup(demo_files, tmp_path, enable=("skip-zero-variance",))
    # make two queries' top candidates tie on the raw reward
    for i in (1, 4):
        batch.rewards_raw[i] = 1.5
    out = phase.loss(trainer.state, batch)
    expected = by_hand_grpo(trainer, batch, skip=torch.tensor(True))
    assert expected["skipped_groups"] >= 0.25
    for key in ("ppo", "kl", "skipped_groups", "zero_var_groups"):
        assert out[key].item() == pytest.approx(expected[key], abs=1e-5), key


@torch.no_grad()
def test_ppo_clip_only_drops_the_kl_term_and_keeps_measuring_it(demo_files, tmp_path) -> None:
    trainer, phase, batch = grpo_setup(demo_files, tmp_path, enable=("ppo-clip-only",))
    out = phase.loss(trainer.state, batch)
    expected = by_hand_grpo(trainer, batch)
    assert out["loss"].item() == pytest.approx(expected["ppo"], abs=1e-5)
    assert out["kl"].item() == pytest.approx(expected["kl"], abs=1e-5) and expected["kl"] > 0
    assert out["kl_beta"].item() == 0.0
    phase.after_step(trainer.state, {"kl": 5.0})  # no adaptation without a KL term
    assert phase.kl_beta == pytest.approx(0.1) and phase.epoch_metrics(trainer.state) == {
        "kl_beta": 0.0
    }


def test_an_explicit_variant_replaces_the_default_and_two_conflict(demo_files, tmp_path) -> None:
    trainer = make_trainer(
        demo_files, tmp_path / "a", enable=("rloo",), rce_epochs=0, grpo_epochs=1
    )
    trainer.fit()
    assert "grpo: compute_advantages [rloo, plugin]" in trainer.log_lines
    both = make_trainer(
        demo_files, tmp_path / "b", enable=("rloo", "group-center"), rce_epochs=0, grpo_epochs=1
    )
    with pytest.raises(PluginError, match="both answer hook compute_advantages"):
        both.fit()


def test_conflicting_variants_are_one_error_line_on_the_cli(cli, demo_files, tmp_path) -> None:
    result = cli(
        "--beam-data", demo_files[0], "--img-emb", demo_files[1], "--output-dir",
        tmp_path / "run", "--hidden-dim", "16", "--rce-epochs", "0", "--grpo-epochs", "1",
        "--plugin", "kl-k1", "--plugin", "kl-k2",
    )  # fmt: skip
    assert_user_error(result, "kl-k1", "kl-k2", "kl_estimate")


# --------------------------------------------------------------------------- learning rate
def test_lr_schedule_values_by_hand() -> None:
    # 2 epochs of 4 steps: one step is 1/8 of the phase; warm-up 0.25 = two steps
    rates = [lr_schedule.scheduled_lr(1.0, s / 8, 1 / 8, "cosine", 0.25, 0.0) for s in range(8)]
    # warm-up: (0 + 1/8) / 0.25, (1/8 + 1/8) / 0.25; then q = (p - 0.25) / 0.75 = k/6
    cosine = [0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]
    assert rates == pytest.approx([0.5, 1.0, *cosine])
    linear = [lr_schedule.scheduled_lr(2.0, s / 8, 1 / 8, "linear", 0.25, 0.1) for s in (2, 5)]
    # 2 * (0.1 + 0.9 * (1 - q)) at q = 0 and q = 0.5
    assert linear == pytest.approx([2.0, 2 * (0.1 + 0.9 * 0.5)])
    assert lr_schedule.scheduled_lr(3.0, 0.9, 0.1, "constant", 0.0, 0.0) == 3.0


class StepRecorder:
    def __init__(self) -> None:
        self.steps: list[tuple[str, int, int, float, bool]] = []

    @hookimpl
    def on_step_end(self, state) -> None:
        self.steps.append(
            (
                state.phase,
                state.epoch,
                state.step_in_epoch,
                state.last_step["lr"],
                state.model.training,
            )
        )


def test_lr_schedule_sets_every_step_rate(demo_files, tmp_path) -> None:
    recorder = StepRecorder()
    trainer = make_trainer(
        demo_files,
        tmp_path / "run",
        enable=("lr-schedule", "rec"),
        extra=(("rec", recorder),),
        rce_epochs=2,
        rce_lr=1e-3,
        lr_warmup=0.25,
        lr_schedule="cosine",
    )
    trainer.fit()
    # 32 training queries, batches of 8: 4 steps per epoch, 8 in the phase
    rates = [lr for _, _, _, lr, _ in recorder.steps]
    cosine = [0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]
    assert rates == pytest.approx([1e-3 * x for x in (0.5, 1.0, *cosine)])
    assert trainer.state.history[0]["train_lr"] == pytest.approx(
        1e-3 * (0.5 + 1 + 1 + cosine[1]) / 4
    )
    assert "rce: learning_rate [lr-schedule, plugin]" in trainer.log_lines


# --------------------------------------------------------------------------- exact resume
RESUME = {"rce_epochs": 2, "grpo_epochs": 2, "grpo_lr": 1e-3, "ref_sync_steps": 3}
STATEFUL = ("lr-schedule", "reference-sync", "easy-first", "early-stopping")


def weights(trainer: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("stop_at", [("rce", 2, 1), ("grpo", 1, 2)])
def test_stateful_variants_resume_bit_exact(demo_files, tmp_path, stop_at) -> None:
    settings = {**RESUME, "early_stop_patience": 10}
    full = make_trainer(demo_files, tmp_path / "full", enable=STATEFUL, **settings)
    full.fit()

    class Stopper:
        @hookimpl
        def on_step_end(self, state) -> None:
            if (state.phase, state.epoch, state.step_in_epoch) == stop_at:
                interrupted.stop_requested = "test"

    out = tmp_path / "run"
    interrupted = make_trainer(
        demo_files, out, enable=(*STATEFUL, "stop"), extra=(("stop", Stopper()),), **settings
    )
    with pytest.raises(StopRequested):
        interrupted.fit()
    snapshot = torch.load(out / SNAPSHOT_NAME, weights_only=True)
    assert set(snapshot["plugins"]) >= {"lr-schedule", "reference-sync", "early-stopping"}
    resumed = make_trainer(demo_files, out, enable=STATEFUL, **settings)
    resumed.fit(resume=snapshot)
    final, expected = weights(resumed), weights(full)
    for key, value in expected.items():
        assert torch.equal(final[key], value), key
    assert torch.equal(resumed.state.ref_logprobs, full.state.ref_logprobs)
    assert resumed.state.extra["reference-sync"] == full.state.extra["reference-sync"]
    assert full.state.extra["reference-sync"]["syncs"] >= 2


# --------------------------------------------------------------------------- reference sync
@torch.no_grad()
def test_reference_sync_mixes_current_log_probs_in(demo_files, tmp_path) -> None:
    trainer = make_trainer(
        demo_files, tmp_path / "run", enable=("reference-sync",), ref_sync_alpha=0.25,
        ref_sync_steps=2, grpo_epochs=1,
    )  # fmt: skip
    state = trainer.state
    state.current_phase = phase_named(trainer, "grpo")
    old = torch.randn(state.train.rewards_raw.shape)
    state.ref_logprobs, state.step = old, 3
    reference_sync.on_step_end(state)
    assert state.ref_logprobs is old  # not a multiple of 2: unchanged
    state.step = 4
    reference_sync.on_step_end(state)
    current = trainer.compute_logprobs(state.train)
    assert torch.allclose(state.ref_logprobs, 0.25 * current + 0.75 * old, atol=TOL)
    assert old.abs().sum() > 0 and state.extra["reference-sync"] == {"syncs": 1, "last_step": 4}


def test_a_moved_reference_reaches_the_next_step(demo_files, tmp_path) -> None:
    """The trainer reads ``state.ref_logprobs`` at every step, not once per epoch."""
    seen: list[torch.Tensor] = []

    class Mover:
        @hookimpl
        def on_step_end(self, state) -> None:
            if state.phase == "grpo":
                state.ref_logprobs = state.ref_logprobs + 1.0

        @hookimpl
        def select_candidates(self, state, phase, batch, rewards):
            seen.append(batch.ref_logprobs[0, 0].clone())
            return None

    trainer = make_trainer(
        demo_files, tmp_path / "run", enable=("mover",), extra=(("mover", Mover()),),
        rce_epochs=0, grpo_epochs=1, grpo_lr=1e-12,
    )  # fmt: skip
    trainer.fit()
    assert len(seen) == 4
    # each batch holds other queries, so compare with the starting log-probs of its row
    start = trainer.start_logprobs
    assert start is not None
    order = trainer.epoch_progress["epoch_order"]
    for k, value in enumerate(seen):
        assert value.item() == pytest.approx(start[int(order[8 * k]), 0].item() + k, abs=1e-5)


# --------------------------------------------------------------------------- dropout
def test_disable_dropout_trains_grpo_in_eval_mode(demo_files, tmp_path) -> None:
    for enable, label in (((), "dropout"), (("disable-dropout",), "no dropout")):
        recorder = StepRecorder()
        trainer = make_trainer(
            demo_files, tmp_path / label, enable=(*enable, "rec", "grpo-reference-refresh"),
            extra=(("rec", recorder),), rce_epochs=1, grpo_epochs=1,
        )  # fmt: skip
        trainer.fit()
        modes = {(phase, mode) for phase, _, _, _, mode in recorder.steps}
        if enable:
            assert modes == {("rce", True), ("grpo", False)}
        else:
            assert modes == {("rce", True), ("grpo", True)}
        grpo = next(h for h in trainer.state.history if h["phase"] == "grpo")
        # the reference is the post-RCE policy in eval mode: without dropout the first
        # step's ratios are exactly 1 and the KL grows only as the weights move
        if enable:
            assert grpo["train_kl"] < 0.05
        else:
            assert grpo["train_kl"] > 0.05


# --------------------------------------------------------------------------- early stopping
def test_early_stopping_counts_by_hand() -> None:
    state = bare_state(
        early_stop_metric="val_loss", early_stop_mode="auto", early_stop_patience=3,
        early_stop_min_delta=0.0, early_stop_phases="all",
    )  # fmt: skip
    state.phase = "rce"
    for epoch, value in enumerate([1.0, 0.9, 0.95, 0.91, 0.92], start=1):
        state.epoch = epoch
        early_stopping.on_epoch_end(state, {"val_loss": value})
        assert (state.stop_request is not None) == (epoch == 5), epoch
    assert state.stop_request is not None and "best 0.9" in state.stop_request.reason
    # a new phase starts afresh
    state.stop_request, state.phase = None, "grpo"
    early_stopping.on_epoch_end(state, {"val_loss": 5.0})
    assert state.extra["early-stopping"] == {"phase": "grpo", "best": 5.0, "bad": 0}
    # min-delta: 0.97 is not better than 1.0 by more than 0.05
    delta = bare_state(**{**state.options, "early_stop_min_delta": 0.05, "early_stop_patience": 1})
    delta.phase = "rce"
    early_stopping.on_epoch_end(delta, {"val_loss": 1.0})
    early_stopping.on_epoch_end(delta, {"val_loss": 0.97})
    assert delta.stop_request is not None
    with pytest.raises(LeverError, match="--early-stop-metric 'val_loss': not among"):
        early_stopping.on_epoch_end(delta, {"train_loss": 1.0})


def test_early_stopping_ends_the_run(demo_files, tmp_path) -> None:
    trainer = make_trainer(
        demo_files, tmp_path / "run", enable=("early-stopping",), rce_epochs=5, grpo_epochs=1,
        early_stop_metric="train_tau", early_stop_mode="max", early_stop_patience=2,
    )  # fmt: skip
    trainer.fit()
    # the temperature only falls: epoch 1 is the best, epochs 2 and 3 exhaust the patience
    assert [(h["phase"], h["epoch"]) for h in trainer.state.history] == [
        ("rce", 1),
        ("rce", 2),
        ("rce", 3),
    ]
    assert any(
        line.startswith("stopped early by early-stopping: train_tau has not improved")
        for line in trainer.log_lines
    )


def test_phase_list_options_name_unknown_phases(demo_files, tmp_path) -> None:
    trainer = make_trainer(
        demo_files, tmp_path / "run", enable=("disable-dropout",), disable_dropout_phases="gpro"
    )
    with pytest.raises(LeverError, match=r"--disable-dropout-phases 'gpro'.*rce"):
        trainer.fit()


# --------------------------------------------------------------------------- data curriculum
def test_easy_first_visits_the_widest_spread_queries_first(demo_files, tmp_path) -> None:
    recorder = StepRecorder()
    trainer = make_trainer(
        demo_files, tmp_path / "run", enable=("easy-first", "rec"), extra=(("rec", recorder),),
        rce_epochs=2, easy_fraction=0.25,
    )  # fmt: skip
    table = trainer.state.train
    # by hand: max - min of each query's raw rewards, the 8 largest (ties: lower row)
    spreads = []
    for q in range(len(table)):
        r = table.rewards_raw[q, : int(table.group_len[q])].tolist()
        spreads.append((-(max(r) - min(r)), q))
    easy = sorted(q for _, q in sorted(spreads)[:8])
    generator = torch.Generator().manual_seed(0)
    rows = easy_first.train_rows(trainer.state, "rce", 1, generator)
    assert sorted(rows.tolist()) == easy
    assert easy_first.train_rows(trainer.state, "rce", 2, generator) is None
    trainer.fit()
    # epoch 1: 8 queries in one step; epoch 2: all 32 in four
    assert [(e, s) for _, e, s, _, _ in recorder.steps] == [(1, 1), (2, 1), (2, 2), (2, 3), (2, 4)]


# --------------------------------------------------------------------------- alias flags
def test_upstream_alias_flags(cli, demo_files, tmp_path) -> None:
    base = (
        "--beam-data", demo_files[0], "--img-emb", demo_files[1], "--hidden-dim", "16",
        "--rce-epochs", "1", "--grpo-epochs", "1", "--kl-beta", "0.3",
    )  # fmt: skip
    result = cli(*base, "--output-dir", tmp_path / "a", "--use_top1_only", "--use_rank_advantage",
                 "--use_ppo_clip_only", "--disable_adaptive_kl")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "rce: rce_weights [top1-only, plugin]" in result.output
    assert "grpo: compute_advantages [rank-advantage, plugin]" in result.output
    assert "grpo: kl_penalty [ppo-clip-only, plugin]" in result.output
    assert "adaptive-kl" not in result.output.split("plugins: ")[1].split(";")[0]
    fixed = cli(*base, "--output-dir", tmp_path / "b", "--disable_adaptive_kl")
    assert fixed.exit_code == 0, fixed.output
    grpo_line = next(ln for ln in fixed.output.splitlines() if ln.startswith("grpo epoch 1/"))
    assert "kl_beta 0.3000" in grpo_line
    clash = cli(
        *base, "--output-dir", tmp_path / "c", "--disable_adaptive_kl", "--plugin", "adaptive-kl"
    )
    assert_user_error(clash, "adaptive-kl")

"""The core loop: batching equals one query per step, phases, plugins' effects, checkpoints."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lever_trainer import RewardChoice, TrainConfig, hookimpl
from lever_trainer.checkpoint import read_metadata
from lever_trainer.data import (
    DataOptions,
    load_embeddings,
    load_rl_data,
    make_batch,
    split_train_val,
)
from lever_trainer.errors import LeverError
from lever_trainer.evaluation import policy_logprobs
from lever_trainer.losses import group_advantages, grpo_loss, rce_loss, top_k_mask
from lever_trainer.plugins import load_plugins
from lever_trainer.rewards import registry_from_plugins
from lever_trainer.trainer import Trainer
from lever_trainer_plugins.pointer import PointerPolicy, PolicyConfig

CORE_SETTINGS = {f.name for f in fields(TrainConfig)}


def make_trainer(
    files: tuple[Path, Path],
    out: Path,
    enable: tuple[str, ...] = (),
    disable: tuple[str, ...] = (),
    extra: tuple[tuple[str, Any], ...] = (),
    judge: Any = None,
    policy: Any = None,
    **cfg: Any,
) -> Trainer:
    plugins = load_plugins(list(enable), list(disable), extra=list(extra))
    table, _ = load_rl_data(files[0], DataOptions(), registry_from_plugins(plugins))
    emb = load_embeddings(files[1])
    train, val = split_train_val(table, 0.2)
    torch.manual_seed(0)
    model = policy or PointerPolicy(PolicyConfig(input_dim=emb.dim, hidden_dim=32))
    settings = {"rce_epochs": 1, "grpo_epochs": 0, "batch_size": 8, "seed": 0, **cfg}
    config = TrainConfig(**{k: v for k, v in settings.items() if k in CORE_SETTINGS})
    options = {k: v for k, v in settings.items() if k not in CORE_SETTINGS}
    lines: list[str] = []
    trainer = Trainer(
        config,
        model,
        train,
        val,
        emb,
        plugins,
        out,
        options=options,
        log=lines.append,
        judge=judge,
    )
    trainer.log_lines = lines  # type: ignore[attr-defined]
    return trainer


def phase_named(trainer: Trainer, name: str) -> Any:
    """The trainer's phase object called ``name``."""
    return next(p for p in trainer.phases if p.name == name)


@pytest.mark.parametrize("phase", ["rce", "grpo"])
def test_batch_loss_and_gradients_equal_one_query_per_step(demo_files, tmp_path, phase) -> None:
    """Eval mode: the batch loss is the mean of one-query losses; gradients match to 1e-5."""
    trainer = make_trainer(demo_files, tmp_path / "run")
    model, table, emb = trainer.model.eval(), trainer.state.train, trainer.emb
    ref = trainer.compute_logprobs(table) - 0.1 * torch.arange(table.rewards_raw.shape[1])
    rows = torch.arange(12)

    def loss_of(batch) -> torch.Tensor:
        if phase == "rce":
            return rce_loss(policy_logprobs(model, batch), batch.rewards_raw, batch.cand_mask, 1.3)
        keep = top_k_mask(batch.rewards_norm, batch.cand_mask, 3)
        adv = group_advantages(batch.rewards_norm, keep)
        return grpo_loss(policy_logprobs(model, batch), batch.ref_logprobs, adv, keep, 0.2, 0.1)[
            "loss"
        ]

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.autograd.grad(loss, list(model.parameters())))

    batched = loss_of(make_batch(table, rows, emb, ref))
    g_batched = grads(batched)
    singles = [loss_of(make_batch(table, rows[i : i + 1], emb, ref)) for i in range(len(rows))]
    mean_single = torch.stack(singles).mean()
    g_single = [torch.stack(gs).mean(0) for gs in zip(*(grads(s) for s in singles), strict=True)]
    assert table.group_len[rows].unique().numel() > 1  # groups of different sizes are padded
    assert batched.item() == pytest.approx(mean_single.item(), abs=1e-5)
    for a, b in zip(g_batched, g_single, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_reference_logprobs_come_from_starting_model(demo_files, tmp_path) -> None:
    # the reference implementation's reference, once the default refresh is off
    trainer = make_trainer(
        demo_files, tmp_path / "run", grpo_epochs=1, disable=("grpo-reference-refresh",)
    )
    expected = trainer.compute_logprobs(trainer.state.train)
    trainer.fit()
    assert trainer.start_logprobs is not None and trainer.state.ref_logprobs is not None
    assert torch.equal(trainer.state.ref_logprobs, trainer.start_logprobs)
    assert torch.equal(
        trainer.start_logprobs, expected
    )  # computed before the RCE phase moved the model
    assert not torch.equal(trainer.compute_logprobs(trainer.state.train), expected)


def test_rce_reward_choice_changes_the_loss(demo_files, tmp_path) -> None:
    fixed = {"rce_temp_start": 0.7, "rce_temp_end": 0.7}
    raw = make_trainer(demo_files, tmp_path / "a", **fixed)
    norm = make_trainer(demo_files, tmp_path / "b", enable=("normalized-reward",), **fixed)
    assert raw.resolve_rewards()["rce"].value.source == "beam_rewards_raw"
    assert norm.resolve_rewards()["rce"].value.source == "beam_rewards"
    assert norm.log_lines == ["RCE reward: normalized (beam_rewards) [plugin normalized-reward]"]
    assert raw.log_lines == ["RCE reward: raw (beam_rewards_raw) [default]"]
    batch = make_batch(raw.state.train, torch.arange(8), raw.emb)
    raw.model.eval()
    lp = policy_logprobs(raw.model, batch)
    for trainer, rewards in ((raw, batch.rewards_raw), (norm, batch.rewards_norm)):
        trainer.model.load_state_dict(raw.model.state_dict())
        trainer.model.eval()
        trainer.state.epochs, trainer.state.steps_per_epoch = 1, 4
        out = phase_named(trainer, "rce").loss(trainer.state, batch)
        assert out["loss"].item() == pytest.approx(
            rce_loss(lp, rewards, batch.cand_mask, 0.7).item(), abs=1e-6
        )


def test_no_reward_plugin_is_a_clear_error(demo_files, tmp_path) -> None:
    trainer = make_trainer(demo_files, tmp_path / "run", disable=("raw-reward",))
    with pytest.raises(
        LeverError, match="no active plugin answers hook select_reward for phase 'rce'"
    ):
        trainer.fit()
    assert not (tmp_path / "run").exists()


def test_freeze_backbone_only_in_grpo(demo_files, tmp_path) -> None:
    out = tmp_path / "run"
    trainer = make_trainer(
        demo_files, out, enable=("freeze-backbone",), grpo_epochs=1, grpo_lr=1e-3
    )
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    after_rce, after_grpo = (
        load_file(str(out / "rce_epoch01.safetensors")),
        load_file(str(out / "grpo_epoch01.safetensors")),
    )
    backbone = ("input_proj.weight", "query_proj.weight", "cand_proj.weight")
    for key in backbone:
        assert not torch.equal(start[key], after_rce[key]), f"RCE must train {key}"
        assert torch.equal(after_rce[key], after_grpo[key]), f"GRPO must not train {key}"
    assert not torch.equal(
        after_rce["query_update_gate.weight"], after_grpo["query_update_gate.weight"]
    )
    # d = 16, h = 32. Backbone: 32*16 + 2 * 32*32 = 2560. Head: attention 3*32*32 + 3*32 +
    # 32*32 + 32 = 4224, LayerNorm 64, gate 32*64 + 32 = 2080 -> 6368. Total 8928.
    assert "trainable params: 6,368 / 8,928 (71.3%)" in trainer.log_lines
    assert "freeze-backbone: frozen modules: input_proj, query_proj, cand_proj" in trainer.log_lines


def test_optimizer_holds_only_trainable_params(demo_files, tmp_path, monkeypatch) -> None:
    seen: dict[str, int] = {}
    real = torch.optim.AdamW

    def spy(params, **kw):
        params = list(params)
        seen[f"n{len(seen)}"] = sum(p.numel() for p in params)
        return real(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    make_trainer(demo_files, tmp_path / "run", enable=("freeze-backbone",), grpo_epochs=1).fit()
    assert seen == {"n0": 8928, "n1": 6368}


def test_grpo_phase_adapts_beta_and_runs_curriculum(demo_files, tmp_path) -> None:
    calls: list[tuple[int, float, float]] = []
    tops: list[int] = []

    class Spy:
        @hookimpl
        def adapt_kl_beta(self, state, kl: float, beta: float) -> None:
            calls.append((state.epoch, kl, beta))

        @hookimpl
        def on_step_end(self, state) -> None:
            if state.phase == "grpo":
                tops.append(state.last_step["kept"])

    trainer = make_trainer(
        demo_files,
        tmp_path / "run",
        rce_epochs=0,
        grpo_epochs=2,
        extra=(("spy", Spy()),),
        enable=("spy",),
    )
    trainer.fit()
    steps = math.ceil(len(trainer.state.train) / 8)
    # every demo group holds at least 5 candidates: the curriculum keeps 3, then 5, per query
    assert tops == [3.0] * steps + [5.0] * steps
    assert len(calls) == 2 * steps
    # the betas seen follow the reference rule from the previous step's KL (the spy answers None,
    # so the built-in adaptive-kl decides)
    beta = 0.1
    for _, kl, seen_beta in calls:
        assert seen_beta == pytest.approx(beta)
        beta = min(max(beta * 1.5 if kl > 0.1 else beta / 1.5 if kl < 0.01 else beta, 0.001), 10.0)
    assert phase_named(trainer, "grpo").kl_beta == pytest.approx(beta)


def test_fixed_beta_without_adaptive_kl(demo_files, tmp_path) -> None:
    trainer = make_trainer(
        demo_files,
        tmp_path / "run",
        disable=("adaptive-kl",),
        rce_epochs=0,
        grpo_epochs=1,
        kl_beta=0.3,
    )
    trainer.fit()
    assert phase_named(trainer, "grpo").kl_beta == 0.3
    assert read_metadata(tmp_path / "run" / "grpo_epoch01.safetensors")["kl_beta"] == 0.3


def test_checkpoint_metadata(demo_files, tmp_path) -> None:
    trainer = make_trainer(demo_files, tmp_path / "run", rce_epochs=2)
    trainer.run_metadata["data_fingerprint"] = "abc"
    trainer.fit()
    meta = read_metadata(tmp_path / "run" / "rce_epoch02.safetensors")
    assert meta["format_version"] == 1 and meta["phase"] == "rce" and meta["epoch"] == 2
    assert meta["model"]["hidden_dim"] == 32 and meta["model"]["input_dim"] == 16
    assert meta["plugins"]["raw-reward"].startswith("lever-trainer ")
    assert meta["data_fingerprint"] == "abc"
    assert set(meta["metrics"]) >= {
        "train_loss",
        "val_loss",
        "policy_reward@1",
        "random_reward",
        "oracle_reward",
        "normalized_gain",
        "spearman",
    }
    assert meta["kl_beta"] == 0.1
    weights = load_file(str(tmp_path / "run" / "rce_epoch02.safetensors"))
    assert all(torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())
    history = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(history) == 3  # the start validation, then the two epochs


def test_same_seed_same_weights(demo_files, tmp_path) -> None:
    a = make_trainer(demo_files, tmp_path / "a", grpo_epochs=1)
    a.fit()
    b = make_trainer(demo_files, tmp_path / "b", grpo_epochs=1)
    b.fit()
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k


def test_custom_reward_plugin_without_core_edit(demo_files, tmp_path) -> None:
    """A reward defined outside the package decides RCE and the log names it."""

    class Constant:
        @hookimpl
        def select_reward(self, phase: str) -> RewardChoice | None:
            if phase != "rce":
                return None
            return RewardChoice("zeros", "all zero", lambda b: torch.zeros_like(b.rewards_raw))

    trainer = make_trainer(
        demo_files, tmp_path / "run", extra=(("zeros", Constant()),), enable=("zeros",)
    )
    trainer.fit()
    assert "RCE reward: zeros (all zero) [plugin zeros]" in trainer.log_lines


def test_grpo_reference_default_is_post_rce_and_spec_start_without_refresh(
    demo_files, tmp_path
) -> None:
    seen: dict[str, torch.Tensor] = {}

    class Spy:
        @hookimpl
        def on_phase_start(self, state) -> None:
            if state.phase == "grpo":
                seen["ref"] = state.ref_logprobs.clone()
                seen["now"] = trainer.compute_logprobs(state.train)

    trainer = make_trainer(
        demo_files,
        tmp_path / "a",
        grpo_epochs=1,
        extra=(("spy", Spy()),),
        enable=("spy",),
        disable=("grpo-reference-refresh",),
    )
    start = trainer.compute_logprobs(trainer.state.train)
    trainer.fit()
    assert torch.equal(seen["ref"], start) and not torch.equal(seen["ref"], seen["now"])

    trainer = make_trainer(
        demo_files, tmp_path / "b", grpo_epochs=1, extra=(("spy", Spy()),), enable=("spy",)
    )
    trainer.fit()
    assert torch.equal(seen["ref"], seen["now"])
    assert "GRPO reference log-probs: [default]" in trainer.log_lines


def test_grpo_reference_of_wrong_shape_names_the_plugin(demo_files, tmp_path) -> None:
    class Bad:
        @hookimpl
        def reference_logprobs(self, state, phase, compute):
            return torch.zeros(3)

    trainer = make_trainer(
        demo_files,
        tmp_path / "run",
        rce_epochs=0,
        grpo_epochs=1,
        extra=(("bad", Bad()),),
        enable=("bad",),
    )
    with pytest.raises(
        LeverError,
        match=r"plugin bad: hook reference_logprobs returned \(3,\), expected a tensor of shape",
    ):
        trainer.fit()

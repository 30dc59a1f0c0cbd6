"""One group objective for ``grpo`` and ``online``, and the GRPO-family plugins that drop
into it (GSPO, CISPO, SAPO, REINFORCE++): their numbers by hand, each variant's effect
on an online step equal to its effect on a GRPO step, conflicts and phase mismatches
refused before anything trains, and the removed ``--online-*`` options."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import lever_digits_env
import pytest
import torch
from conftest import assert_user_error
from test_trainer import make_trainer, phase_named
from test_variants import bare_state

from lever_trainer.data import make_batch
from lever_trainer.errors import LeverError, PluginError
from lever_trainer.judge import Judge
from lever_trainer_plugins import cispo, gspo, reinforce_pp, sapo
from lever_trainer_plugins._group_objective import GroupObjectivePhase

T = torch.tensor


# --------------------------------------------------------------------------- by hand
def test_gspo_by_hand() -> None:
    # two-step sequences with log-ratios 0.4 and -0.4: s = exp(0.4 / 2), exp(-0.4 / 2)
    log_r = T([[0.4, -0.4]], requires_grad=True)
    adv = T([[1.0, -1.0]])
    out = gspo.gspo_objective(torch.exp(log_r), adv, steps=2, low=0.1, high=0.1)
    s_hi, s_lo = math.exp(0.2), math.exp(-0.2)  # 1.2214, 0.8187
    # A > 0: min(1.2214 * 1, 1.1 * 1) = 1.1 (clipped); A < 0: min(-0.8187, -0.9) = -0.9
    assert out.objective.tolist()[0] == pytest.approx([1.1, -0.9])
    assert out.clipped_high.tolist() == [[True, False]]
    assert out.clipped_low.tolist() == [[False, True]]
    # inside the clip the objective is s A, whose gradient in log r is s A / |y|
    inside = gspo.gspo_objective(torch.exp(log_r), adv, steps=2, low=0.5, high=0.5)
    inside.objective.sum().backward()
    assert log_r.grad.tolist()[0] == pytest.approx([s_hi / 2, -s_lo / 2])


def test_gspo_uses_the_sequence_length_of_the_run() -> None:
    # |y| = 4: s = exp(0.8 / 4) = exp(0.2), the same as |y| = 2 with log-ratio 0.4
    state = bare_state(gspo_epsilon_low=3e-4, gspo_epsilon_high=4e-4)
    state.train = type("Table", (), {"seq_len": 4})()  # type: ignore[assignment]
    out = gspo.policy_objective(state, torch.exp(T([[0.8, 0.0]])), T([[-1.0, 1.0]]))
    # A = -1 and s = 1.2214 > 1 + 4e-4: min(-1.2214, -(1 + 4e-4)) = -1.2214 (unclipped);
    # s = 1 exactly: 1 * A
    assert out.objective.tolist()[0] == pytest.approx([-math.exp(0.2), 1.0])


def test_cispo_by_hand() -> None:
    log_r = T([[math.log(2.0), math.log(0.5), 0.0]], requires_grad=True)
    adv = T([[1.0, -1.0, 3.0]])
    out = cispo.cispo_objective(torch.exp(log_r), adv, low=1.0, high=0.28)
    # w = clamp(r, 0, 1.28) = 1.28, 0.5, 1; the value is w A
    assert out.objective.tolist()[0] == pytest.approx([1.28, -0.5, 3.0])
    assert out.clipped_high.tolist() == [[True, False, False]]
    assert out.clipped_low.tolist() == [[False, False, False]]
    # the gradient in log pi is w A: the capped sample keeps a gradient (PPO drops it)
    out.objective.sum().backward()
    assert log_r.grad.tolist()[0] == pytest.approx([1.28, -0.5, 3.0])


def test_sapo_by_hand() -> None:
    ratio = T([[1.0, 1.5]], requires_grad=True)
    adv = T([[2.0, -1.0]])
    out = sapo.sapo_objective(ratio, adv, tau_pos=1.0, tau_neg=1.05)
    # r = 1, A > 0, tau 1: sigmoid(0) * 4 / 1 = 2, objective 2 * 2 = 4
    # r = 1.5, A < 0, tau 1.05: s = sigmoid(0.525) = 1 / (1 + e^-0.525); f = s * 4 / 1.05
    s = 1.0 / (1.0 + math.exp(-0.525))
    assert out.objective.tolist()[0] == pytest.approx([4.0, -s * 4 / 1.05])
    assert out.clipped_low is None and out.clipped_high is None
    # df/dr = 4 s (1 - s): 1 at r = 1 (the on-policy gradient A), smaller away from it
    out.objective.sum().backward()
    assert ratio.grad.tolist()[0] == pytest.approx([2.0, -4 * s * (1 - s)])
    assert 4 * s * (1 - s) < 1


def test_reinforce_pp_by_hand() -> None:
    rewards = T([[1.0, 0.0, 9.0], [2.0, 1.0, 9.0]])
    mask = T([[True, True, False], [True, True, False]])
    log_ratio = T([[0.5, 0.0, 0.0], [0.0, -0.5, 0.0]])
    adv = reinforce_pp.batch_advantages(rewards, mask, log_ratio, beta=0.2)
    # r' = r - 0.2 log r = 0.9, 0, 2, 1.1 over the whole batch (padding left out):
    # mean 1.0, deviations -0.1, -1, 1, 0.1, population variance (0.01+1+1+0.01)/4 = 0.505
    std = math.sqrt(0.505)
    expected = [[-0.1 / std, -1 / std, 0.0], [1 / std, 0.1 / std, 0.0]]
    for got, want in zip(adv.tolist(), expected, strict=True):
        assert got == pytest.approx(want, abs=1e-6)
    # equal shaped rewards: advantage 0, not a division by zero
    flat = reinforce_pp.batch_advantages(
        torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, 2), 0.2
    )
    assert flat.tolist() == [[0.0, 0.0]]
    state = bare_state(kl_beta=0.2)
    assert torch.equal(reinforce_pp.compute_advantages(state, rewards, mask, log_ratio), adv)
    assert reinforce_pp.kl_penalty() is False


# --------------------------------------------------------------------------- one objective
VARIANTS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (("clip-higher",), {}),
    (("dual-clip",), {"dual_clip_c": 1.05}),
    (("kl-k1",), {}),
    (("kl-k2",), {}),
    (("ppo-clip-only",), {}),
    (("group-center",), {}),
    (("rloo",), {}),
    (("rank-advantage",), {}),
    (("skip-zero-variance",), {}),
    (("gspo",), {"gspo_epsilon_low": 0.05, "gspo_epsilon_high": 0.05}),
    (("cispo",), {"cispo_epsilon_high": 0.1}),
    (("sapo",), {}),
    (("reinforce-pp",), {}),
]


def step_of_both(demo_files, tmp_path, enable=(), **options) -> dict[str, dict[str, float]]:
    """The values of one ``grpo`` step and one ``online`` step on the same groups.

    The same batch (eval mode, reference log-probs moved so that ratios differ from 1,
    normalised rewards set to the raw ones, two groups with all-equal rewards, no
    curriculum) goes through both phases' ``loss``."""
    trainer = make_trainer(
        demo_files,
        tmp_path / "_".join(enable or ("default",)),
        enable=("online", *enable),
        disable=("grpo-curriculum",),
        rce_epochs=0,
        grpo_epochs=1,
        **options,
    )
    trainer.resolve_rewards()
    state = trainer.state
    trainer.model.eval()
    table = state.train
    ref = trainer.compute_logprobs(table) - 0.3 * torch.linspace(-1, 1, table.rewards_raw.shape[1])
    batch = make_batch(table, torch.arange(8), trainer.emb, ref)
    raw = batch.rewards_raw.clone()
    raw[1], raw[4] = 1.5, 0.5  # flat groups: skip-zero-variance has something to leave out
    batch = dataclasses.replace(batch, rewards_raw=raw, rewards_norm=raw.clone())
    values: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for name in ("grpo", "online"):
            phase = phase_named(trainer, name)
            assert isinstance(phase, GroupObjectivePhase)
            state.phase, state.current_phase, state.epoch = name, phase, 1
            GroupObjectivePhase.start(
                phase, state, resumed=False
            )  # online's own start wants a judge
            out = phase.loss(state, batch)
            values[name] = {k: float(v) for k, v in out.items()}
            phase.after_step(state, values[name])
            values[name]["beta_after"] = phase.kl_beta
    return values


@pytest.fixture
def default_step(demo_files, tmp_path) -> dict[str, dict[str, float]]:
    return step_of_both(demo_files, tmp_path / "base")


def test_default_online_step_is_the_grpo_step(default_step) -> None:
    grpo, online = default_step["grpo"], default_step["online"]
    assert grpo == online
    # the default objective has the KL term at --kl-beta 0.1 in both
    assert grpo["loss"] == pytest.approx(grpo["ppo"] + 0.1 * grpo["kl"], abs=1e-6)
    assert grpo["kl"] > 0 and grpo["clip_low"] + grpo["clip_high"] > 0


@pytest.mark.parametrize(("enable", "options"), VARIANTS, ids=[v[0][0] for v in VARIANTS])
def test_a_variant_changes_an_online_step_as_it_changes_a_grpo_step(
    demo_files, tmp_path, default_step, enable, options
) -> None:
    both = step_of_both(demo_files, tmp_path, enable, **options)
    grpo, online = both["grpo"], both["online"]
    assert grpo == online  # the same objective, asked through the same hooks
    change = {k: grpo[k] - default_step["grpo"][k] for k in grpo}
    assert change == {k: online[k] - default_step["online"][k] for k in online}
    assert change["loss"] != 0.0, "the variant left the loss unchanged: nothing tested"


def test_kl_target_moves_the_online_weight_as_the_grpo_weight(
    demo_files, tmp_path, default_step
) -> None:
    both = step_of_both(demo_files, tmp_path, ("kl-target",))
    kl = both["grpo"]["kl"]
    # Ziegler's controller from beta 0.1: beta * (1 + clamp(kl / 0.05 - 1, -0.2, 0.2) / 10)
    expected = 0.1 * (1 + min(max(kl / 0.05 - 1, -0.2), 0.2) / 10)
    assert both["grpo"]["beta_after"] == pytest.approx(expected)
    assert both["online"]["beta_after"] == pytest.approx(expected)
    assert expected != default_step["grpo"]["beta_after"]


def test_ppo_clip_only_online_is_the_old_online_loss(demo_files, tmp_path) -> None:
    """Before the shared objective, online minimised the PPO-clip surrogate alone
    (``--online-kl-beta`` 0): ``ppo-clip-only`` gives exactly that loss."""
    online = step_of_both(demo_files, tmp_path, ("ppo-clip-only",))["online"]
    assert online["loss"] == online["ppo"] and online["kl"] > 0 and online["kl_beta"] == 0.0


# --------------------------------------------------------------------------- refused early
@pytest.mark.parametrize("second", ["clip-higher", "gspo", "cispo", "dual-clip"])
def test_two_surrogates_are_refused_before_anything_trains(
    cli, demo_files, tmp_path, second
) -> None:
    result = cli(
        "--beam-data", demo_files[0], "--img-emb", demo_files[1], "--output-dir",
        tmp_path / "run", "--hidden-dim", "16", "--rce-epochs", "1", "--grpo-epochs", "1",
        "--plugin", "sapo", "--plugin", second,
    )  # fmt: skip
    assert_user_error(result, "sapo", second, "policy_objective")
    assert "rce epoch" not in result.output  # RCE did not train first


def test_an_objective_plugin_in_a_run_without_group_phases_is_named(demo_files, tmp_path) -> None:
    """`--plugin sapo` without GRPO epochs or online changes nothing: the log says so; with
    GRPO epochs it is used and nothing is said."""
    idle = make_trainer(demo_files, tmp_path / "idle", enable=("sapo",), rce_epochs=1)
    idle.fit()
    said = [ln for ln in idle.log_lines if "--plugin sapo" in ln]
    assert len(said) == 1 and "none trains in this run" in said[0]
    used = make_trainer(
        demo_files, tmp_path / "used", enable=("sapo",), rce_epochs=1, grpo_epochs=1
    )
    used.fit()
    assert not [ln for ln in used.log_lines if "none trains in this run" in ln]


def digits_judge() -> Judge:
    env = lever_digits_env.DigitsEnvironment()
    return Judge(env, "digits", None, lambda v: v["vqa_correct"] + v["vqa_acc_score"])


def test_conflicts_of_an_online_only_run_are_refused_before_rce(digits_files, tmp_path) -> None:
    trainer = make_trainer(
        digits_files, tmp_path / "r", enable=("online", "reinforce-pp", "rloo"),
        judge=digits_judge(), rce_epochs=1, online_epochs=1,
    )  # fmt: skip
    with pytest.raises(PluginError, match=r"reinforce-pp and rloo|rloo and reinforce-pp"):
        trainer.fit()
    assert trainer.state.history == []  # nothing trained


def test_grpo_only_plugins_are_refused_where_only_online_learns(digits_files, tmp_path) -> None:
    for plugin in ("reference-sync", "freeze-backbone"):
        trainer = make_trainer(
            digits_files, tmp_path / plugin, enable=("online", plugin), judge=digits_judge(),
            rce_epochs=1, online_epochs=1,
        )  # fmt: skip
        with pytest.raises(LeverError, match=f"--plugin {plugin}: applies to phase grpo only"):
            trainer.fit()
        assert trainer.state.history == []


def test_a_grpo_only_plugin_says_so_when_both_phases_learn(digits_files, tmp_path) -> None:
    trainer = make_trainer(
        digits_files, tmp_path / "r", enable=("online", "reference-sync"), judge=digits_judge(),
        rce_epochs=0, grpo_epochs=1, online_epochs=1, online_samples=2,
    )  # fmt: skip
    trainer.fit()
    assert "reference-sync: applies to phase grpo, not online" in trainer.log_lines


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory):
    import json
    from pathlib import Path

    from conftest import write_json

    files = lever_digits_env.files()
    doc = json.loads(Path(files["train"]).read_text())
    keys = [k for k in doc if k.isdigit()][:40]
    path = write_json(tmp_path_factory.mktemp("d40") / "train40.json", {k: doc[k] for k in keys})
    return path, Path(files["embeddings"])


# --------------------------------------------------------------------------- removed options
@pytest.mark.parametrize(
    ("flag", "replacement"),
    [("--online-kl-beta", "--kl-beta"), ("--online-clip-epsilon", "--clip-epsilon")],
)
def test_removed_online_options_name_their_replacement(
    cli, demo_files, tmp_path, monkeypatch, flag, replacement
) -> None:
    base = (
        "--beam-data", demo_files[0], "--img-emb", demo_files[1], "--output-dir",
        tmp_path / "run", "--plugin", "online",
    )  # fmt: skip
    # on the command line
    assert_user_error(cli(*base, flag, "0.1"), f"{flag} was removed", f"use {replacement}")
    # in a config file
    config = tmp_path / "c.toml"
    config.write_text(f"{flag.lstrip('-')} = 0.1\n")
    assert_user_error(cli(*base, "--config", config), "was removed", f"use {replacement}")
    # in the environment
    monkeypatch.setenv("LEVER_TRAIN_" + flag.lstrip("-").replace("-", "_").upper(), "0.1")
    assert_user_error(cli(*base), "was removed", f"use {replacement}")


def test_a_recorded_default_of_a_removed_option_is_not_an_error(cli, demo_files, tmp_path) -> None:
    """A run_config.json written before the options were removed records their defaults
    (not given by the user): repeating that run works; one that records them as given
    stops with the line naming the replacement."""
    import json

    options = {"online_kl_beta": 0.0, "online_clip_epsilon": 0.2, "plugins_on": ["online"]}
    old = {"lever_trainer_version": "0.1", "options": options, "given": {}}
    config = tmp_path / "run_config.json"
    config.write_text(json.dumps(old))
    args = (
        "--beam-data",
        demo_files[0],
        "--img-emb",
        demo_files[1],
        "--output-dir",
        tmp_path / "r",
    )
    result = cli("--config", config, *args, "--print-config")
    assert result.exit_code == 0, result.output
    assert "online-kl-beta" not in result.output
    old["given"] = {"online_kl_beta": "--online-kl-beta"}
    config.write_text(json.dumps(old))
    assert_user_error(cli("--config", config, *args), "--online-kl-beta was removed", "--kl-beta")

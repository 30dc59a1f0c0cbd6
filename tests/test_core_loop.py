"""The core is only a loop: phases, rows, stops and options come from plugins."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import best_sequence_phase
import pytest
import torch
from conftest import assert_user_error
from test_trainer import make_trainer, phase_named

from lever_trainer import hookimpl
from lever_trainer.checkpoint import read_metadata
from lever_trainer.data import make_batch
from lever_trainer.errors import LeverError, PluginError
from lever_trainer.plugins import load_plugins
from lever_trainer.trainer import SNAPSHOT_NAME, StopRequested

WARMUP = (("warmup", best_sequence_phase),)


def weights(trainer: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def comparable(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in history]


def test_a_third_phase_runs_before_rce_without_core_edits(demo_files, tmp_path) -> None:
    out = tmp_path / "run"
    trainer = make_trainer(
        demo_files, out, extra=WARMUP, enable=("warmup",), warmup_epochs=2, grpo_epochs=1
    )
    assert [p.name for p in trainer.phases] == ["warmup", "rce", "grpo"]
    trainer.fit()
    assert [(h["phase"], h["epoch"]) for h in trainer.state.history] == [
        ("warmup", 1),
        ("warmup", 2),
        ("rce", 1),
        ("grpo", 1),
    ]
    assert read_metadata(out / "warmup_epoch02.safetensors")["phase"] == "warmup"
    assert "WARMUP reward" not in "\n".join(trainer.log_lines)  # needs_reward = False


def test_third_phase_loss_is_cross_entropy_of_the_best_sequence(demo_files, tmp_path) -> None:
    trainer = make_trainer(demo_files, tmp_path / "run", extra=WARMUP, enable=("warmup",))
    model = trainer.model.eval()
    batch = make_batch(trainer.state.train, torch.arange(6), trainer.emb)
    out = phase_named(trainer, "warmup").loss(trainer.state, batch)
    # by hand: per query, minus the sum over steps of log_softmax(logits_t)[y_t] of the
    # logged sequence with the highest raw reward (first on ties), then the mean
    expected = []
    for i in range(6):
        n = int(batch.cand_mask[i].sum())
        rewards = batch.rewards_raw[i, :n].tolist()
        best = rewards.index(max(rewards))
        seq = batch.sequences[i, best]
        logits, _ = model(batch.query_emb[i : i + 1], batch.cand_emb[i : i + 1], seq[None])
        ce = torch.nn.functional.cross_entropy(logits[0], seq, reduction="sum")
        expected.append(ce)
    assert out["loss"].item() == pytest.approx(torch.stack(expected).mean().item(), abs=1e-5)


@pytest.mark.parametrize("stop_at", [("warmup", 1, 2), ("warmup", 2, 1)])
def test_stop_inside_the_third_phase_resumes_exactly(demo_files, tmp_path, stop_at) -> None:
    settings = {"warmup_epochs": 2, "rce_epochs": 1, "grpo_epochs": 1, "grpo_lr": 1e-3}
    full = make_trainer(demo_files, tmp_path / "full", extra=WARMUP, enable=("warmup",), **settings)
    full.fit()

    class Stopper:
        @hookimpl
        def on_step_end(self, state) -> None:
            if (state.phase, state.epoch, state.step_in_epoch) == stop_at:
                interrupted.stop_requested = "test"

    out = tmp_path / "run"
    interrupted = make_trainer(
        demo_files,
        out,
        extra=(*WARMUP, ("stopper", Stopper())),
        enable=("warmup", "stopper"),
        **settings,
    )
    with pytest.raises(StopRequested):
        interrupted.fit()
    snapshot = torch.load(out / SNAPSHOT_NAME, weights_only=True)
    assert (snapshot["phase"], snapshot["epoch"], snapshot["step_in_epoch"]) == stop_at
    resumed = make_trainer(demo_files, out, extra=WARMUP, enable=("warmup",), **settings)
    resumed.fit(resume=snapshot)
    final, expected = weights(resumed), weights(full)
    for key, value in expected.items():
        assert torch.equal(final[key], value), key
    assert comparable(resumed.state.history) == comparable(full.state.history)


class EarlyStop:
    """Asks the run to stop at the end of RCE epoch 2."""

    def __init__(self) -> None:
        self.ended = 0

    @hookimpl
    def on_epoch_end(self, state, metrics) -> None:
        if (state.phase, state.epoch) == ("rce", 2):
            state.request_stop("validation stopped improving")

    @hookimpl
    def on_train_end(self, state) -> None:
        self.ended += 1


def test_a_plugin_can_end_the_run_after_the_epoch(demo_files, tmp_path) -> None:
    out = tmp_path / "run"
    stopper = EarlyStop()
    trainer = make_trainer(
        demo_files,
        out,
        extra=(("stopper", stopper),),
        enable=("stopper",),
        rce_epochs=4,
        grpo_epochs=2,
    )
    trainer.fit()
    assert [(h["phase"], h["epoch"]) for h in trainer.state.history] == [("rce", 1), ("rce", 2)]
    assert stopper.ended == 1  # on_train_end as for a normal finish
    assert "stopped early by stopper: validation stopped improving" in trainer.log_lines
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "best.safetensors",  # written at the end, as for a normal finish
        "rce_epoch01.safetensors",
        "rce_epoch02.safetensors",
    ]
    snapshot = torch.load(out / SNAPSHOT_NAME, weights_only=True)
    assert snapshot["stop_request"] == ["validation stopped improving", "stopper"]
    # resuming a run that a plugin ended trains nothing more
    resumed = make_trainer(demo_files, out, rce_epochs=4, grpo_epochs=2)
    resumed.fit(resume=snapshot)
    assert len(resumed.state.history) == 2


def test_train_rows_decides_what_an_epoch_visits(demo_files, tmp_path) -> None:
    visited: list[list[int]] = []

    class FirstHalfThenAll:
        @hookimpl
        def train_rows(self, state, phase, epoch, generator):
            n = len(state.train)
            rows = torch.randperm(n, generator=generator)
            return rows[rows < n // 2] if epoch == 1 else None

        @hookimpl
        def on_epoch_end(self, state, metrics) -> None:
            visited.append(
                [state.steps_per_epoch, int(trainer.epoch_progress["epoch_order"].max())]
            )

    trainer = make_trainer(
        demo_files,
        tmp_path / "run",
        extra=(("rows", FirstHalfThenAll()),),
        enable=("rows",),
        rce_epochs=2,
        batch_size=4,
    )
    trainer.fit()
    n = len(trainer.state.train)
    assert visited[0] == [-(-(n // 2) // 4), n // 2 - 1]
    assert visited[1] == [-(-n // 4), n - 1]


def test_train_rows_answer_out_of_range_names_the_plugin(demo_files, tmp_path) -> None:
    class Bad:
        @hookimpl
        def train_rows(self, state, phase, epoch, generator):
            return torch.tensor([0, 10_000])

    trainer = make_trainer(demo_files, tmp_path / "run", extra=(("bad", Bad()),), enable=("bad",))
    with pytest.raises(LeverError, match="plugin bad: hook train_rows must return"):
        trainer.fit()


def test_misspelt_hook_is_an_error_naming_plugin_and_nearest_hook() -> None:
    class Typo:
        @hookimpl
        def on_epoch_ends(self, state) -> None:
            pass

    with pytest.raises(
        PluginError,
        match=r"plugin typo: hook implementation 'on_epoch_ends' matches no hook "
        r"\(did you mean on_epoch_end\?\)",
    ):
        load_plugins(enable=["typo"], extra=[("typo", Typo())])


def test_hook_asking_for_an_argument_the_hook_does_not_pass_is_an_error() -> None:
    class WrongArg:
        @hookimpl
        def on_epoch_end(self, state, metric) -> None:
            pass

    with pytest.raises(
        PluginError,
        match=r"plugin wrong: hook on_epoch_end asks for argument 'metric', which the hook "
        r"does not pass \(it passes: state, metrics\)",
    ):
        load_plugins(enable=["wrong"], extra=[("wrong", WrongArg())])


def test_two_plugins_contributing_one_phase_name_both(demo_files, tmp_path) -> None:
    class SameName:
        @hookimpl
        def phases(self):
            return [best_sequence_phase.BestSequencePhase()]

    with pytest.raises(
        PluginError, match=r"plugins (warmup|b) and (warmup|b) both contribute phase 'warmup'"
    ):
        make_trainer(
            demo_files,
            tmp_path / "run",
            extra=(*WARMUP, ("b", SameName())),
            enable=("warmup", "b"),
        )


def test_two_plugins_declaring_one_option_are_refused() -> None:
    class Clash:
        @hookimpl
        def add_options(self):
            from lever_trainer.api import Option

            return [Option(("--warmup-epochs",), "int", 3)]

    with pytest.raises(PluginError, match="--warmup-epochs, which plugin warmup also declares"):
        load_plugins(enable=["warmup", "zclash"], extra=[*WARMUP, ("zclash", Clash())])


def test_phase_decisions_are_logged_with_the_deciding_plugin(demo_files, tmp_path) -> None:
    trainer = make_trainer(demo_files, tmp_path / "run", rce_epochs=0, grpo_epochs=1)
    trainer.fit()
    assert "grpo: select_candidates [grpo-curriculum, default]" in trainer.log_lines
    assert "grpo: compute_advantages [group-zscore, default]" in trainer.log_lines
    assert "grpo: adapt_kl_beta [adaptive-kl, default]" in trainer.log_lines


def test_without_an_advantage_plugin_grpo_stops_with_a_clear_error(demo_files, tmp_path) -> None:
    trainer = make_trainer(
        demo_files, tmp_path / "run", disable=("group-zscore",), rce_epochs=0, grpo_epochs=1
    )
    with pytest.raises(LeverError, match="no active plugin answers hook compute_advantages"):
        trainer.fit()


def test_every_epoch_metric_key_is_documented(demo_files, tmp_path) -> None:
    from lever_trainer import hookspecs

    doc = hookspecs.on_epoch_end.__doc__ or ""
    trainer = make_trainer(demo_files, tmp_path / "run", grpo_epochs=1)
    trainer.fit()
    keys = {k for h in trainer.state.history for k in h if k not in ("phase", "epoch")}
    assert "train_kl" in keys and "kl_beta" in keys and "train_tau" in keys
    for key in keys:
        assert f"``{key}``" in doc, f"on_epoch_end does not document {key}"


# ----------------------------------------------------------------- options through the CLI
def train_args(files: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    return [
        "--beam-data",
        str(files[0]),
        "--img-emb",
        str(files[1]),
        "--output-dir",
        str(out),
        "--policy",
        "pointer",
        "--hidden-dim",
        "16",
        "--rce-epochs",
        "1",
        "--no-cache",
        *extra,
    ]


def test_plugin_options_are_grouped_by_plugin_in_help(cli) -> None:
    result = cli("train", "--help")
    assert result.exit_code == 0, result.output
    text = result.output
    for section, flag in (
        ("Plugin rce:", "--rce-epochs"),
        ("Plugin grpo:", "--kl-beta"),
        ("Plugin grpo-curriculum:", "--early-top-k"),
        ("Plugin reward-modes:", "--reward-alpha"),
        ("Plugin normalizers:", "--normalize-clamp-value"),
        ("Plugin pointer-mmr:", "--mmr-reduction"),
    ):
        assert section in text, section
        after = text[text.index(section) :]
        assert flag in after.split("\n\n")[0], (section, flag)


def test_plugin_options_reach_run_config_and_checkpoints(cli, demo_files, tmp_path) -> None:
    out = tmp_path / "run"
    result = cli(*train_args(demo_files, out, "--rce-temp-start", "1.5", "--early-top-k", "2"))
    assert result.exit_code == 0, result.output
    config = json.loads((out / "run_config.json").read_text())
    assert config["options"]["rce_temp_start"] == 1.5
    assert config["plugin_options"]["rce"]["rce_temp_start"] == 1.5
    assert config["plugin_options"]["grpo-curriculum"]["early_top_k"] == 2
    assert config["given"]["rce_temp_start"] == "--rce-temp-start"
    meta = read_metadata(out / "rce_epoch01.safetensors")
    assert meta["options"]["rce_temp_start"] == 1.5
    assert meta["policy"]["name"] == "pointer" and meta["policy"]["options"]["hidden_dim"] == 16


def test_option_of_an_inactive_plugin_is_refused(cli, demo_files, tmp_path) -> None:
    out = tmp_path / "run"
    result = cli(
        *train_args(demo_files, out, "--no-plugin", "grpo-curriculum", "--early-top-k", "2")
    )
    assert_user_error(result, "--early-top-k", "plugin grpo-curriculum", "--plugin grpo-curriculum")
    assert not out.exists()


def test_plugin_numeric_option_out_of_range_is_refused(cli, demo_files, tmp_path) -> None:
    out = tmp_path / "run"
    result = cli(*train_args(demo_files, out, "--rce-lr", "nan"))
    assert_user_error(result, "--rce-lr")
    assert not out.exists()

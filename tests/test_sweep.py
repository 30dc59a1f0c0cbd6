"""What an adversarial sweep of the newer surfaces found: damaged run folders for ``plot``,
a misspelt ``LEVER_TRAIN_*`` variable, ``evaluate --baselines start`` without a
checkpoint, and a plugin that fails while it is given a step."""

from __future__ import annotations

import json
from pathlib import Path

import lever_digits_env
import pytest
import torch
from conftest import assert_user_error, write_json
from test_trainer import make_trainer

from lever_trainer import hookimpl
from lever_trainer.errors import LeverError, PluginError
from lever_trainer.plot import read_run
from lever_trainer.trainer import SNAPSHOT_NAME

FILES = lever_digits_env.files()


# ------------------------------------------------------------------ plot
def write_run(path: Path, metrics: str, steps: str | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text(metrics)
    if steps is not None:
        (path / "steps.jsonl").write_text(steps)
    return path


START = '{"phase": "start", "epoch": 0, "val_loss": 2.0}\n'
EPOCH = '{"phase": "rce", "epoch": 1, "val_loss": 1.5}\n'
STEP = '{"phase": "rce", "epoch": 1, "step": 1, "steps_per_epoch": 2, "loss": 3.0}\n'


def test_plot_skips_a_torn_last_line_and_says_so(cli, tmp_path) -> None:
    """A killed run leaves its last line cut (no newline): skipped, with a note."""
    run = write_run(tmp_path / "run", START + EPOCH, STEP + STEP[:25])
    curves = read_run(run)
    assert len(curves.steps) == 1 and len(curves.epochs) == 2
    assert len(curves.notes) == 1 and "steps.jsonl: skipped its last line 2" in curves.notes[0]
    pytest.importorskip("matplotlib")
    result = cli("plot", str(run))
    assert result.exit_code == 0, result.output
    assert "note:" in result.output and "cut short" in result.output
    assert (run / "curves.png").stat().st_size > 0


def test_plot_still_refuses_a_complete_line_that_is_not_json(tmp_path) -> None:
    run = write_run(tmp_path / "run", START + "not json\n" + EPOCH)
    with pytest.raises(LeverError, match=r"metrics\.jsonl: line 2 is not JSON"):
        read_run(run)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"phase": "rce", "epoch": 1e308}\n', "line 2: epoch is 1e+308, expected a whole number"),
        ('{"phase": "rce", "epoch": -1}\n', "line 2: epoch is -1"),
        ('{"phase": "rce", "epoch": 1.5}\n', "line 2: epoch is 1.5"),
        ('{"phase": "rce", "epoch": "two"}\n', "line 2: epoch is 'two'"),
        ('{"phase": "rce", "epoch": true}\n', "line 2: epoch is True"),
    ],
)
def test_plot_refuses_an_epoch_that_is_not_a_count(cli, tmp_path, line, message) -> None:
    run = write_run(tmp_path / "run", START + line)
    assert_user_error(cli("plot", str(run)), "metrics.jsonl", message)


def test_plot_draws_runs_with_absurd_values(cli, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    metrics = (
        '{"phase": "start", "epoch": 0, "val_loss": 1e308}\n'
        '{"phase": "rce", "epoch": 1, "val_loss": -1e308, "kl": 5e-324}\n'
        '{"phase": "rce", "epoch": 2, "val_loss": 1e400000, "kl_beta": 1' + "0" * 400 + "}\n"
    )
    run = write_run(tmp_path / "run", metrics, STEP.replace("3.0", "1e308"))
    result = cli("plot", str(run), "-o", str(tmp_path / "c.svg"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c.svg").stat().st_size > 0


# ------------------------------------------------------------------ environment
def test_an_unknown_lever_train_variable_is_refused(cli, demo_files, tmp_path, monkeypatch):
    monkeypatch.setenv("LEVER_TRAIN_RCE_LRR", "1e-3")
    data, emb = demo_files
    result = cli("--beam-data", data, "--img-emb", emb, "--output-dir", tmp_path / "run")
    assert_user_error(
        result, "environment variable LEVER_TRAIN_RCE_LRR", "did you mean LEVER_TRAIN_RCE_LR?"
    )
    assert not (tmp_path / "run").exists()


def test_known_lever_train_variables_still_apply(cli, demo_files, tmp_path, monkeypatch):
    monkeypatch.setenv("LEVER_TRAIN_RCE_LR", "0.003")
    data, emb = demo_files
    result = cli("--beam-data", data, "--img-emb", emb, "--print-config")
    assert result.exit_code == 0, result.output
    assert "rce_lr = 0.003" in result.output.replace("rce-lr", "rce_lr")


# ------------------------------------------------------------------ evaluate
def test_evaluate_start_baseline_without_a_checkpoint_is_refused(cli, tmp_path) -> None:
    doc = json.loads(Path(FILES["test"]).read_text())
    keys = [k for k in doc if k.isdigit()][:4]
    queries = write_json(tmp_path / "q.json", {k: doc[k] for k in keys})
    args = ["evaluate", "--queries", queries, "--img-emb", FILES["embeddings"]]
    result = cli(*args, "--judge", "digits", "--no-store", "--baselines", "start")
    assert_user_error(result, "--baselines start", "give a checkpoint")
    # the default baselines (which name start) still measure what they can
    result = cli(*args, "--judge", "digits", "--no-store", "--baselines", "cosine")
    assert result.exit_code == 0 and "cosine" in result.output, result.output


# ------------------------------------------------------------------ a failing tracker
class Tracker:
    """Logs every step it is given; fails once, at one global step, when told to."""

    def __init__(self, fail_at: int | None) -> None:
        self.fail_at, self.logged = fail_at, []

    @hookimpl
    def on_step_end(self, state) -> None:
        if state.global_step == self.fail_at:
            self.fail_at = None
            raise ConnectionError("tracking server unreachable")
        self.logged.append((state.global_step, state.last_step["loss"]))


def test_a_step_a_plugin_failed_to_take_is_given_to_it_after_resume(demo_files, tmp_path):
    """The tracker fails at step 7: the resumed run logs step 7 (its values as they were)
    before step 8, so its record has no hole, and steps.jsonl has every step once."""
    settings = {"rce_epochs": 2, "grpo_epochs": 0, "batch_size": 8, "log_every": 1}
    full_tracker = Tracker(None)
    full = make_trainer(
        demo_files, tmp_path / "full", extra=(("tracker", full_tracker),), enable=("tracker",),
        **settings,
    )  # fmt: skip
    full.fit()
    out = tmp_path / "run"
    tracker = Tracker(7)
    broken = make_trainer(
        demo_files, out, extra=(("tracker", tracker),), enable=("tracker",), **settings
    )
    with pytest.raises(PluginError, match="plugin tracker failed in hook on_step_end"):
        broken.fit()
    snapshot = torch.load(out / SNAPSHOT_NAME, weights_only=True)
    # the tracker and whichever plugins come after it in the call order
    assert snapshot["global_step"] == 7 and snapshot["pending_step_end"][0] == "tracker"
    resumed = make_trainer(
        demo_files, out, extra=(("tracker", tracker),), enable=("tracker",), **settings
    )
    resumed.fit(resume=snapshot)
    assert tracker.logged == full_tracker.logged
    lines = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    assert [x["global_step"] for x in lines] == list(range(1, len(full_tracker.logged) + 1))
    # a tampered record of them is one line, not a traceback on resume
    from lever_trainer import snapshot as snapshots

    for key, value in (("pending_step_end", 5), ("pending_last_step", [1])):
        with pytest.raises(LeverError, match=key):
            snapshots.check({**snapshot, key: value}, out / SNAPSHOT_NAME)

"""The researcher's workbench: step logs, epoch 0, progress and summary, plots, help and
completion without torch, help texts, the demo command, checkpoint names."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import click
import pytest
from conftest import assert_user_error

from lever_trainer.checkpoint import checkpoint_name, read_metadata
from lever_trainer.fileio import json_line
from lever_trainer.losses import rce_temperature
from lever_trainer_plugins import console_log, steps_jsonl

ROOT = Path(__file__).resolve().parents[1]


def run_args(files: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    return [
        "--beam-data",
        str(files[0]),
        "--img-emb",
        str(files[1]),
        "--output-dir",
        str(out),
        "--batch-size",
        "8",
        "--hidden-dim",
        "16",
        "--rce-epochs",
        "2",
        "--grpo-epochs",
        "1",
        *extra,
    ]


def strict_jsonl(path: Path) -> list[dict]:
    """Lines of a JSONL file, refusing NaN and infinities (not JSON)."""

    def refuse(name: str) -> None:
        raise AssertionError(f"{path}: {name} is not JSON")

    return [json.loads(ln, parse_constant=refuse) for ln in path.read_text().splitlines()]


# ------------------------------------------------------------------ logs
def test_steps_jsonl_has_every_logged_step(cli, demo_files, tmp_path) -> None:
    out = tmp_path / "run"
    result = cli(
        *run_args(
            demo_files, out, "--log-every", "3", "--rce-temp-start", "2", "--rce-temp-end", "0.5"
        )
    )
    assert result.exit_code == 0, result.output
    steps = strict_jsonl(out / "steps.jsonl")
    # 40 queries, 20 % validation: 32 training queries, batches of 8 -> 4 steps an epoch,
    # 12 in all; logged every 3rd global step and at each epoch's last step (4, 8, 12)
    assert [s["global_step"] for s in steps] == [3, 4, 6, 8, 9, 12]
    assert [(s["phase"], s["epoch"], s["step"]) for s in steps] == [
        ("rce", 1, 3),
        ("rce", 1, 4),
        ("rce", 2, 2),
        ("rce", 2, 4),
        ("grpo", 1, 1),
        ("grpo", 1, 4),
    ]
    for s in steps:
        assert {"loss", "grad_norm", "time", "steps_per_epoch"} <= set(s)
        assert s["steps_per_epoch"] == 4
    # RCE's temperature at optimiser step i of T = 8 (docs/algorithm.md#rce-temperature): 2.0 - 1.5 * i / 7
    for s in steps[:4]:
        i = s["global_step"] - 1
        assert s["tau"] == pytest.approx(2.0 - 1.5 * i / 7, rel=1e-6)
        assert s["tau"] == pytest.approx(rce_temperature(i, 8, 2.0, 0.5), rel=1e-6)
    assert {"ppo", "kl", "mean_ratio", "kept"} <= set(steps[-1])


def test_metrics_jsonl_starts_with_the_start_validation(cli, demo_files, tmp_path) -> None:
    out = tmp_path / "run"
    result = cli(*run_args(demo_files, out))
    assert result.exit_code == 0, result.output
    entries = strict_jsonl(out / "metrics.jsonl")
    start = entries[0]
    assert (start["phase"], start["epoch"]) == ("start", 0)
    line = next(ln for ln in result.output.splitlines() if ln.startswith("start: "))
    shown = dict(re.findall(r"(\S+) (-?\d+\.\d{4})", line))
    for key, text in shown.items():
        assert f"{start[key]:.4f}" == text, key
    assert "train_loss" not in start


def test_json_lines_write_null_for_nan() -> None:
    line = json_line({"loss": math.nan, "kl": math.inf, "ok": 1.5, "nested": [math.nan]})
    assert json.loads(line) == {"loss": None, "kl": None, "ok": 1.5, "nested": [None]}


def test_steps_jsonl_is_cut_back_to_the_snapshot_on_resume(tmp_path) -> None:
    state = SimpleNamespace(
        output_dir=tmp_path,
        options={"log_every": 1},
        extra={},
        global_step=0,
        phase="rce",
        epoch=1,
        step_in_epoch=0,
        steps_per_epoch=10,
        last_step={"loss": 1.0},
    )
    steps_jsonl.on_train_start(state)
    for n in range(1, 4):
        state.global_step = state.step_in_epoch = n
        steps_jsonl.on_step_end(state)
    saved = steps_jsonl.plugin_state_dict(state)  # the snapshot after step 3
    for n in range(4, 6):
        state.global_step = state.step_in_epoch = n
        steps_jsonl.on_step_end(state)
    assert len((tmp_path / "steps.jsonl").read_text().splitlines()) == 5
    # a resumed process: a new state, the plugin state of the snapshot, then step 4 again
    state.extra = {}
    steps_jsonl.on_train_start(state)
    steps_jsonl.load_plugin_state(state, saved)
    steps_jsonl.on_phase_start(state)
    state.global_step = state.step_in_epoch = 4
    steps_jsonl.on_step_end(state)
    logged = [json.loads(ln)["global_step"] for ln in (tmp_path / "steps.jsonl").open()]
    assert logged == [1, 2, 3, 4]
    # a new (not resumed) run starts the file afresh
    state.extra = {}
    steps_jsonl.on_train_start(state)
    steps_jsonl.on_phase_start(state)
    assert (tmp_path / "steps.jsonl").read_text() == ""


def test_start_validation_reaches_plugins_before_the_first_phase(demo_files, tmp_path) -> None:
    from test_trainer import make_trainer

    from lever_trainer import hookimpl

    seen: list[tuple[str, object, dict]] = []

    class Probe:
        @hookimpl
        def on_start_validation(self, state, metrics):
            seen.append(("start", state.phase, dict(metrics)))

        @hookimpl
        def on_epoch_end(self, state, metrics):
            seen.append(("epoch", state.phase, dict(metrics)))

    trainer = make_trainer(
        demo_files, tmp_path, enable=("probe",), extra=(("probe", Probe()),), rce_epochs=1
    )
    state = trainer.fit()
    assert [(kind, phase) for kind, phase, _ in seen] == [("start", None), ("epoch", "rce")]
    assert seen[0][2] == state.start_metrics
    assert {"val_loss", "policy_reward@1", "random_reward"} <= set(seen[0][2])


# ------------------------------------------------------------------ console
def test_log_file_progress_lines_and_the_summary(cli, demo_files, tmp_path) -> None:
    out = tmp_path / "run"
    result = cli(*run_args(demo_files, out, "--progress-every", "2"))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    progress = [ln for ln in lines if re.match(r"\w+ epoch \d+/\d+ step \d+/\d+: loss", ln)]
    # every 2 steps of each phase: RCE steps 2, 4, 6, 8 (of 8), GRPO 2, 4 (of 4)
    assert [ln.split(":")[0] for ln in progress] == [
        "rce epoch 1/2 step 2/4",
        "rce epoch 1/2 step 4/4",
        "rce epoch 2/2 step 2/4",
        "rce epoch 2/2 step 4/4",
        "grpo epoch 1/1 step 2/4",
        "grpo epoch 1/1 step 4/4",
    ]
    assert "phase 25% (2/8), ETA" in progress[0] and "steps/s" in progress[0]
    entries = strict_jsonl(out / "metrics.jsonl")
    epochs = entries[1:]
    best = max(epochs, key=lambda e: e["policy_reward@1"])  # first of equals, like max()
    # the head names the candidate checkpoint selection chose: best.safetensors
    meta = read_metadata(out / "best.safetensors")
    label = "start" if meta["phase"] == "start" else f"{meta['phase']} epoch {meta['epoch']}"
    chosen = (
        entries[0]
        if meta["phase"] == "start"
        else next(e for e in epochs if (e["phase"], e["epoch"]) == (meta["phase"], meta["epoch"]))
    )
    head = next(i for i, ln in enumerate(lines) if ln.startswith("summary"))
    assert lines[head].endswith(
        f"best.safetensors: {label} by policy_reward@1 {chosen['policy_reward@1']:.4f}"
    )
    row = lines[head + 2].split()
    assert row[0] == "policy_reward@1"
    start, final = entries[0]["policy_reward@1"], epochs[-1]["policy_reward@1"]
    assert row[1:] == [
        f"{start:.4f}",
        "->",
        f"{best['policy_reward@1']:.4f}",
        f"({best['phase']}",
        f"{best['epoch']})",
        "->",
        f"{final:.4f}",
    ]
    low = min(epochs, key=lambda e: e["val_loss"])
    assert lines[head + 1].split()[4:6] == [f"({low['phase']}", f"{low['epoch']})"]


def test_summary_uses_best_metric_and_lists_judge_metrics() -> None:
    history = [
        {
            "phase": "rce",
            "epoch": 1,
            "val_loss": 2.0,
            "policy_reward@1": 0.5,
            "judge_x@greedy": 0.1,
        },
        {
            "phase": "rce",
            "epoch": 2,
            "val_loss": 1.0,
            "policy_reward@1": 0.4,
            "judge_x@greedy": 0.3,
        },
    ]
    lines = console_log.summary_lines({"val_loss": 3.0}, history, "val_loss", "min")
    assert lines[0].endswith("best epoch: rce 2 by val_loss 1.0000")
    judge = next(ln for ln in lines if "judge_x@greedy" in ln)
    assert judge.split()[1:] == ["-", "->", "0.3000", "(rce", "2)", "->", "0.3000"]
    assert console_log.summary_lines({}, [], None, "max") == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [("30s", (30.0, None)), ("2m", (120.0, None)), ("0.5s", (0.5, None)), ("100", (None, 100))],
)
def test_progress_every_forms(text, expected) -> None:
    assert console_log.parse_every(text) == expected


def test_bad_progress_every_is_an_error(cli, demo_files, tmp_path) -> None:
    result = cli(*run_args(demo_files, tmp_path / "run", "--progress-every", "soon"))
    assert_user_error(result, "--progress-every", "'soon'")


# ------------------------------------------------------------------ plot
def test_plot_one_run_and_two_overlaid(cli, demo_files, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    for name, seed in (("a", "1"), ("b", "2")):
        result = cli(*run_args(demo_files, tmp_path / name, "--seed", seed))
        assert result.exit_code == 0, result.output
    result = cli("plot", str(tmp_path / "a"))
    assert result.exit_code == 0, result.output
    picture = (tmp_path / "a" / "curves.png").read_bytes()
    assert picture[:8] == b"\x89PNG\r\n\x1a\n" and len(picture) > 20_000
    # run b has downstream metrics (a judge's), as validation will add them
    metrics = tmp_path / "b" / "metrics.jsonl"
    entries = [json.loads(ln) for ln in metrics.read_text().splitlines()]
    for i, e in enumerate(entries):
        e.update({"judge_correct@greedy": 0.1 * i, "judge_reward@greedy": 0.2 * i})
    metrics.write_text("".join(json.dumps(e) + "\n" for e in entries))
    both = tmp_path / "both.svg"
    result = cli("plot", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(both))
    assert result.exit_code == 0, result.output
    svg = both.read_text()
    for text in (
        "training loss",
        "validation loss",
        "KL and its weight",
        "policy_reward@1",
        "downstream metrics",
        "judge_correct@greedy",
        "judge_reward@greedy",
    ):
        assert text in svg, text
    alone = tmp_path / "a.svg"
    assert cli("plot", str(tmp_path / "a"), "-o", str(alone)).exit_code == 0
    assert "no downstream metrics" in alone.read_text()


def test_plot_reads_runs_for_its_curves(cli, demo_files, tmp_path) -> None:
    from lever_trainer.plot import read_run, run_names

    out = tmp_path / "run"
    assert cli(*run_args(demo_files, out, "--log-every", "1")).exit_code == 0
    run = read_run(out)
    assert run.offsets == {"rce": 0, "grpo": 2}
    xs, _ = run.series("val_loss")
    assert xs == [0.0, 1.0, 2.0, 3.0]  # start, rce 1, rce 2, grpo 1
    xs, _ = run.step_series("loss", "grpo")
    assert xs == [2.25, 2.5, 2.75, 3.0]  # GRPO's four steps inside epoch 3
    assert run_names([Path("x/a/run"), Path("y/b/run")]) == ["a/run", "b/run"]


def test_plot_errors(cli, tmp_path, monkeypatch) -> None:
    result = cli("plot", str(tmp_path))
    assert_user_error(result, str(tmp_path), "no metrics.jsonl")
    (tmp_path / "metrics.jsonl").write_text('{"phase": "start", "epoch": 0}\nnot json\n')
    assert_user_error(cli("plot", str(tmp_path)), "metrics.jsonl: line 2 is not JSON")
    (tmp_path / "metrics.jsonl").write_text('{"phase": "start", "epoch": 0}\n')
    result = cli("plot", str(tmp_path), "--output", str(tmp_path / "x.gif"))
    assert_user_error(result, "--output", "x.gif", ".png")
    result = cli("plot", str(tmp_path), str(tmp_path))
    assert_user_error(result, "--output", "several runs")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    result = cli("plot", str(tmp_path))
    assert_user_error(result, "needs matplotlib", "pip install 'lever-trainer[plot]'")


# ------------------------------------------------------------------ command line
def imported_modules(*args: str, env: dict[str, str] | None = None) -> tuple[str, set[str]]:
    """Output of ``lever-train ARGS`` in a fresh process, and the modules it imported."""
    code = (
        "import sys\nfrom lever_trainer.cli import main\n"
        "try:\n    main(prog_name='lever-train')\nexcept SystemExit:\n    pass\n"
        "sys.stderr.write('\\nMODULES ' + ' '.join(sorted(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    modules = set(done.stderr.rsplit("MODULES ", 1)[-1].split())
    return done.stdout, modules


def test_group_help_lists_commands_without_importing_torch_or_plugins() -> None:
    out, modules = imported_modules("--help")
    assert "torch" not in modules and not any(
        m.startswith("lever_trainer_plugins") for m in modules
    )
    for command in ("train", "plot", "plugins", "demo-data", "select", "prepare"):
        assert re.search(rf"^\s+{command}\s+\S", out, re.M), command


def test_group_help_names_no_policy_architecture() -> None:
    """Policies are plugins (the default is ``cosine-bilinear``): ``--help`` says what is
    trained without naming one architecture as the thing it trains."""
    from click.testing import CliRunner

    from lever_trainer.cli import main

    out = CliRunner().invoke(main, ["--help"]).output
    summary = out.split("Options:")[0].lower()
    assert "selection policy" in summary
    for policy in ("pointer", "cosine-bilinear"):
        assert policy not in summary, (policy, summary)


def test_completion_without_torch_uses_the_plugin_option_cache(tmp_path) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "_LEVER_TRAIN_COMPLETE": "bash_complete"}
    words = {"COMP_WORDS": "lever-train pl", "COMP_CWORD": "1"}
    out, modules = imported_modules(env={**env, **words})
    assert "torch" not in modules
    assert {"plain,plot", "plain,plugins"} <= set(out.split())
    option = {"COMP_WORDS": "lever-train train --rce-e", "COMP_CWORD": "2"}
    out, modules = imported_modules(env={**env, **option})
    assert "torch" not in modules and out.split() == []  # no cache yet: core options only
    out, _ = imported_modules(
        env={**env, **{"COMP_WORDS": "lever-train train --prese", "COMP_CWORD": "2"}}
    )
    assert out.split() == ["plain,--preset"]
    imported_modules("plugins", env={"XDG_CACHE_HOME": env["XDG_CACHE_HOME"]})  # writes it
    out, modules = imported_modules(env={**env, **option})
    assert "torch" not in modules
    assert out.split() == ["plain,--rce-epochs"]
    preset = {"COMP_WORDS": "lever-train train --preset up", "COMP_CWORD": "3"}
    out, _ = imported_modules(env={**env, **preset})
    assert out.split() == ["plain,upstream"]


def test_every_training_option_has_help_text() -> None:
    from lever_trainer.cli import main

    with click.Context(main) as ctx:
        for name in main.list_commands(ctx):
            command = main.get_command(ctx, name)
            assert command is not None and command.help, name
            for param in command.params:
                if isinstance(param, click.Option) and not param.hidden:
                    assert param.help and len(param.help) > 8, (name, param.opts)


def test_demo_data_prints_the_readme_command(cli, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = cli("demo-data", "demo", "--queries", "20", "--pool", "8", "--dim", "8")
    assert result.exit_code == 0, result.output
    printed = next(ln for ln in result.output.splitlines() if ln.startswith("train with: "))
    command = printed.removeprefix("train with: ")
    readme = (ROOT / "README.md").read_text()
    assert f"lever-train demo-data demo && {command}\n" in readme


def test_checkpoint_names_sort_in_epoch_order() -> None:
    assert checkpoint_name("rce", 1, 5) == "rce_epoch01.safetensors"
    assert checkpoint_name("grpo", 3) == "grpo_epoch03.safetensors"
    assert checkpoint_name("rce", 7, 120) == "rce_epoch007.safetensors"
    names = [checkpoint_name("rce", n, 12) for n in range(1, 13)]
    assert sorted(names) == names

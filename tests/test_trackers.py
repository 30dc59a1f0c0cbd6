"""The tracker plugins against their real libraries (``tox -e trackers`` installs them).

Each test trains a tiny run through the CLI with one tracker, then reads what the
library stored with that library's own reader (TensorBoard's event accumulator, an
MLflow client, the records of a W&B offline run) and compares it with the run's
``steps.jsonl`` and ``metrics.jsonl``. Without the library the test is skipped; the
tests of the missing-library error and of metric names need no library.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import pytest

from lever_trainer_plugins.tracker_mlflow import metric_name

pytestmark = pytest.mark.trackers


def train(cli, files: tuple[Path, Path], out: Path, *extra: str):
    result = cli(
        "--beam-data",
        files[0],
        "--img-emb",
        files[1],
        "--output-dir",
        out,
        "--batch-size",
        "8",
        "--hidden-dim",
        "16",
        "--rce-epochs",
        "2",
        "--grpo-epochs",
        "1",
        "--log-every",
        "3",
        *extra,
    )
    assert result.exit_code == 0, result.output
    return result


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected(out: Path) -> tuple[dict[str, list[tuple[int, float]]], list[dict]]:
    """What the run logged: step series ``{phase/key: [(global_step, value)]}`` and the
    epoch entries (start first) with the global step each was logged at."""
    steps = jsonl(out / "steps.jsonl")
    series: dict[str, list[tuple[int, float]]] = {}
    for s in steps:
        for key in ("loss", "grad_norm", "kl", "tau"):
            if key in s:
                series.setdefault(f"{s['phase']}/{key}", []).append((s["global_step"], s[key]))
    epochs = jsonl(out / "metrics.jsonl")
    # the epoch entries are logged at the global step of their epoch's last step
    ends = {(s["phase"], s["epoch"]): s["global_step"] for s in steps}
    for e in epochs:
        e["at"] = 0 if e["phase"] == "start" else ends[(e["phase"], e["epoch"])]
    return series, epochs


def test_mlflow_metric_names_are_made_valid() -> None:
    assert metric_name("epoch/policy_reward@1") == "epoch/policy_reward_at_1"
    assert metric_name("judge_correct@greedy") == "judge_correct_at_greedy"
    assert metric_name("grpo/kl") == "grpo/kl"
    assert metric_name("a:b(c)") == "a_b_c_"


@pytest.mark.parametrize(
    ("plugin", "library"),
    [("tensorboard", "tensorboard"), ("mlflow", "mlflow"), ("wandb", "wandb")],
)
def test_missing_library_is_one_error_naming_the_extra(
    cli, demo_files, tmp_path, monkeypatch, plugin, library
) -> None:
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == library else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    result = cli(
        "--beam-data",
        demo_files[0],
        "--img-emb",
        demo_files[1],
        "--output-dir",
        tmp_path / "run",
        "--rce-epochs",
        "1",
        "--plugin",
        plugin,
    )
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert f"pip install 'lever-trainer[{plugin}]'" in errors[0]
    assert not list((tmp_path / "run").glob("*.safetensors"))


def test_tensorboard_event_files_hold_the_run(cli, demo_files, tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(cli, demo_files, out, "--plugin", "tensorboard")
    series, epochs = expected(out)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    for tag, points in series.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), tag
    for key in ("val_loss", "policy_reward@1", "random_reward", "oracle_reward"):
        got = [(e.step, e.value) for e in acc.Scalars(f"epoch/{key}")]
        assert got == [(e["at"], pytest.approx(e[key], rel=1e-6)) for e in epochs], key
    kl_beta = acc.Scalars("epoch/kl_beta")
    assert [e.step for e in kl_beta] == [epochs[-1]["at"]]
    assert "options/text_summary" in acc.Tags()["tensors"]


def test_tensorboard_gets_the_step_it_failed_to_log_after_resume(
    cli, demo_files, tmp_path, monkeypatch
) -> None:
    """The writer fails at global step 6; after ``--resume`` the event files hold every
    logged step once, the failed one included, as in the run's steps.jsonl."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lever_trainer_plugins.tracker_tensorboard import TensorBoardSession

    real = TensorBoardSession.log
    failed: list[int] = []

    def flaky(self, values, step):
        if step == 6 and not failed and any(k.endswith("/loss") for k in values):
            failed.append(step)
            raise ConnectionError("event file on a lost mount")
        return real(self, values, step)

    monkeypatch.setattr(TensorBoardSession, "log", flaky)
    out = tmp_path / "run"
    args = ("--batch-size", "8", "--hidden-dim", "16", "--rce-epochs", "2", "--grpo-epochs")
    args += ("1", "--log-every", "3", "--plugin", "tensorboard")
    result = cli("--beam-data", demo_files[0], "--img-emb", demo_files[1], "--output-dir", out, *args)  # fmt: skip
    assert result.exit_code == 2 and failed == [6], result.output
    result = cli("--resume", out)
    assert result.exit_code == 0, result.output
    series, _ = expected(out)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert 6 in [s for s, _ in series["rce/loss"]]
    for tag, points in series.items():
        assert [e.step for e in acc.Scalars(tag)] == [s for s, _ in points], tag


def test_mlflow_file_store_holds_the_run(cli, demo_files, tmp_path, monkeypatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    train(cli, demo_files, out, "--plugin", "mlflow", "--mlflow-experiment", "exp-a")
    series, epochs = expected(out)
    client = MlflowClient(tracking_uri=(out / "mlruns").absolute().as_uri())
    experiment = client.get_experiment_by_name("exp-a")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["rce_epochs"] == "2" and run.data.params["log_every"] == "3"
    for tag, points in series.items():
        history = client.get_metric_history(run.info.run_id, tag)
        got = sorted((m.step, m.value) for m in history)
        assert got == [(s, pytest.approx(v, rel=1e-9)) for s, v in points], tag
    for key in ("policy_reward@1", "val_loss", "normalized_gain"):
        history = client.get_metric_history(run.info.run_id, metric_name(f"epoch/{key}"))
        got = sorted((m.step, m.value) for m in history)
        assert got == [(e["at"], pytest.approx(e[key], rel=1e-9)) for e in epochs], key
    assert "epoch/policy_reward_at_1" in run.data.metrics


def wandb_records(path: Path):
    """The records of a W&B run file (a LevelDB-style log of protobuf records after a
    7-byte header), decoded with W&B's own protobuf schema."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        chunk = data[pos : pos + length]
        pos += length
        if kind == 0:
            continue
        if kind in (1, 2):
            pending = chunk
        else:
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_run_needs_no_account(cli, demo_files, tmp_path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_ENTITY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))  # no login
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train(cli, demo_files, out, "--plugin", "wandb")
    series, epochs = expected(out)
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    history: list[dict] = []
    config: dict[str, str] = {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(
                {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in record.history.item
                }
            )
        elif kind in ("run", "config"):  # the config comes with the run or after it
            items = record.run.config.update if kind == "run" else record.config.update
            config.update(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
            )
    assert config["rce_epochs"] == 2 and config["wandb_mode"] == "offline"
    assert "wandb" in config["plugins"]
    for tag, points in series.items():
        got = [(h["global_step"], h[tag]) for h in history if tag in h]
        assert got == [(s, pytest.approx(v, rel=1e-9)) for s, v in points], tag
    got = [
        (h["global_step"], h["epoch/policy_reward@1"])
        for h in history
        if "epoch/policy_reward@1" in h
    ]
    assert got == [(e["at"], pytest.approx(e["policy_reward@1"], rel=1e-9)) for e in epochs]

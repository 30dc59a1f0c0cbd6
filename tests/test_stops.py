"""Real processes: clean stops on signals, exact resume from the CLI, and kills at random moments."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lever_trainer.checkpoint import read_metadata

# GRPO runs 3 epochs so that a signal sent after "grpo epoch 1/" always lands mid-run
TRAIN = [
    "--rce-epochs",
    "3",
    "--grpo-epochs",
    "3",
    "--batch-size",
    "4",
    "--policy",
    "pointer",
    "--hidden-dim",
    "32",
    "--seed",
    "5",
    "--grpo-lr",
    "1e-3",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stops")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lever_trainer",
            "demo-data",
            str(root),
            "--queries",
            "120",
            "--pool",
            "16",
            "--dim",
            "16",
        ],
        check=True,
        capture_output=True,
    )
    return root / "rl_data.json", root / "embeddings.safetensors"


def start(data: tuple[Path, Path], out: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lever_trainer",
            "--beam-data",
            str(data[0]),
            "--img-emb",
            str(data[1]),
            "--output-dir",
            str(out),
            "--no-cache",
            *TRAIN,
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for_line(proc: subprocess.Popen[str], prefix: str) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(prefix):
            return
    raise AssertionError(
        f"never saw {prefix!r}; stderr: {proc.stderr.read() if proc.stderr else ''}"
    )


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "grpo_epoch03.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("full") / "run"
    proc = start(data, out)
    assert proc.wait(timeout=300) == 0, proc.stderr.read() if proc.stderr else ""
    return final_weights(out)


@pytest.mark.parametrize(
    ("sig", "after"), [(signal.SIGINT, "rce epoch 1/"), (signal.SIGTERM, "grpo epoch 1/")]
)
def test_signal_stops_cleanly_and_resume_is_exact(
    data, uninterrupted, tmp_path, sig, after
) -> None:
    out = tmp_path / "run"
    proc = start(data, out)
    wait_for_line(proc, after)
    time.sleep(0.05)  # land inside the next epoch
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert f"stopped by {signal.Signals(sig).name}" in err
    assert f"resume with: lever-train --resume {out}" in err
    assert "Traceback" not in err
    resumed = subprocess.run(
        [sys.executable, "-m", "lever_trainer", "--resume", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from phase" in resumed.stdout
    final = final_weights(out)
    for key, value in uninterrupted.items():
        assert torch.equal(final[key], value), key
    epochs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(e["phase"], e["epoch"]) for e in epochs] == [
        ("start", 0),
        ("rce", 1),
        ("rce", 2),
        ("rce", 3),
        ("grpo", 1),
        ("grpo", 2),
        ("grpo", 3),
    ]
    # steps.jsonl was cut back to the snapshot: every logged step once, in order
    logged = [json.loads(x)["global_step"] for x in (out / "steps.jsonl").read_text().splitlines()]
    assert logged == sorted(set(logged)) and len(logged) > 3


def test_same_seed_gives_bit_identical_weights(data, uninterrupted, tmp_path) -> None:
    proc = start(data, tmp_path / "again")
    assert proc.wait(timeout=300) == 0
    again = final_weights(tmp_path / "again")
    assert all(torch.equal(again[k], v) for k, v in uninterrupted.items())


def test_resume_needs_a_run_directory(cli, tmp_path) -> None:
    from conftest import assert_user_error

    assert_user_error(cli("--resume", tmp_path), "--resume", "run_config.json")


def test_sigkill_at_random_moments_never_leaves_a_torn_file(data, tmp_path) -> None:
    """Whatever a SIGKILL leaves behind is complete: every file loads."""
    trials = int(os.environ.get("LEVER_KILL_TRIALS", "6"))
    rng = random.Random(0)
    torn = []
    for trial in range(trials):
        out = tmp_path / f"kill{trial}"
        proc = start(data, out, "--keep-last", "2", "--best-metric", "policy_reward@1")
        time.sleep(rng.uniform(0.8, 4.0))
        proc.kill()
        proc.wait()
        for path in out.glob("*") if out.exists() else []:
            if path.name.startswith("."):
                continue  # a temporary file that was never renamed into place
            try:
                if path.suffix == ".safetensors":
                    load_file(str(path))
                    read_metadata(path)
                elif path.suffix == ".pt":
                    torch.load(path, weights_only=True)
                elif path.suffix == ".json":
                    json.loads(path.read_text())
                elif path.suffix == ".jsonl":
                    [json.loads(x) for x in path.read_text().splitlines()]
            except Exception as exc:  # pragma: no cover - this is the failure being tested
                torn.append(f"{path}: {exc}")
        if (out / "resume.pt").exists():  # and the run resumes from it
            resumed = subprocess.run(
                [sys.executable, "-m", "lever_trainer", "--resume", str(out)],
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert resumed.returncode == 0, resumed.stderr
    assert torn == []


def test_deterministic_flag_runs_and_repeats(data, tmp_path) -> None:
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        proc = start(data, out, "--deterministic")
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        outs.append(final_weights(out))
    assert all(torch.equal(outs[0][k], v) for k, v in outs[1].items())


def test_second_sigint_stops_at_once(data, tmp_path) -> None:
    out = tmp_path / "run"
    # slow steps (a wide model) so that the second signal lands inside the same step
    proc = start(data, out, "--hidden-dim", "2048", "--batch-size", "32")
    wait_for_line(proc, "rce epoch 1/")
    deadline = time.time() + 60
    while not (out / "resume.pt").exists() and time.time() < deadline:
        time.sleep(0.05)  # epoch 1's snapshot is written just after its line
    time.sleep(0.1)
    assert proc.stderr is not None
    proc.send_signal(signal.SIGINT)
    for line in proc.stderr:
        if "finishing the current step" in line:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted at once" in err and "Traceback" not in err
    assert torch.load(out / "resume.pt", weights_only=True)["epoch_closed"]  # epoch 1's snapshot

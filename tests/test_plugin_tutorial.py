"""The plugin tutorial (docs/plugins.md) works exactly as written.

The page's titled code blocks (```` ```python title="lever_epoch_log.py" ````) are the
whole tutorial package. This test writes them out as they are, installs the package
with pip (``--no-deps --no-build-isolation``: no network), and drives the commands of
the page's "Install and run it" section through ``python -m lever_trainer`` in
subprocesses, with the package on ``PYTHONPATH`` only there, so no other test sees it.
The numbers the run reports are checked against values worked out here from the data
and the tutorial's own formulas.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "plugins.md"
FILES = {"pyproject.toml", "lever_epoch_log.py", "lever_parity_judge.py"}
TIMEOUT = 180
pytestmark = pytest.mark.tutorial
BLOCK = re.compile(r'^```(\w+) title="([^"]+)"\n(.*?)^```$', re.M | re.S)


def tutorial_files() -> dict[str, str]:
    """``{file name: text}`` of the page's titled code blocks."""
    found: dict[str, str] = {}
    for match in BLOCK.finditer(PAGE.read_text()):
        name = match.group(2)
        assert name not in found, f"{PAGE}: two blocks titled {name}"
        found[name] = match.group(3)
    return found


def lever(args: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m lever_trainer ARGS`` with the tutorial package importable."""
    env = dict(os.environ)
    env.pop("LEVER_TRAINER_DISABLE_PLUGIN_AUTOLOAD", None)
    env["OMP_NUM_THREADS"] = "1"
    env["XDG_CACHE_HOME"] = str(cwd / "cache")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "-m", "lever_trainer", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.args}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tutorial package, written from the page and pip-installed into a folder."""
    pytest.importorskip("setuptools", reason="pip builds the tutorial with setuptools")
    root = tmp_path_factory.mktemp("tutorial")
    src = root / "lever-trainer-tutorial"
    src.mkdir()
    files = tutorial_files()
    assert set(files) == FILES, f"{PAGE}: titled blocks {sorted(files)}, expected {sorted(FILES)}"
    for name, text in files.items():
        (src / name).write_text(text)
    site = root / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation"]
    cmd += ["--no-index", "--no-input", "--disable-pip-version-check"]
    cmd += ["--target", str(site), str(src)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, f"pip failed:\n{result.stdout}\n{result.stderr}"
    return site


def demo_rows(path: Path) -> dict[int, list[dict[str, object]]]:
    """Each query's candidates that the loader keeps (the documented filters)."""
    data = json.loads(path.read_text())
    kept: dict[int, list[dict[str, object]]] = {}
    for key, query in data.items():
        if not key.lstrip("-").isdigit():
            continue
        rows = [
            c
            for c in query["pointer_candidates"]
            if not c.get("eval_failed") and c.get("vqa_eval_mode") not in ("error", "fallback")
        ]
        if rows:
            kept[int(key)] = rows
    return kept


def parity_verdict(query: int, sequence: list[int]) -> tuple[float, float]:
    """(correct, acc): the toy judge's rule, as the tutorial's text states it."""
    helps = [item % 2 == query % 2 for item in sequence]
    return float(helps[-1]), sum(helps) / len(helps)


def test_tutorial_blocks_are_the_whole_package() -> None:
    files = tutorial_files()
    assert set(files) == FILES
    project = files["pyproject.toml"]
    assert re.search(r'^version = "\d', project, re.M), "the tutorial's pyproject needs a version"
    for module in ("lever_epoch_log.py", "lever_parity_judge.py"):
        compile(files[module], module, "exec")  # complete, valid Python


def test_tutorial_plugins_install_list_and_train(installed: Path, tmp_path: Path) -> None:
    listing = ok(lever(["plugins"], installed, tmp_path)).splitlines()
    for name, state, option in (
        ("epoch-log", "off by default", "--epoch-log"),
        ("parity-judge", "on by default", "--parity-batch (64)"),
    ):
        head = next(i for i, line in enumerate(listing) if line.startswith(f"{name} "))
        assert "[lever-trainer-tutorial 0.1.0]" in listing[head] and state in listing[head]
        assert any(option in line for line in listing[head + 1 : head + 5]), listing[
            head : head + 5
        ]

    ok(
        lever(
            ["demo-data", "demo", "--queries", "40", "--pool", "8", "--dim", "8"],
            installed,
            tmp_path,
        )
    )
    data = ["--beam-data", "demo/rl_data.json", "--img-emb", "demo/embeddings.safetensors"]
    run = [*data, "--output-dir", "runs/tutorial", "--rce-epochs", "2", "--batch-size", "8"]
    run += ["--val-split", "last"]  # the validation queries below are the highest ids
    run += ["--plugin", "epoch-log", "--epoch-log", "epochs.jsonl", "--reward-mode", "acc_squared"]
    run += ["--judge", "parity", "--parity-batch", "7", "--no-store"]
    out = ok(lever(run, installed, tmp_path))
    assert "judge: environment parity 1 (plugin parity-judge)" in out

    metrics = [json.loads(line) for line in (tmp_path / "runs/tutorial/metrics.jsonl").open()]
    epochs = [json.loads(line) for line in (tmp_path / "epochs.jsonl").open()]
    assert [(e["phase"], e["epoch"]) for e in epochs] == [("rce", 1), ("rce", 2)]
    assert [e["reward"] for e in epochs] == [m["policy_reward@1"] for m in metrics[1:]]

    # acc_squared is the reward: random_reward is the validation queries' mean of their
    # groups' mean s**2 (the last 20 % of query ids in numeric order validate)
    rows = demo_rows(tmp_path / "demo/rl_data.json")
    ids = sorted(rows)
    val = ids[int(len(ids) * 0.8) :]
    expected_random = sum(
        sum(float(c.get("vqa_acc_score") or 0.0) ** 2 for c in rows[q]) / len(rows[q]) for q in val
    ) / len(val)
    assert metrics[0]["random_reward"] == pytest.approx(expected_random, abs=1e-5)

    # the judge saw the policy's own greedy pairs: select them with the last checkpoint
    # and score them with the tutorial's rule
    picks_args = ["select", "--ckpt", "runs/tutorial/rce_epoch02.safetensors", *data]
    ok(lever([*picks_args, "--output", "picks.json"], installed, tmp_path))
    picks = json.loads((tmp_path / "picks.json").read_text())
    verdicts = [parity_verdict(q, [int(i) for i in picks[str(q)]]) for q in val]
    correct = sum(v[0] for v in verdicts) / len(val)
    reward = sum(v[1] ** 2 for v in verdicts) / len(val)
    assert metrics[-1]["judge_correct@greedy"] == pytest.approx(correct, abs=1e-6)
    assert metrics[-1]["judge_reward@greedy"] == pytest.approx(reward, abs=1e-6)

    # the environment's own option reached it: no call larger than 7 sequences
    calls, largest = map(
        int, re.search(r"parity judge: (\d+) calls of at most (\d+)", out).groups()
    )
    assert 1 <= largest <= 7 and calls >= math.ceil(len(val) / 7), (calls, largest)


def test_tutorial_option_errors_are_one_line(installed: Path, tmp_path: Path) -> None:
    ok(
        lever(
            ["demo-data", "demo", "--queries", "20", "--pool", "8", "--dim", "8"],
            installed,
            tmp_path,
        )
    )
    data = ["--beam-data", "demo/rl_data.json", "--img-emb", "demo/embeddings.safetensors"]
    bad = lever([*data, "--output-dir", "r", "--parity-batch", "0"], installed, tmp_path)
    assert bad.returncode == 2 and "--parity-batch" in bad.stderr and "Traceback" not in bad.stderr
    inactive = lever([*data, "--output-dir", "r", "--epoch-log", "x.jsonl"], installed, tmp_path)
    assert inactive.returncode == 2 and "Traceback" not in inactive.stderr
    assert "add --plugin epoch-log" in inactive.stderr
    assert not (tmp_path / "r").exists()  # refused before anything was written

"""A real third-party plugin, installed with pip, changes a run only when enabled.

``tests/third_party_plugin`` is a separate distribution (``lever-trainer-rank-reward``,
its own ``pyproject.toml`` and ``lever_trainer`` entry point). When it is already
installed (the ``plugin`` tox environment installs it), it is used as is; otherwise it
is installed for real with ``pip install --target`` into a temporary directory that
the CLI subprocesses get on ``PYTHONPATH``. Nothing here adds the plugin to this
process's ``sys.path``, so other tests never see it.

Every check drives ``python -m lever_trainer`` in a subprocess, as a user would.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file, save_file

from lever_trainer.checkpoint import read_metadata
from lever_trainer.data import CACHE_SUFFIX

PLUGIN_SRC = Path(__file__).parent / "third_party_plugin"
DIST = "lever-trainer-rank-reward"
VERSION = "0.1.0"
MODULE = "lever_rank_reward"
PLUGIN = "rank-reward"
TRAIN_ARGS = ("--rce-epochs", "2", "--grpo-epochs", "0", "--batch-size", "8", "--seed", "1")
TIMEOUT = 120


@dataclass(frozen=True)
class Installed:
    """Where the plugin distribution lives: ``path`` goes on PYTHONPATH (None: already there)."""

    path: Path | None
    module_file: Path


def cli_env(pythonpath: Path | None) -> dict[str, str]:
    """The environment of a CLI subprocess: autoload on, ``pythonpath`` first, one thread."""
    env = dict(os.environ)
    env.pop("LEVER_TRAINER_DISABLE_PLUGIN_AUTOLOAD", None)
    env["OMP_NUM_THREADS"] = "1"  # runs go two at a time on small machines
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(pythonpath), env.get("PYTHONPATH", "")) if p
        )
    return env


def start(args: Sequence[str], pythonpath: Path | None, cwd: Path) -> subprocess.Popen[str]:
    """Start ``python -m lever_trainer ARGS``."""
    return subprocess.Popen(
        [sys.executable, "-m", "lever_trainer", *map(str, args)],
        cwd=cwd,
        env=cli_env(pythonpath),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    """Wait for a started CLI run."""
    out, err = proc.communicate(timeout=TIMEOUT)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def lever(
    args: Sequence[str], pythonpath: Path | None, cwd: Path
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m lever_trainer ARGS`` to completion."""
    return finish(start(args, pythonpath, cwd))


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """Assert exit 0; return stdout."""
    assert result.returncode == 0, f"{result.args}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def installed_module_file() -> Path | None:
    """The plugin module's file when the distribution is installed in this environment."""
    try:
        dist = md.distribution(DIST)
    except md.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name == f"{MODULE}.py":
            return Path(str(dist.locate_file(f)))
    return None


@pytest.fixture(scope="module")
def plugin_install(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The plugin distribution, installed (already, or now with pip into a temporary dir)."""
    already = installed_module_file()
    if already is not None:
        return Installed(None, already)
    try:
        import setuptools  # noqa: F401  (pip builds the plugin with --no-build-isolation)
    except ImportError:
        pytest.skip(
            f"setuptools is not importable, so pip cannot build {PLUGIN_SRC} offline "
            "(--no-build-isolation); install setuptools or the plugin itself"
        )
    root = tmp_path_factory.mktemp("rank_reward")
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    src = root / "src"
    shutil.copytree(
        PLUGIN_SRC, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    target = root / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation"]
    cmd += ["--no-input", "--disable-pip-version-check", "--target", str(target), str(src)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, f"pip failed:\n{result.stdout}\n{result.stderr}"
    module_file = target / f"{MODULE}.py"
    assert module_file.is_file(), sorted(p.name for p in target.iterdir())
    return Installed(target, module_file)


@pytest.fixture(scope="module")
def rank_module(plugin_install: Installed) -> ModuleType:
    """The installed plugin module, imported by file (not through sys.path)."""
    spec = importlib.util.spec_from_file_location(
        f"_installed_{MODULE}", plugin_install.module_file
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------- the numbers
def test_rank_scores_hand_computed(rank_module: ModuleType) -> None:
    """1 best ... -1 worst among real candidates; ties to the lower index; pads ignored."""
    scores = rank_module.rank_scores
    t, f = True, False
    rewards = torch.tensor([[0.5, 2.0, 1.0, 7.0], [1.0, 1.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[t, t, t, f], [t, t, f, f], [t, f, f, f]])
    got = scores(rewards, mask)
    assert got.shape == (3, 4) and got.dtype == torch.float32
    assert torch.equal(got[0, :3], torch.tensor([-1.0, 1.0, 0.0]))  # 7.0 is padding
    assert torch.equal(got[1, :2], torch.tensor([1.0, -1.0]))  # tie: lower index first
    assert torch.equal(got[2, :1], torch.tensor([0.0]))  # one candidate
    # five candidates, pads holding huge values: 1, 0.5, 0, -0.5, -1 by reward
    r = torch.tensor([[0.2, 0.9, 0.1, 0.5, 0.3, 99.0, -99.0]])
    m = torch.tensor([[t, t, t, t, t, f, f]])
    assert torch.equal(scores(r, m)[0, :5], torch.tensor([-0.5, 1.0, -1.0, 0.5, 0.0]))
    # a padded slot never changes the real candidates' scores, whatever it holds
    assert torch.equal(scores(rewards, mask), scores(rewards.masked_fill(~mask, -5.0), mask))


def test_rank_reward_reads_the_batch(rank_module: ModuleType) -> None:
    """``compute(batch)`` uses ``rewards_raw`` and ``cand_mask`` only."""
    from types import SimpleNamespace

    batch = SimpleNamespace(
        rewards_raw=torch.tensor([[0.5, 2.0, 1.0, 0.0]]),
        rewards_norm=torch.tensor([[9.0, -9.0, 0.0, 0.0]]),
        cand_mask=torch.tensor([[True, True, True, False]]),
    )
    choice = rank_module.select_reward(state=None, phase="rce")
    assert (choice.name, choice.source) == ("rank", "rank of beam_rewards_raw")
    assert torch.equal(choice.compute(batch)[0, :3], torch.tensor([-1.0, 1.0, 0.0]))
    assert rank_module.select_reward(state=None, phase="grpo") is not None
    assert rank_module.select_reward(state=None, phase="other") is None
    assert not getattr(rank_module, "ENABLED_BY_DEFAULT", False)
    assert rank_module.DESCRIPTION


# ------------------------------------------------------------------------- the real CLI
def test_installed_plugin_is_listed_and_changes_only_runs_that_enable_it(
    plugin_install: Installed, tmp_path: Path
) -> None:
    """Listed with its distribution; ``--plugin rank-reward`` changes the weights, nothing else."""
    path = plugin_install.path
    listing = start(["plugins"], path, tmp_path)
    ok(lever(["demo-data", "data", "--queries", "30", "--pool", "8", "--dim", "8"], path, tmp_path))
    data = ["--beam-data", "data/rl_data.json", "--img-emb", "data/embeddings.safetensors"]

    lines = ok(finish(listing)).splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith(f"{PLUGIN} "))
    assert f"[{DIST} {VERSION}]" in lines[head] and "off by default" in lines[head], lines[head]
    entry = lines[head + 1 : head + 3]  # description, hooks
    assert any(ln.strip() == "hooks: reward_modes, select_reward" for ln in entry), entry

    runs = {"rank1": [PLUGIN], "raw1": [], "rank2": [PLUGIN], "raw2": []}
    results = {}
    names = list(runs)
    for pair in (names[:2], names[2:]):  # two at a time
        procs = {}
        for name in pair:
            plugin_args = [a for p in runs[name] for a in ("--plugin", p)]
            args = [*data, "--output-dir", name, *TRAIN_ARGS, *plugin_args]
            procs[name] = start(args, path, tmp_path)
        results.update({name: ok(finish(proc)) for name, proc in procs.items()})

    for name in ("rank1", "rank2"):
        assert "RCE reward: rank (rank of beam_rewards_raw) [plugin rank-reward]" in results[name]
    for name in ("raw1", "raw2"):
        assert "RCE reward: raw (beam_rewards_raw) [default]" in results[name], results[name]
        assert "rank" not in results[name].split("RCE reward:")[1].splitlines()[0]

    weights = {n: load_file(str(tmp_path / n / "rce_epoch02.safetensors")) for n in runs}
    assert set(weights["rank1"]) == set(weights["raw1"])

    def same(a: str, b: str) -> bool:
        return all(torch.equal(weights[a][k], weights[b][k]) for k in weights[a])

    assert same("raw1", "raw2"), "two default runs with one seed must be bit-identical"
    assert same("rank1", "rank2"), "two rank-reward runs with one seed must be bit-identical"
    assert not same("rank1", "raw1"), "enabling rank-reward must change the trained weights"

    meta = read_metadata(tmp_path / "rank1" / "rce_epoch02.safetensors")
    plugins = meta["plugins"]  # read_metadata has decoded the JSON value
    assert isinstance(plugins, dict), meta
    assert plugins[PLUGIN] == f"{DIST} {VERSION}", plugins
    assert PLUGIN not in read_metadata(tmp_path / "raw1" / "rce_epoch02.safetensors")["plugins"]


# ---------------------------------------------------------------- a reward mode from a plugin
def test_acc_squared_by_hand(rank_module: ModuleType) -> None:
    """``ws * s**2``; a missing or null score is 0."""
    from lever_trainer.rewards import RewardParams

    modes = rank_module.reward_modes()
    assert set(modes) == {"acc_squared"}
    fn = modes["acc_squared"]
    assert fn({"vqa_acc_score": 0.5, "vqa_correct": 1}, RewardParams()) == 0.25  # 0.5^2
    assert fn({"vqa_acc_score": 0.5}, RewardParams(soft=2.0)) == 0.5  # 2 * 0.25
    assert fn({"vqa_correct": 1}, RewardParams()) == 0.0
    assert fn({"vqa_acc_score": None}, RewardParams()) == 0.0


def acc_data(root: Path) -> tuple[str, str]:
    """Four queries, candidates with vqa_acc_score 1.0, 0.5, 0.0 and none; ids < 12."""
    root.mkdir()
    data = {
        str(q): {
            "pointer_candidates": [
                {"pointer": [4, 5], "vqa_correct": 1, "vqa_acc_score": 1.0},
                {"pointer": [5, 6], "vqa_correct": 0, "vqa_acc_score": 0.5},
                {"pointer": [6, 7], "vqa_correct": 0, "vqa_acc_score": 0.0},
                {"pointer": [7, 8 + q], "vqa_correct": 0},
            ]
        }
        for q in range(4)
    }
    (root / "rl.json").write_text(json.dumps(data))
    emb = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    save_file({"embeddings": emb}, str(root / "emb.safetensors"))
    return str(root / "rl.json"), str(root / "emb.safetensors")


def test_installed_plugin_adds_a_reward_mode_only_when_enabled(
    plugin_install: Installed, tmp_path: Path
) -> None:
    """``--plugin rank-reward --reward-mode acc_squared`` trains on ``ws * s**2``;
    without ``--plugin rank-reward`` the mode is one error line naming --reward-mode."""
    path = plugin_install.path
    on_data, on_emb = acc_data(tmp_path / "on")
    off_data, _ = acc_data(tmp_path / "off")
    mode = ["--reward_mode", "acc_squared", "--soft-weight", "2"]
    on = start(
        ["--beam-data", on_data, "--img-emb", on_emb, "--output-dir", "run",
         *TRAIN_ARGS, "--plugin", PLUGIN, *mode],
        path,
        tmp_path,
    )  # fmt: skip
    off = start(["prepare", "--beam-data", off_data, *mode], path, tmp_path)
    trained, refused = finish(on), finish(off)

    log = ok(trained)
    assert "loaded" in log and "4 queries, 16 candidates" in log, log
    assert "done: 2 epochs" in log, log
    # the table the run prepared (and trained on) holds 2 * s**2: [2, 0.5, 0, 0] per query
    table = load_file(on_data + CACHE_SUFFIX)
    assert table["rewards_raw"].tolist() == [[2.0, 0.5, 0.0, 0.0]] * 4
    meta = read_metadata(tmp_path / "run" / "rce_epoch02.safetensors")
    assert PLUGIN in meta["plugins"], meta

    assert refused.returncode == 2, (refused.stdout, refused.stderr)
    assert "Traceback" not in refused.stderr
    errors = [ln for ln in refused.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, refused.stderr
    assert "--reward-mode" in errors[0] and "'acc_squared'" in errors[0], errors[0]
    assert not Path(off_data + CACHE_SUFFIX).exists()


# ---------------------------------------------------------------------- a broken plugin
BROKEN = "broken-thing"
BROKEN_DIST = "lever-trainer-broken-thing"
BROKEN_REASON = "lever_broken_thing needs frobnicate>=2"


@pytest.fixture
def broken_site(tmp_path: Path) -> Path:
    """A directory holding an installed plugin whose module raises ImportError."""
    site = tmp_path / "site"
    info = site / "lever_trainer_broken_thing-0.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {BROKEN_DIST}\nVersion: 0.0.1\n", encoding="utf-8"
    )
    (info / "entry_points.txt").write_text(
        f"[lever_trainer]\n{BROKEN} = lever_broken_thing\n", encoding="utf-8"
    )
    (site / "lever_broken_thing.py").write_text(
        f"raise ImportError({BROKEN_REASON!r})\n", encoding="utf-8"
    )
    return site


def test_broken_plugin_is_reported_and_the_cli_keeps_working(
    broken_site: Path, tmp_path: Path
) -> None:
    """``plugins`` lists it as BROKEN, ``--help`` works, ``--plugin`` on it is one error line."""
    args_train = [
        "--beam-data", "missing.json", "--img-emb", "missing.pt", "--output-dir", "out",
        "--plugin", BROKEN,
    ]  # fmt: skip
    procs = [start(a, broken_site, tmp_path) for a in (["plugins"], ["--help"], args_train)]
    listing, helped, refused = (finish(p) for p in procs)

    lines = ok(listing).splitlines()
    line = next(ln for ln in lines if ln.startswith(f"{BROKEN} "))
    assert f"[{BROKEN_DIST} 0.0.1]" in line and "BROKEN" in line and BROKEN_REASON in line, line
    assert any(ln.startswith("raw-reward ") for ln in lines), "other plugins are still listed"

    assert "Usage:" in ok(helped)

    assert refused.returncode == 2, (refused.stdout, refused.stderr)
    assert "Traceback" not in refused.stderr
    errors = [ln for ln in refused.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and BROKEN in errors[0] and BROKEN_REASON in errors[0], refused.stderr

"""Shared fixtures: tiny datasets written in the real formats, and a CLI runner."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import save_file

from lever_trainer.cli import main
from lever_trainer.demo import DemoSpec, write_demo
from lever_trainer.plugins import load_plugins
from lever_trainer.rewards import RewardRegistry, registry_from_plugins

DATA_DIR = Path(__file__).parent / "data"
#: The example environment package (installed by tox; importable from the checkout too).
DIGITS_ENV = Path(__file__).resolve().parents[1] / "examples" / "digits_env"
if str(DIGITS_ENV) not in sys.path:
    sys.path.append(str(DIGITS_ENV))

# Commands write the shell-completion cache of plugin options under $XDG_CACHE_HOME:
# keep the suite's out of the user's home.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="lever-tests-cache-")
REFERENCE = DATA_DIR / "upstream_parity.safetensors"


@pytest.fixture(scope="session")
def reference() -> dict[str, torch.Tensor]:
    """Reference-implementation vectors (see tests/data/upstream_parity.README.md)."""
    from safetensors.torch import load_file

    return load_file(str(REFERENCE))


@pytest.fixture
def demo_files(tmp_path: Path) -> tuple[Path, Path]:
    """A small synthetic dataset (40 queries, pool 12, d 16): (rl_data.json, embeddings)."""
    return write_demo(tmp_path / "demo", DemoSpec(queries=40, demos=120, pool=12, dim=16, seed=3))


def builtin_registry() -> RewardRegistry:
    """The reward modes and normalisers of the plugins that are on by default."""
    return registry_from_plugins(load_plugins())


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as JSON to ``path``."""
    path.write_text(json.dumps(data))
    return path


def write_emb(path: Path, table: torch.Tensor) -> Path:
    """Write an embedding table as safetensors (or .pt / .npy by suffix)."""
    if path.suffix == ".safetensors":
        save_file({"embeddings": table.contiguous()}, str(path))
    elif path.suffix == ".npy":
        import numpy as np

        np.save(path, table.numpy())
    else:
        torch.save(table, path)
    return path


def candidate(
    pointer: list[int], correct: int = 0, acc: float = 0.0, **extra: Any
) -> dict[str, Any]:
    """One logged candidate in the global-id ``pointer`` encoding."""
    return {"pointer": pointer, "vqa_correct": correct, "vqa_acc_score": acc, **extra}


@pytest.fixture
def cli() -> Callable[..., Result]:
    """Run ``lever-train ARGS`` in-process; returns click's Result."""

    def run(*args: str) -> Result:
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)

    return run


@pytest.fixture
def cli_apart() -> Callable[..., Result]:
    """Like ``cli``, with standard output and standard error kept apart (click < 8.2
    mixes them unless told not to; 8.2 always keeps them apart)."""
    import inspect

    apart = {"mix_stderr": False} if "mix_stderr" in inspect.signature(CliRunner).parameters else {}

    def run(*args: str) -> Result:
        return CliRunner(**apart).invoke(main, [str(a) for a in args], catch_exceptions=True)

    return run


def assert_user_error(result: Result, *fragments: str) -> None:
    """A user error: exit 2, one ``error:`` line naming every fragment, no traceback."""
    out = result.output
    assert result.exit_code == 2, out
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in out
    errors = [ln for ln in out.splitlines() if ln.startswith("error:") or ln.startswith("Error:")]
    assert len(errors) == 1, out
    for frag in fragments:
        assert frag in errors[0], (frag, errors[0])


def signal_when_hung(
    args: list[str], env: dict[str, str], hung: Path, signum: int
) -> tuple[int, str]:
    """Run ``args`` (a command whose fault judge hangs, writing ``hung`` when it does),
    send it ``signum`` once it hangs; ``(exit status, stdout and stderr together)``."""
    import subprocess
    import time

    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 120
    while not hung.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.1)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out

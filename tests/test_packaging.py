"""What pyproject.toml declares: lowest versions tested, extras, package data."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_lowest_constraints_are_the_declared_minimums() -> None:
    declared = {}
    for requirement in project()["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)(;.*)?", requirement.replace(" ", ""))
        assert match, requirement
        if match.group(3) is None:  # markers (tomli on 3.10) are not for this Python
            declared[match.group(1).lower()] = match.group(2)
    pinned = {}
    for line in (ROOT / "tests" / "constraints-lowest.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pinned[name.lower()] = version
    torch = declared.pop("torch")  # pinned by tox.ini (a CPU build), not here
    assert torch
    assert pinned == declared


def test_optional_features_are_extras_and_presets_are_package_data() -> None:
    extras = project()["optional-dependencies"]
    assert {"plot", "tensorboard", "mlflow", "wandb"} <= set(extras)
    core = " ".join(project()["dependencies"])
    for name in ("matplotlib", "tensorboard", "mlflow", "wandb"):
        assert name not in core
    assert any(
        r.startswith("tomli") and "python_version < '3.11'" in r for r in project()["dependencies"]
    )
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "presets/*.toml" in data["package-data"]["lever_trainer"]


def test_every_core_subpackage_is_packaged() -> None:
    """A wheel holds only the listed packages: a subpackage left out breaks the install."""
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "lever_trainer").rglob("__init__.py")
    }
    assert found <= listed, found - listed


def test_readme_test_command_is_what_ci_runs() -> None:
    """The README's test command, .ci/run's env list and tox.ini's envs agree, and the
    docs site is one of them (built with warnings as errors)."""
    readme = (ROOT / "README.md").read_text()
    (in_readme,) = re.findall(r"^python3\.11 -m venv \.ci-venv .*tox -e (\S+)$", readme, re.M)
    ci = (ROOT / ".ci" / "run").read_text()
    (in_ci,) = re.findall(r"^envs=\$\{CI_TOX_ENVS:-(\S+)\}$", ci, re.M)
    assert in_readme == in_ci
    assert f"tox -e {in_ci}\n" in ci  # the header comment names the same command
    tox = (ROOT / "tox.ini").read_text()
    declared = re.search(r"^env_list = (.+)$", tox, re.M)
    assert declared is not None
    assert set(in_ci.split(",")) <= {e.strip() for e in declared.group(1).split(",")}
    assert "docs" in in_ci.split(",")
    docs_env = tox.split("[testenv:docs]", 1)[1].split("\n[", 1)[0]
    assert "mkdocs build --strict" in docs_env
    assert "docs" in project()["optional-dependencies"]


def test_readme_is_a_door() -> None:
    """The README stays short; the reference is in docs/, and every page it links exists."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / target).is_file(), target

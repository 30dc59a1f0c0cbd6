"""The documentation: generated references cover the code, pages cite nothing outside
the repository, and every page is in the site's navigation.

The site itself is built with ``mkdocs build --strict`` by ``tox -e docs``; these checks
need no MkDocs and run with the suite.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def reference() -> ModuleType:
    """``docs/_hooks/reference.py``, the build hook that generates the references."""
    spec = importlib.util.spec_from_file_location(
        "docs_reference", DOCS / "_hooks" / "reference.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_hooks_page_has_every_hook_with_its_signature(reference: ModuleType) -> None:
    from lever_trainer import hookspecs

    page = reference.render_hooks()
    single = hookspecs.single_answer_hooks()
    for name in hookspecs.all_hook_names():
        section = page.split(f"### `{name}` {{#{name}}}", 1)
        assert len(section) == 2, f"hooks page lacks {name}"
        body = section[1].split("\n### ", 1)[0]
        params = inspect.signature(getattr(hookspecs, name)).parameters
        signature = re.search(rf"def {name}\((.*?)\) ->", body)
        assert signature is not None, name
        assert re.findall(r"(?:^|, )(\w+):", signature.group(1)) == list(params), name
        assert ("firstresult" in body) == (name in single), name


def test_options_page_has_every_option_of_every_command(reference: ModuleType) -> None:
    from lever_trainer.cli import installed_plugins, main

    page = reference.render_options(reference.option_records())
    builtin = {i.name for i in installed_plugins() if i.distribution == "lever-trainer"}
    with click.Context(main) as ctx:
        for name in main.list_commands(ctx):
            command = main.get_command(ctx, name)
            assert command is not None
            section = page.split(f"## `lever-train {name}`", 1)[1].split("\n## `", 1)[0]
            for param in command.params:
                if not isinstance(param, click.Option) or param.hidden:
                    continue
                group = getattr(param, "lever_group", "")
                if group.startswith("Plugin ") and group[7:] not in builtin:
                    assert f"`{param.opts[0]}`" not in section  # third-party: not documented
                    continue
                assert f"| `{param.opts[0]}`" in section, (name, param.opts[0])
    assert "**Plugin `rce`**" in page and "| `--rce-epochs`" in page


def test_options_page_shows_types_defaults_and_bounds(reference: ModuleType) -> None:
    page = reference.render_options(reference.option_records())
    train = page.split("## `lever-train train`", 1)[1].split("\n## `", 1)[0]
    rows = {line.split(" | ")[0]: line for line in train.splitlines() if line.startswith("| `")}
    assert "| int (≥ 0, ≤ 9223372036854775807) | `42` |" in rows["| `--seed`"]
    assert "| float (≥ 0, < 1) | `0.2` |" in rows["| `--val-ratio`, `--val_ratio`"]
    assert "| flag | off |" in rows["| `--overwrite`"]
    assert "| `cosine-bilinear` |" in rows["| `--policy`"]


def test_options_page_says_what_resume_does_with_each_training_option(
    reference: ModuleType,
) -> None:
    """The column follows the table's resume rules and resuming's rules for plugins."""
    page = reference.render_options(reference.option_records())
    train = page.split("## `lever-train train`", 1)[1].split("\n## `", 1)[0]
    rows = {line.split(" | ")[0]: line for line in train.splitlines() if line.startswith("| `")}
    assert rows["| `--device`"].endswith("| applied |")
    assert rows["| `--seed`"].endswith("| kept |")
    assert rows["| `--rce-epochs`, `--rce_epochs`"].endswith(
        "| applied (more epochs extend the run) |"
    )
    assert rows["| `--rce-lr`, `--rce_lr`"].endswith("| applied until its phase starts |")
    select = page.split("## `lever-train select`", 1)[1].split("\n## `", 1)[0]
    assert "on `--resume`" not in select  # only training resumes


def test_every_page_is_in_the_navigation() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    listed = set(re.findall(r":\s+(\S+\.md)\s*$", nav, re.M))
    pages = {p.name for p in DOCS.glob("*.md")}
    assert pages == listed, (pages - listed, listed - pages)


def test_no_citation_of_a_document_outside_the_repository() -> None:
    """The algorithm is docs/algorithm.md; nothing cites the old external SPEC file."""
    pattern = re.compile(r"\bSPEC\b|SPEC\.md|SPEC §")
    roots = ["lever_trainer", "plugins", "tests", "bench", "examples", "docs"]
    files = [ROOT / "README.md", ROOT / "mkdocs.yml"]
    for root in roots:
        files += [
            p
            for p in (ROOT / root).rglob("*")
            if p.suffix in {".py", ".md", ".toml"}
            and not {"build", "__pycache__"} & set(p.parts)
            and ".egg-info" not in str(p)
        ]
    offenders = []
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if path.name == "test_docs.py":
                continue
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_algorithm_anchors_cited_by_the_code_exist() -> None:
    """Every ``docs/algorithm.md#...`` anchor the code, tests or pages cite is a heading id."""
    page = (DOCS / "algorithm.md").read_text()
    anchors = set(re.findall(r"\{#([a-z0-9-]+)\}", page))
    cited: set[str] = set()
    for root in ("lever_trainer", "plugins", "tests", "bench", "docs"):
        for path in (ROOT / root).rglob("*"):
            if path.suffix in {".py", ".md", ".toml"} and "build" not in path.parts:
                cited |= set(re.findall(r"algorithm\.md#([a-z0-9-]+)", path.read_text()))
    assert cited, "nothing cites docs/algorithm.md"
    assert cited <= anchors, cited - anchors


def test_metrics_page_lists_what_each_builtin_phase_declares(reference: ModuleType) -> None:
    from lever_trainer.metrics import TRAINER_METRICS
    from lever_trainer.plugins import load_plugins
    from lever_trainer.trainer import collect_phases

    assert "<!-- generated: metrics -->" in (DOCS / "logs.md").read_text()
    page = reference.render_metrics()
    rows = {line.split("|")[1].strip(): line.split("|")[2] for line in page.splitlines()[2:]}
    assert all(f"`{n}`" in rows["every phase (the trainer)"] for n in TRAINER_METRICS)
    for phase in collect_phases(load_plugins(enable=["online", "judge-rank"])):
        row = rows[f"`{phase.name}` ({phase.name})"]
        if phase.metric_names is None:
            assert row.strip() == "not declared"
        else:
            assert [n.strip(" `") for n in row.split(",")] == list(phase.metric_names)

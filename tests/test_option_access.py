"""Options are read through their declarations (``OPTION.of(options)``), not by string.

``Option.of`` gives the value a run's option mapping holds under the option's ``dest``,
the declared default when the mapping lacks it, and never rewrites a value that is
present (``None`` included). The built-in plugins and the core's run loop read their
options this way: a source scan finds no ``options["..."]`` / ``options.get("...")``
with a string literal left in them.
"""

from __future__ import annotations

import ast
from pathlib import Path
from types import MappingProxyType

import pytest

from lever_trainer.options import Option

ROOT = Path(__file__).resolve().parents[1]
BUILTINS = ROOT / "plugins" / "lever_trainer_plugins"
#: Core modules whose option reads are the run's own (not a file's content): ``assess.py``
#: reads the options a checkpoint recorded, which is data read from a file, so it is not
#: scanned.
CORE_SCANNED = ("trainer.py", "phase.py", "rewards.py", "resuming.py", "run.py")


def test_of_reads_the_value_under_the_dest() -> None:
    epochs = Option(("--rank-epochs",), "int", 30)
    assert epochs.dest == "rank_epochs"
    assert epochs.of({"rank_epochs": 7, "other": 1}) == 7
    # A given dest is what is looked up, not the flag's spelling.
    order = Option(("--order",), "choice", "reverse", choices=("reverse", "forward"), dest="o")
    assert order.of({"o": "forward", "order": "reverse"}) == "forward"


def test_of_falls_back_to_the_declared_default_only_when_the_dest_is_missing() -> None:
    alpha = Option(("--ref-sync-alpha",), "float", 0.5)
    assert alpha.of({}) == 0.5
    assert alpha.of({"something_else": 0.9}) == 0.5
    # Present values are returned as they are, even falsy ones and None.
    assert alpha.of({"ref_sync_alpha": 0.0}) == 0.0
    assert alpha.of({"ref_sync_alpha": None}) is None
    urls = Option(("--judge-url",), "str", (), multiple=True)
    assert urls.of({}) == ()


def test_of_takes_another_value_for_a_missing_dest_when_asked() -> None:
    # A checkpoint written before an option existed lacks it: the caller names the
    # value that reproduces such a checkpoint instead of the declared default.
    term = Option(("--candidate-term",), "choice", "on", choices=("on", "off"))
    assert term.of({}, missing="off") == "off"
    assert term.of({"candidate_term": "on"}, missing="off") == "on"
    assert term.of({}, missing=None) is None
    assert term.of({"candidate_term": None}, missing="off") is None


def test_of_takes_a_read_only_mapping() -> None:
    steps = Option(("--ref-sync-steps",), "int", 1)
    assert steps.of(MappingProxyType({"ref_sync_steps": 4})) == 4


def string_lookups(source: str) -> list[str]:
    """``options[...]`` / ``options.get(...)`` reads whose key is a string literal (the
    receiver is any name or attribute ending in ``options``); writes are not reads."""
    found: list[tuple[int, str]] = []

    def is_options(node: ast.expr) -> bool:
        name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")
        return name.endswith("options")

    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.ctx, ast.Load)
            and is_options(node.value)
            and isinstance(node.slice, ast.Constant)
            and isinstance(node.slice.value, str)
        ):
            found.append((node.lineno, f"line {node.lineno}: {ast.unparse(node)}"))
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and is_options(node.func.value)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, f"line {node.lineno}: {ast.unparse(node)}"))
    return [text for _, text in sorted(found)]


def test_the_scan_finds_string_lookups_it_is_meant_to_find() -> None:
    source = (
        "a = state.options['rank_epochs']\n"
        "b = options.get('vlm_url')\n"
        "c = f\"{state.options['ref_sync_steps']}\"\n"
        "d = self.plugin_options.get('x', 1)\n"
        "options['resume'] = 'x'\n"  # a write: not a read
        "e = state.options[dest]\n"  # not a literal
        "f = RANK_EPOCHS.of(state.options)\n"
        "g = table.get('rank_epochs')\n"  # not an option mapping
    )
    assert string_lookups(source) == [
        "line 1: state.options['rank_epochs']",
        "line 2: options.get('vlm_url')",
        "line 3: state.options['ref_sync_steps']",
        "line 4: self.plugin_options.get('x', 1)",
    ]


@pytest.mark.parametrize("path", sorted(BUILTINS.glob("*.py")), ids=lambda p: p.name)
def test_builtin_plugins_read_no_option_by_string(path: Path) -> None:
    assert string_lookups(path.read_text()) == [], path


@pytest.mark.parametrize("name", CORE_SCANNED)
def test_the_core_run_loop_reads_no_option_by_string(name: str) -> None:
    path = ROOT / "lever_trainer" / name
    assert string_lookups(path.read_text()) == [], path


def test_builtin_plugins_return_their_module_level_option_constants() -> None:
    """Each option a built-in plugin declares is a module-level constant of the plugin's
    module (or of a private module it shares, such as ``_group_objective``) named after
    its ``dest``, so the plugin reads it with ``CONSTANT.of(...)``."""
    import sys
    from types import ModuleType

    from lever_trainer.plugins import discover

    checked = 0
    for info in discover():
        if info.distribution != "lever-trainer":
            continue
        obj = info.obj
        module = obj if isinstance(obj, ModuleType) else sys.modules[type(obj).__module__]
        for option in info.options:
            constant = getattr(module, option.dest.upper(), None)
            assert constant is option, f"{info.name}: {option.name} is not {option.dest.upper()}"
            checked += 1
    assert checked >= 90  # every built-in plugin's options (91 declared when written)

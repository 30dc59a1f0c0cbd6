"""The dependency rule: layers without cycles, plugins through the public API only."""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "lever_trainer"
BUILTINS = ROOT / "plugins" / "lever_trainer_plugins"

#: Each core module's layer; a module may import (at run time, deferred imports
#: included) only modules of a lower layer. Type-only imports (under TYPE_CHECKING)
#: are exempt: they do not run.
LAYERS = [
    {"errors"},
    {"fileio", "jsonstream", "losses", "metrics", "options", "rundir", "config", "entrypoints"},
    {"coreoptions", "manifest", "vqa_eval"},
    {"stats", "judge_driver"},
    {"rewards", "policy", "phase", "state"},
    {"hookspecs", "plan"},
    {"plugins"},
    {"data", "checkpoint", "demo", "judge"},
    {"policies", "select", "selectors", "serve", "ray_judge", "embed"},
    {"collect"},
    {"evaluation", "snapshot", "retention"},
    {"trainer"},
    {"resuming"},
    {"run", "api", "assess", "settings", "completion", "plot"},
    {"cli", "__init__"},
    {"__main__"},
]


def module_name(path: Path) -> str:
    rel = path.relative_to(CORE).with_suffix("")
    parts = rel.parts
    return parts[0] if parts[0] in ("data", "cli") else ".".join(parts)


def layer_of(name: str) -> int:
    for i, layer in enumerate(LAYERS):
        if name in layer:
            return i
    raise AssertionError(f"module {name} has no layer in this test")


def runtime_imports(path: Path) -> set[str]:
    """lever_trainer modules that ``path`` imports outside ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text())
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in ast.walk(node):
                type_only.add(id(inner))
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only or not isinstance(node, ast.ImportFrom | ast.Import):
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif node.level:
            base = list(package[: len(package) - node.level + 1])
            mod = ".".join([*base, node.module] if node.module else base)
            names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
        else:
            names = [node.module or ""]
        for n in names:
            parts = n.split(".")
            if parts[0] == "lever_trainer" and len(parts) > 1:
                found.add(parts[1])
    return found - {module_name(path)}


def test_core_layers_import_only_downward() -> None:
    for path in CORE.rglob("*.py"):
        me = module_name(path)
        for other in runtime_imports(path):
            if other == "__version__":
                continue
            assert layer_of(other) < layer_of(me) or (me == "__init__"), (
                f"{path.relative_to(ROOT)} ({me}, layer {layer_of(me)}) imports {other} "
                f"(layer {layer_of(other)})"
            )


def test_no_import_cycle_in_the_core() -> None:
    graph = {module_name(p): set() for p in CORE.rglob("*.py")}
    for path in CORE.rglob("*.py"):
        graph[module_name(path)] |= runtime_imports(path) & set(graph)
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*trail, node, nxt])
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_data_layer_never_discovers_plugins() -> None:
    for path in (CORE / "data").glob("*.py"):
        assert "plugins" not in runtime_imports(path), path


def test_builtin_plugins_import_only_the_public_api() -> None:
    for path in BUILTINS.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                mod = node.module
            elif isinstance(node, ast.Import):
                mod = node.names[0].name
            else:
                continue
            if mod.startswith("lever_trainer") and not mod.startswith("lever_trainer_plugins"):
                assert mod == "lever_trainer.api", f"{path.name} imports {mod}"


PLUGIN_DOCS = ROOT / "docs" / "plugins.md"


def plugin_table_rows() -> dict[str, str]:
    """``{name: row}`` of the built-in plugin table in docs/plugins.md."""
    lines = PLUGIN_DOCS.read_text().splitlines()
    start = lines.index("## The built-in plugins")
    rows = {}
    for line in lines[start:]:
        if line.startswith("| `"):
            rows[line.split("`")[1]] = line
    return rows


def test_every_builtin_plugin_and_hook_is_in_the_plugin_docs() -> None:
    from lever_trainer import hookspecs

    entry_points = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][
        "lever_trainer"
    ]
    rows = plugin_table_rows()
    assert set(entry_points) <= set(rows), (
        f"docs/plugins.md table lacks {set(entry_points) - set(rows)}"
    )
    table = [line for line in PLUGIN_DOCS.read_text().splitlines() if line.startswith("| `")]
    for hook in hookspecs.all_hook_names():
        assert any(line.startswith(f"| `{hook}` |") for line in table), (
            f"docs/plugins.md hook table lacks {hook}"
        )


def test_plugin_table_defaults_are_the_declared_defaults() -> None:
    """Each option the table lists with a value (`` `--rce-epochs` 10 ``) has that value as
    its declared default, and every option a built-in plugin declares is in its row."""
    import re

    from lever_trainer.plugins import discover

    rows = plugin_table_rows()
    checked = 0
    for info in discover():
        if info.distribution != "lever-trainer":
            continue
        row = rows[info.name]
        options_cell = row.rstrip(" |").rsplit(" | ", 1)[-1]
        for option in info.options:
            assert f"`{option.name}" in row, f"{info.name}: {option.name} is not in its table row"
            match = re.search(rf"`{re.escape(option.name)}` ([^,`|(]+)", options_cell)
            if match is None:
                continue
            shown = match.group(1).strip().split()[0].removesuffix("s")  # 30s -> 30
            default = option.default
            if isinstance(default, int | float) and not isinstance(default, bool):
                assert float(shown) == float(default), (info.name, option.name, shown, default)
            else:
                assert shown == str(default).removesuffix("s"), (info.name, option.name, shown)
            checked += 1
    assert checked >= 30  # the table gives most defaults


def test_every_builtin_plugin_is_listed_by_lever_train_plugins() -> None:
    from click.testing import CliRunner

    from lever_trainer.cli import main

    entry_points = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][
        "lever_trainer"
    ]
    result = CliRunner().invoke(main, ["plugins"])
    assert result.exit_code == 0, result.output
    listed = {line.split()[0] for line in result.output.splitlines() if line and line[0] != " "}
    for name in entry_points:
        assert name in listed, f"lever-train plugins does not list {name}"
    assert "BROKEN" not in result.output

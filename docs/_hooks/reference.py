"""MkDocs hook: the generated reference pages (options, hooks, metrics).

``docs/options.md``, ``docs/hooks.md`` and ``docs/logs.md`` each hold a marker line; at
build time it is replaced by tables generated from the code itself, so the pages cannot
drift from it:

* ``<!-- generated: options -->``: every ``lever-train`` command and its options, read
  from the option table (core options by help group, then each built-in plugin's);
* ``<!-- generated: hooks -->``: every hook of ``lever_trainer.hookspecs`` with its
  signature, its kind (single answer or broadcast) and its docstring;
* ``<!-- generated: metrics -->``: the metrics each built-in phase declares
  (``Phase.metric_names``) and those the trainer adds to every epoch.

The options come from :func:`option_records`: the option table
(:mod:`lever_trainer.coreoptions` and the plugins' ``add_options`` records) for the
commands that take it.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any

OPTIONS_MARKER = "<!-- generated: options -->"
HOOKS_MARKER = "<!-- generated: hooks -->"
METRICS_MARKER = "<!-- generated: metrics -->"
#: The distribution whose plugins are documented; third-party plugins installed in the
#: build environment (the digits example, a test plugin) are left out.
BUILTIN_DISTRIBUTION = "lever-trainer"


@dataclass(frozen=True)
class OptionRecord:
    """One option of one command, as the reference shows it."""

    command: str
    group: str  # "Data", "Run", ... or "Plugin NAME"
    flags: tuple[str, ...]
    type: str
    default: str
    help: str
    #: What ``--resume`` does with a new value (``train`` only): applied or kept.
    resume: str = ""


@dataclass(frozen=True)
class CommandRecord:
    """One ``lever-train`` command: its name, help and options."""

    name: str
    help: str
    usage: str
    options: tuple[OptionRecord, ...]


def _number(value: float) -> str:
    """A bound as written: integers in full (2**63 - 1 stays exact), floats short."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _type_name(param: Any) -> str:
    import click

    if getattr(param, "is_flag", False):
        return "flag"
    kind = param.type
    if isinstance(kind, click.Choice):
        return " \\| ".join(f"`{c}`" for c in kind.choices)
    name = getattr(kind, "name", type(kind).__name__).lower()
    text = {"integer": "int", "integer range": "int", "float range": "float"}.get(name, name)
    bounds = []
    low, high = getattr(kind, "min", None), getattr(kind, "max", None)
    if low is not None:
        bounds.append(f"{'>' if getattr(kind, 'min_open', False) else '≥'} {_number(low)}")
    if high is not None:
        bounds.append(f"{'<' if getattr(kind, 'max_open', False) else '≤'} {_number(high)}")
    if bounds:
        text += f" ({', '.join(bounds)})"
    if getattr(param, "multiple", False):
        text += ", repeatable"
    return text


def _unset(value: Any) -> bool:
    """True for "no default": None, empty, or click's own ``UNSET`` sentinel."""
    return value is None or value == () or type(value).__name__ == "Sentinel"


def _default(param: Any) -> str:
    default = param.default
    if getattr(param, "is_flag", False):
        return "off" if _unset(default) or default is False else "on"
    if _unset(default) or callable(default):
        return "—"
    if isinstance(default, tuple | list):
        return ", ".join(f"`{d}`" for d in default)
    return f"`{default}`"


def _option_type(option: Any) -> str:
    """The type column of a table record: ``flag``, the choices, or the type and bounds."""
    if option.type == "bool":
        return "flag"
    if option.type == "choice":
        return " \\| ".join(f"`{c}`" for c in option.choices)
    text = {"str": "text"}.get(option.type, option.type)
    bounds = []
    if option.min is not None:
        bounds.append(f"{'>' if option.min_open else '≥'} {_number(option.min)}")
    if option.max is not None:
        bounds.append(f"{'<' if option.max_open else '≤'} {_number(option.max)}")
    if bounds:
        text += f" ({', '.join(bounds)})"
    if option.multiple:
        text += ", repeatable"
    return text


def _option_default(option: Any) -> str:
    if option.type == "bool":
        return "on" if option.default else "off"
    if _unset(option.default):
        return "—"
    return f"`{option.default}`"


def _table_records(name: str, builtin: list[Any]) -> list[OptionRecord]:
    """The options of a table command: the core's records, then the built-in plugins'."""
    from lever_trainer.coreoptions import options_of

    train = name == "train"
    records = []
    for option in options_of(name):
        resume = {"apply": "applied", "fixed": "kept"}.get(option.resume, "—") if train else ""
        records.append(
            OptionRecord(
                name,
                option.group,
                option.flags,
                _option_type(option),
                _option_default(option),
                option.help,
                resume,
            )
        )
    for info in builtin:
        for option in info.options:
            if name in option.commands and not option.extra.get("removed"):
                records.append(
                    OptionRecord(
                        name,
                        f"Plugin {info.name}",
                        option.flags,
                        _option_type(option),
                        _option_default(option),
                        option.help,
                        _plugin_resume(info, option) if train else "",
                    )
                )
        if not train:
            continue
        for flags, what in ((info.enable_flags, "--plugin"), (info.disable_flags, "--no-plugin")):
            for flag in flags:
                records.append(
                    OptionRecord(
                        name,
                        "Plugins",
                        (flag,),
                        "flag",
                        "off",
                        f"Same as {what} {info.name}.",
                        "kept",
                    )
                )
    return records


def _plugin_resume(info: Any, option: Any) -> str:
    """What ``--resume`` does with a built-in plugin's option, by the rules
    :mod:`lever_trainer.resuming` applies."""
    from lever_trainer.resuming import plugin_option_rule

    phases = list(info.obj.phases() or ()) if "phases" in info.hooks else []
    if any(p.epochs_option == option.dest for p in phases):
        return "applied (more epochs extend the run)"
    rule = plugin_option_rule(
        info.name, option, bool(info.policies), [p.name for p in phases], started=()
    )
    return "applied until its phase starts" if rule is None else "kept"


def option_records() -> list[CommandRecord]:
    """Every command and its options.

    The commands that take the option table (``train``, ``prepare``, ``select``,
    ``evaluate``) are documented from the table itself (the core's records and the
    built-in plugins' ``add_options`` records); the small commands with a few flags of
    their own from their click declarations.
    """
    import click

    from lever_trainer import cli
    from lever_trainer.coreoptions import TABLE_COMMANDS

    builtin = [
        info
        for info in cli.installed_plugins()
        if info.distribution == BUILTIN_DISTRIBUTION and not info.broken
    ]
    commands = []
    with click.Context(cli.main, info_name="lever-train") as ctx:
        for name in cli.main.list_commands(ctx):
            command = cli.main.get_command(ctx, name)
            if command is None or command.hidden:
                continue
            if name in TABLE_COMMANDS:
                options = _table_records(name, builtin)
            else:
                options = [
                    OptionRecord(
                        command=name,
                        group=getattr(param, "lever_group", "Options"),
                        flags=tuple(param.opts) + tuple(param.secondary_opts),
                        type=_type_name(param),
                        default=_default(param),
                        help=param.help or "",
                    )
                    for param in command.params
                    if isinstance(param, click.Option) and not param.hidden
                ]
            with click.Context(command, info_name=name, parent=ctx) as sub:
                usage = " ".join(command.collect_usage_pieces(sub))
            commands.append(
                CommandRecord(name, inspect.cleandoc(command.help or ""), usage, tuple(options))
            )
    return commands


def _cell(text: str) -> str:
    """Text made safe for one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _help_cell(text: str) -> str:
    # click's help may quote flags with backticks already; bare [brackets] are kept
    return _cell(text.replace("<", "&lt;").replace(">", "&gt;"))


def render_options(commands: list[CommandRecord]) -> str:
    """The options reference in Markdown: one section per command, one table per group."""
    out: list[str] = []
    for command in commands:
        out += [f"## `lever-train {command.name}`", ""]
        out += [_help_cell(command.help.partition("\n\n")[0]), ""]
        out += ["```text", f"lever-train {command.name} {command.usage}".rstrip(), "```", ""]
        groups: dict[str, list[OptionRecord]] = {}
        for option in command.options:
            groups.setdefault(option.group, []).append(option)
        core = [g for g in groups if not g.startswith("Plugin ")]
        plugins = sorted(g for g in groups if g.startswith("Plugin "))
        resume = any(o.resume for o in command.options)
        for group in core + plugins:
            title = f"Plugin `{group.removeprefix('Plugin ')}`" if group in plugins else group
            head = "| option | type | default | meaning |" + (" on `--resume` |" if resume else "")
            out += [f"**{title}**", "", head]
            out.append("| --- | --- | --- | --- |" + (" --- |" if resume else ""))
            for option in groups[group]:
                flags = ", ".join(f"`{f}`" for f in option.flags)
                row = (
                    f"| {flags} | {option.type} | {_cell(option.default)} | "
                    f"{_help_cell(option.help)} |"
                )
                out.append(row + (f" {option.resume} |" if resume else ""))
            out.append("")
        if not command.options:
            out += ["No options besides `--help`.", ""]
    return "\n".join(out)


_ROLE = re.compile(r":(?:class|func|data|mod|meth|attr):`~?([^`]+)`")


def _markdown_doc(doc: str) -> str:
    """A reStructuredText-flavoured docstring as Markdown: roles become code."""

    def role(match: re.Match[str]) -> str:
        target = match.group(1)
        return f"`{target.rsplit('.', 1)[-1]}`"

    return _ROLE.sub(role, doc).replace("``", "`")


def render_hooks() -> str:
    """The hooks reference: each hook's signature, kind and documentation."""
    from lever_trainer import hookspecs

    single = hookspecs.single_answer_hooks()
    out = [
        "| hook | kind |",
        "| --- | --- |",
    ]
    names = hookspecs.all_hook_names()
    for name in names:
        kind = "single answer" if name in single else "broadcast"
        out.append(f"| [`{name}`](#{name}) | {kind} |")
    out.append("")
    for name in names:
        fn = getattr(hookspecs, name)
        # annotations are strings (postponed evaluation): show them without quotes
        params = ", ".join(
            f"{p.name}: {p.annotation}" if p.annotation is not p.empty else p.name
            for p in inspect.signature(fn).parameters.values()
        )
        returns = inspect.signature(fn).return_annotation
        signature = f"({params}) -> {returns}"
        kind = "single answer (`firstresult`)" if name in single else "broadcast"
        out += [
            f"### `{name}` {{#{name}}}",
            "",
            "```python",
            f"@hookimpl\ndef {name}{signature}: ...",
            "```",
            "",
            f"*{kind}*",
            "",
            _markdown_doc(inspect.getdoc(fn) or ""),
            "",
        ]
    return "\n".join(out)


def render_metrics() -> str:
    """Which metrics each built-in phase declares, and the trainer's own: the
    declarations that ``--best-metric`` and ``--early-stop-metric`` are checked against."""
    from lever_trainer.metrics import JUDGE_COST_METRICS, TRAINER_METRICS
    from lever_trainer.plugins import discover

    out = ["| phase (plugin) | the metrics its epochs add |", "| --- | --- |"]
    out.append(f"| every phase (the trainer) | {', '.join(f'`{n}`' for n in TRAINER_METRICS)} |")
    judged = ", ".join(f"`{n}`" for n in JUDGE_COST_METRICS)
    out.append(f"| every phase of a run with a judge (the trainer) | {judged} |")
    rows = []
    for info in discover():
        if info.distribution != BUILTIN_DISTRIBUTION or "phases" not in info.hooks:
            continue
        for phase in info.obj.phases() or ():
            names = phase.metric_names
            shown = "not declared" if names is None else ", ".join(f"`{n}`" for n in names)
            rows.append((phase.order, f"| `{phase.name}` ({info.name}) | {shown or 'none'} |"))
    out += [row for _, row in sorted(rows)]
    return "\n".join(out) + "\n"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs event: fill in the generated parts of a page."""
    if OPTIONS_MARKER in markdown:
        markdown = markdown.replace(OPTIONS_MARKER, render_options(option_records()))
    if HOOKS_MARKER in markdown:
        markdown = markdown.replace(HOOKS_MARKER, render_hooks())
    if METRICS_MARKER in markdown:
        markdown = markdown.replace(METRICS_MARKER, render_metrics())
    return markdown

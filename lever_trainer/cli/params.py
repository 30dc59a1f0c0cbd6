"""Click parameters generated from the option tables (the core's and the plugins').

Every option of ``train``, ``prepare``, ``select`` and ``evaluate`` is an
:class:`~lever_trainer.options.Option` record; this module turns records into click
parameters, lists them in ``--help`` by section, and says which the user set.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from typing import Any

import click

from .. import settings
from ..config import preset_names
from ..coreoptions import options_of
from ..errors import LeverError
from ..options import Option


def warn(message: str) -> None:
    """Print a warning line to stderr."""
    click.echo(message, err=True)


#: Exit status of a command interrupted by Ctrl-C (128 + SIGINT, as a shell reports it).
EXIT_INTERRUPTED = 130


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a LeverError into one line on stderr and exit status 2, and Ctrl-C into the
    line ``interrupted`` and exit status 130 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LeverError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper


def kept_verdicts(judge: Any) -> str:
    """What became of the verdicts of a judged command that stopped before its end."""
    if judge.store is not None:
        return (
            f"the verdicts that returned are stored in {judge.store.path}: run the same "
            "command again to continue"
        )
    return "the verdicts were kept in memory only (--no-store) and are lost"


class Number(click.ParamType):  # type: ignore[type-arg]
    """An int or float within bounds; NaN and infinities are refused."""

    def __init__(
        self,
        kind: type,
        min: float | None = None,
        max: float | None = None,
        min_open: bool = False,
        max_open: bool = False,
    ) -> None:
        self.kind, self.min, self.max = kind, min, max
        self.min_open, self.max_open = min_open, max_open
        self.name = kind.__name__

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number: float
        if isinstance(value, int | float) and not isinstance(value, bool):
            if self.kind is int and not float(value).is_integer():
                self.fail(f"{value!r} is not a valid int", param, ctx)
            number = self.kind(value)
        else:
            try:
                number = self.kind(str(value).strip())
            except (TypeError, ValueError):
                self.fail(f"{value!r} is not a valid {self.name}", param, ctx)
        if isinstance(number, float) and not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        low = self.min is not None and (number < self.min or (self.min_open and number == self.min))
        high = self.max is not None and (
            number > self.max or (self.max_open and number == self.max)
        )
        if low or high:
            self.fail(f"{value} is not in {self.describe()}", param, ctx)
        return number

    def describe(self) -> str:
        """The accepted range, e.g. ``x>0`` or ``0<=x<1``."""
        left = "" if self.min is None else f"{self.min}{'<' if self.min_open else '<='}"
        right = "" if self.max is None else f"{'<' if self.max_open else '<='}{self.max}"
        return f"{left}x{right}" if left or right else "any number"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        rng = self.describe()
        return f"{self.name.upper()}" + ("" if rng == "any number" else f" RANGE ({rng})")


def _complete_preset(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    return [n for n in preset_names() if n.startswith(incomplete)]


#: What click needs beyond the record for a few options that steer the parsing itself.
CLICK_EXTRAS: dict[str, dict[str, Any]] = {
    "config": {"is_eager": True, "callback": settings.layer_callback},
    "preset": {
        "is_eager": True,
        "callback": settings.layer_callback,
        "shell_complete": _complete_preset,
    },
}


def click_type(option: Option) -> Any:
    """The click type of a record's values (None: a plain string)."""
    bounds = (option.min, option.max, option.min_open, option.max_open)
    if option.type == "int":
        return Number(int, *bounds)
    if option.type == "float":
        return Number(float, *bounds)
    if option.type == "choice":
        return click.Choice(list(option.choices))
    if option.type == "path":
        return click.Path(dir_okay=option.path_kind != "file", file_okay=option.path_kind != "dir")
    return None


def click_option(option: Option, group: str = "") -> click.Option:
    """The click parameter of an :class:`Option`, tagged with its help group."""
    kwargs: dict[str, Any] = {"help": option.help, "multiple": option.multiple}
    if option.extra.get("removed"):  # still parsed, to say what replaces it; not shown
        kwargs["hidden"] = True
    if option.required:
        kwargs["required"] = True
    if option.metavar:
        kwargs["metavar"] = option.metavar
    if option.type == "bool":
        kwargs.update(is_flag=True, default=bool(option.default))
    else:
        default = option.default
        if option.multiple and isinstance(default, list | tuple):
            default = tuple(default)  # a cached declaration reads a JSON list back
        kwargs.update(default=default, show_default=default is not None)
        if option.required and option.default is None:
            del kwargs["default"]  # click counts an explicit None as given
        kind = click_type(option)
        if kind is not None:
            kwargs["type"] = kind
    kwargs.update(CLICK_EXTRAS.get(option.dest, {}) if not group.startswith("Plugin ") else {})
    param = click.Option([*option.flags, option.dest], **kwargs)
    param.lever_group = group or option.group or "Options"  # type: ignore[attr-defined]
    param.lever_option = option  # type: ignore[attr-defined]
    return param


def core_params(command: str) -> list[click.Option]:
    """The click parameters of ``command``'s core options, from the table."""
    return [click_option(option) for option in options_of(command)]


def table_command(name: str, **kwargs: Any) -> Callable[[Callable[..., Any]], click.Command]:
    """``click.command`` whose options are the core table's for ``name`` (after any
    arguments the function declares)."""

    def decorate(fn: Callable[..., Any]) -> click.Command:
        command = click.command(name, cls=GroupedCommand, **kwargs)(fn)
        command.params.extend(core_params(name))
        return command

    return decorate


class GroupedCommand(click.Command):
    """A command whose ``--help`` lists options in sections (core groups, then plugins)."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        groups: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            if isinstance(param, click.Argument):
                continue  # shown in the usage line
            record = param.get_help_record(ctx)
            if record is not None:
                groups.setdefault(getattr(param, "lever_group", "Options"), []).append(record)
        for title, records in groups.items():
            with formatter.section(title):
                formatter.write_dl(records)


def option_checker(ctx: click.Context) -> Callable[[str, Any], str | None]:
    """``check(dest, value)``: why ``value`` (read back from a file, not typed on the
    command line) is not acceptable for the command's option ``dest``; None when it is.
    Options the command does not know (a plugin's) are left to their own checks."""
    params = {p.name: p for p in ctx.command.params if p.name}

    def check(dest: str, value: Any) -> str | None:
        param = params.get(dest)
        if param is None or value is None:
            return None
        values = value if param.multiple else [value]
        if param.multiple and not isinstance(value, list | tuple):
            return "expected a list"
        for item in values:
            if isinstance(param, click.Option) and param.is_flag:
                if not isinstance(item, bool):
                    return "expected true or false"
                continue
            if isinstance(param.type, Number | click.Choice):
                try:
                    param.type.convert(item, param, ctx)
                except click.BadParameter as exc:
                    return exc.message
            elif not isinstance(item, str):
                return f"expected a string, found {type(item).__name__}"
        return None

    return check


def given_options(ctx: click.Context, opts: dict[str, Any]) -> dict[str, str]:
    """``{dest: flag}`` of the options the user set: on the command line, in the
    environment or in a ``--config`` file (not defaults, not a preset's values)."""
    flags = {p.name: p.opts[0] for p in ctx.command.params if p.name and p.opts}
    return {
        dest: flags.get(dest, dest)
        for dest in opts
        if dest not in settings.CONTROL_OPTIONS and settings.from_user(ctx, dest)
    }

"""The ``lever-train`` command group, and the plugin options each command gets."""

from __future__ import annotations

import functools
from typing import Any

import click
from click.core import ParameterSource

from .. import __version__, settings
from .params import click_option


@functools.cache
def installed_plugins() -> tuple[Any, ...]:
    """The installed plugins (discovered once per process)."""
    from .. import completion
    from ..plugins import discover

    found = tuple(discover())
    completion.save(found)  # what shell completion knows of plugin options
    return found


def plugin_declarations(completing: bool = False) -> list[Any]:
    """What the installed plugins add to the command line (``completion.Declared``):
    from the cache when it matches the installed plugins, so that options are parsed
    and checked without importing any plugin (or torch); else (no cache, a stale one, or
    one that records a broken plugin) from discovery, which refreshes the cache. Shell
    completion (``completing``) never discovers."""
    from .. import completion

    cached = completion.load()
    if completing:
        return cached or []
    # a plugin that was broken may work now (a dependency installed since): rediscover
    if cached is not None and not any(d.refusal for d in cached):
        return cached
    return completion.declared(installed_plugins())


def add_plugin_options(command: click.Command, name: str, declared: list[Any]) -> None:
    """Add the ``declared`` plugin options that ``name`` takes, grouped by plugin, and
    (to ``train``) the plugins' alias flags."""
    from ..plugins import alias_dest

    taken = {flag for p in command.params for flag in p.opts}
    for item in declared:
        if item.refusal:
            continue  # broken: it adds nothing
        for option in item.options:
            if name in option.commands and not taken & set(option.flags):
                command.params.append(click_option(option, f"Plugin {item.plugin}"))
        if name != "train":
            continue
        for flags, what in ((item.enable_flags, "--plugin"), (item.disable_flags, "--no-plugin")):
            for flag in flags:
                if flag in taken:
                    continue
                param = click.Option(
                    [flag, alias_dest(flag)], is_flag=True, help=f"Same as {what} {item.plugin}."
                )
                param.lever_group = "Plugins"  # type: ignore[attr-defined]
                param.lever_alias = item.plugin  # type: ignore[attr-defined]
                command.params.append(param)


ENVIRONMENT = ParameterSource.ENVIRONMENT


class OneLineError(click.ClickException):
    """A command-line mistake: one ``error:`` line on stderr and exit status 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        """Print ``error: MESSAGE``."""
        click.echo(f"error: {self.format_message()}", err=True, file=file)


def usage_message(exc: click.UsageError) -> str:
    """Click's message for a bad command line, as one line naming the flag."""
    if isinstance(exc, click.MissingParameter) and isinstance(exc.param, click.Argument):
        return f"missing argument {exc.param.human_readable_name}"
    if isinstance(exc, click.MissingParameter) and exc.param is not None and exc.param.opts:
        return f"missing option {exc.param.opts[0]}"
    if isinstance(exc, click.BadParameter) and exc.param is not None and exc.param.opts:
        where = exc.param.opts[0]
        ctx, name = exc.ctx, exc.param.name
        if ctx is not None and name and ctx.get_parameter_source(name) == ENVIRONMENT:
            where = f"environment variable {settings.envvar_name(ctx, name)} ({where})"
        if exc.message:
            return f"{where}: {exc.message.rstrip('.')}"
    return " ".join(exc.format_message().split())


class LeverGroup(click.Group):
    """The command group: ``lever-train --beam-data ...`` means ``lever-train train ...``;
    commands that take plugin options get them when first looked up, from the cache of
    plugin options when it matches the installed plugins (so that parsing imports no
    plugin and no torch), else by discovering the plugins."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["train", *args]
        return super().parse_args(ctx, args)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None and not getattr(command, "lever_ready", False):
            completing = ctx is not None and ctx.resilient_parsing
            add_plugin_options(command, cmd_name, plugin_declarations(completing))
            command.lever_ready = True  # type: ignore[attr-defined]
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # one line, as every user error
            raise OneLineError(usage_message(exc)) from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list of ``lever-train --help``, from the commands' own short help:
        no plugin options are built, so no plugin (and no torch) is imported."""
        rows = []
        for name in self.list_commands(ctx):
            command = self.commands.get(name)
            if command is None or command.hidden:
                continue
            rows.append((name, command.get_short_help_str(formatter.width - 6 - len(name))))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LeverGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lever-train")
def main() -> None:
    """Train a selection policy that picks in-context demonstrations for each query
    (RCE, then GRPO, and any phase a plugin adds), and use it (select, evaluate).

    Run `lever-train train --help` for the training options (`train` may be
    omitted), `lever-train plugins` for the installed plugins.
    """

"""The ``lever-train`` command group, and the plugin options each command gets."""

from __future__ import annotations

import functools
from typing import Any

import click

from .. import __version__
from .params import click_option


@functools.cache
def installed_plugins() -> tuple[Any, ...]:
    """The installed plugins (discovered once per process)."""
    from .. import completion
    from ..plugins import discover

    found = tuple(discover())
    completion.save(found)  # what shell completion knows of plugin options
    return found


def add_plugin_options(command: click.Command, name: str) -> click.Command:
    """Add every installed plugin's options that ``name`` takes, grouped by plugin, and
    (to ``train``) the plugins' alias flags."""
    from ..plugins import alias_dest

    for info in installed_plugins():
        for option in info.options:
            if name in option.commands:
                command.params.append(click_option(option, f"Plugin {info.name}"))
        if name != "train" or info.broken:
            continue
        for flags, what in ((info.enable_flags, "--plugin"), (info.disable_flags, "--no-plugin")):
            for flag in flags:
                param = click.Option(
                    [flag, alias_dest(flag)], is_flag=True, help=f"Same as {what} {info.name}."
                )
                param.lever_group = "Plugins"  # type: ignore[attr-defined]
                command.params.append(param)
    return command


def add_cached_plugin_options(command: click.Command, name: str) -> click.Command:
    """Shell completion: add the plugin options the completion cache knows, importing no
    plugin (see :mod:`lever_trainer.completion`)."""
    from .. import completion

    taken = {flag for p in command.params for flag in p.opts}
    for plugin, options in completion.load():
        for option in options:
            if name in option.commands and not taken & set(option.flags):
                command.params.append(click_option(option, f"Plugin {plugin}"))
    return command


class LeverGroup(click.Group):
    """The command group: ``lever-train --beam-data ...`` means ``lever-train train ...``;
    commands that take plugin options get them when first looked up (shell completion
    takes them from a cache instead, so that it never imports a plugin or torch)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["train", *args]
        return super().parse_args(ctx, args)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None and not getattr(command, "lever_ready", False):
            if ctx is not None and ctx.resilient_parsing:  # shell completion
                add_cached_plugin_options(command, cmd_name)
            else:
                add_plugin_options(command, cmd_name)
            command.lever_ready = True  # type: ignore[attr-defined]
        return command

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

"""Where a command's option values come from: command line, environment, config, preset.

``lever-train train`` resolves every option from, highest precedence first:

1. the command line;
2. an environment variable ``LEVER_TRAIN_<DEST>`` (``LEVER_TRAIN_RCE_LR=1e-3``);
3. ``--config FILE`` (TOML or JSON, or a run's ``run_config.json``);
4. ``--preset NAME`` (a config shipped in ``lever_trainer/presets``);
5. the option's default.

Layers 3 and 4 become click's ``default_map``, which click consults after the command
line and the environment, so the order above is click's own. ``--plugin`` and
``--no-plugin`` lists are the exception: they add up across layers (a later layer's
``--plugin X`` cancels an earlier ``--no-plugin X``), so a config that pins plugins
keeps them when one more is named on the command line.

This module is the click side of :mod:`lever_trainer.config`; it does not import torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import click
from click.core import ParameterSource

from .config import ConfigLayer, OptionNames, load_config, load_preset, merge_lists, to_toml
from .coreoptions import control_dests
from .errors import LeverError

#: Prefix of the environment variables that set ``train`` options.
ENV_PREFIX = "LEVER_TRAIN"
#: Options that steer the resolution itself; never recorded, never in a config.
CONTROL_OPTIONS = control_dests()

_META = "lever_trainer.settings"


class ConfigError(click.ClickException):
    """A bad config file or preset: one ``error:`` line and exit status 2."""

    exit_code = 2

    def show(self, file: IO[Any] | None = None) -> None:
        """Print ``error: MESSAGE`` to stderr."""
        click.echo(f"error: {self.format_message()}", err=True, file=file)


def option_names(command: click.Command) -> OptionNames:
    """Every name a config may use for ``command``'s options."""
    spellings: dict[str, str] = {}
    paths: set[str] = set()
    multiple: set[str] = set()
    for param in command.params:
        if not isinstance(param, click.Option) or not param.name:
            continue
        spellings[param.name] = param.name
        for flag in (*param.opts, *param.secondary_opts):
            spellings.setdefault(flag.lstrip("-"), param.name)
        if isinstance(param.type, click.Path):
            paths.add(param.name)
        if param.multiple:
            multiple.add(param.name)
    return OptionNames(spellings, frozenset(paths), frozenset(multiple))


def _state(ctx: click.Context) -> dict[str, Any]:
    state: dict[str, Any] = ctx.meta.setdefault(_META, {"layers": [], "loaded": {}})
    return state


def layer_callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Callback of the eager ``--preset`` and ``--config`` options: read the files and
    make their values the command's ``default_map``."""
    if ctx.resilient_parsing:  # shell completion: read nothing
        return value
    state = _state(ctx)
    state[param.name or ""] = value
    try:
        layers = _read_layers(ctx, state)
    except LeverError as exc:
        raise ConfigError(str(exc)) from None
    params = {p.name: p for p in ctx.command.params if p.name}
    defaults: dict[str, Any] = {}
    for layer in layers:
        for dest, setting in layer.values.items():
            try:  # a bad value names the file and key, not just the flag
                params[dest].type_cast_value(ctx, setting)
            except click.BadParameter as exc:
                where = layer.path or layer.source
                raise ConfigError(
                    f"{where}: {layer.keys.get(dest, dest)}: {exc.format_message()}"
                ) from None
        defaults.update(layer.values)
    ctx.default_map = defaults
    state["layers"] = layers
    return value


def _read_layers(ctx: click.Context, state: dict[str, Any]) -> list[ConfigLayer]:
    names = option_names(ctx.command)
    loaded: dict[tuple[str, str], ConfigLayer] = state["loaded"]
    layers: list[ConfigLayer] = []
    config_layer = None
    config_path = state.get("config")
    if config_path:
        key = ("config", str(config_path))
        if key not in loaded:
            loaded[key] = load_config(Path(config_path), names)
        config_layer = loaded[key]
    preset = state.get("preset") or (config_layer.preset if config_layer else None)
    if preset:
        key = ("preset", preset)
        if key not in loaded:
            loaded[key] = load_preset(preset, names)
        layers.append(loaded[key])
    if config_layer is not None:
        layers.append(config_layer)
    return layers


def layers(ctx: click.Context) -> list[ConfigLayer]:
    """The preset and config layers of this invocation, lowest precedence first."""
    found: list[ConfigLayer] = _state(ctx)["layers"]
    return found


def from_user(ctx: click.Context, dest: str) -> bool:
    """Whether the value of ``dest`` was set by the user (command line, environment, or
    a config file; not a preset, not a default, not a run_config's recorded default)."""
    source = ctx.get_parameter_source(dest)
    if source in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
        return True
    if source == ParameterSource.DEFAULT_MAP:
        return any(dest in layer.given for layer in layers(ctx))
    return False


def origin(ctx: click.Context, dest: str) -> str:
    """Where the value of ``dest`` came from, in words (for ``--print-config``)."""
    source = ctx.get_parameter_source(dest)
    if source == ParameterSource.COMMANDLINE:
        return "command line"
    if source == ParameterSource.ENVIRONMENT:
        return f"environment {envvar_name(ctx, dest)}"
    if source == ParameterSource.DEFAULT_MAP:
        for layer in reversed(layers(ctx)):
            if dest in layer.values:
                return layer.source
    return "default"


def envvar_name(ctx: click.Context, dest: str) -> str:
    """The environment variable that sets option ``dest`` of this command."""
    return f"{ctx.auto_envvar_prefix or ENV_PREFIX}_{dest.upper()}"


def resolve_plugin_lists(ctx: click.Context, opts: dict[str, Any]) -> None:
    """Add up ``--plugin``/``--no-plugin`` over the layers (see the module docstring)."""
    stack: list[tuple[list[str] | None, list[str] | None]] = [
        (layer.values.get("plugins_on"), layer.values.get("plugins_off")) for layer in layers(ctx)
    ]
    top_on = opts.get("plugins_on") if _above_configs(ctx, "plugins_on") else None
    top_off = opts.get("plugins_off") if _above_configs(ctx, "plugins_off") else None
    stack.append((list(top_on or ()), list(top_off or ())))
    on, off = merge_lists(stack)
    opts["plugins_on"], opts["plugins_off"] = tuple(on), tuple(off)


def _above_configs(ctx: click.Context, dest: str) -> bool:
    return ctx.get_parameter_source(dest) in (
        ParameterSource.COMMANDLINE,
        ParameterSource.ENVIRONMENT,
    )


def check_environment(ctx: click.Context, environ: Mapping[str, str] | None = None) -> None:
    """Refuse a ``LEVER_TRAIN_*`` variable that names no option of the command: a typo
    (``LEVER_TRAIN_RCE_LRR``) would otherwise leave the intended setting unapplied."""
    import difflib
    import os

    names = {f"{ENV_PREFIX}_{p.name.upper()}" for p in ctx.command.params if p.name}
    env = os.environ if environ is None else environ
    for var in sorted(env):
        if not var.startswith(f"{ENV_PREFIX}_") or var in names:
            continue
        close = difflib.get_close_matches(var, sorted(names), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise LeverError(
            f"environment variable {var}: no option of `lever-train {ctx.command.name}` "
            f"is called that{hint}; correct its name or unset it"
        )


def warnings(ctx: click.Context) -> list[str]:
    """What reading the layers had to say (options a run_config holds that are unknown)."""
    return [w for layer in layers(ctx) for w in layer.warnings]


def render(
    ctx: click.Context, opts: Mapping[str, Any], active_dests: set[str] | None = None
) -> str:
    """The resolved configuration as TOML that ``--config`` reads back; each value with a
    comment saying where it came from. ``active_dests``: the options of active plugins
    and the core (others are left out); None keeps every option."""
    rows: list[tuple[str, Any, str]] = []
    command = ctx.command
    for param in command.params:
        dest = param.name
        if not isinstance(param, click.Option) or not dest or dest in CONTROL_OPTIONS:
            continue
        if param.hidden:  # a removed option, parsed only to say what replaces it
            continue
        if active_dests is not None and dest not in active_dests:
            continue
        value = opts.get(dest)
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(param.type, click.Path) and isinstance(value, str) and value:
            value = str(Path(value).expanduser().absolute())  # valid from any folder
        where = origin(ctx, dest)
        if dest in ("plugins_on", "plugins_off") and layers(ctx):
            where = "added up over " + ", ".join(
                [layer.source for layer in layers(ctx)] + ["the command line"]
            )
        key = param.opts[0].lstrip("-") if param.opts[0].startswith("--") else dest
        rows.append((key, value, where))
    return to_toml(rows)


__all__ = [
    "CONTROL_OPTIONS",
    "ENV_PREFIX",
    "ConfigError",
    "envvar_name",
    "from_user",
    "layer_callback",
    "layers",
    "option_names",
    "origin",
    "render",
    "resolve_plugin_lists",
    "warnings",
]

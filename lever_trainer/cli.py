"""``lever-train``: the command line. It parses options and reports; runs are assembled
in :mod:`lever_trainer.run`.

``lever-train [train] OPTIONS`` trains; ``lever-train plugins`` lists installed
plugins; ``lever-train demo-data DIR`` writes the synthetic demo dataset. Every
:class:`~lever_trainer.errors.LeverError` becomes one line on stderr and exit status 2.
Options that plugins declare (``add_options`` hook) are added to the commands that take
them and shown in ``--help`` under the plugin's name.
"""

from __future__ import annotations

import functools
import json
import math
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import __version__, settings
from .config import preset_names
from .errors import Interrupted, LeverError
from .options import Option

#: Exit status after a clean stop on SIGINT/SIGTERM (a resumable snapshot was written).
EXIT_STOPPED = 3
#: Exit status after a second Ctrl-C stopped the run at once.
EXIT_INTERRUPTED = 130


def warn(message: str) -> None:
    """Print a warning line to stderr."""
    click.echo(message, err=True)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a LeverError into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LeverError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper


# ------------------------------------------------------------------ option types
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


def click_option(option: Option, group: str) -> click.Option:
    """The click parameter of a plugin's :class:`Option`, tagged with its help group."""
    kwargs: dict[str, Any] = {"help": option.help, "multiple": option.multiple}
    if option.extra.get("removed"):  # still parsed, to say what replaces it; not shown
        kwargs["hidden"] = True
    if option.metavar:
        kwargs["metavar"] = option.metavar
    if option.type == "bool":
        kwargs.update(is_flag=True, default=bool(option.default))
    else:
        kwargs.update(default=option.default, show_default=option.default is not None)
        if option.type == "int":
            kwargs["type"] = Number(int, option.min, option.max, option.min_open, option.max_open)
        elif option.type == "float":
            kwargs["type"] = Number(float, option.min, option.max, option.min_open, option.max_open)
        elif option.type == "choice":
            kwargs["type"] = click.Choice(list(option.choices))
        elif option.type == "path":
            kwargs["type"] = click.Path()
    param = click.Option([*option.flags, option.dest], **kwargs)
    param.lever_group = group  # type: ignore[attr-defined]
    return param


def opt(*decls: str, group: str = "Options", **kwargs: Any) -> Callable[[Any], Any]:
    """``click.option`` that also records the help group of the option."""

    def decorate(fn: Any) -> Any:
        fn = click.option(*decls, **kwargs)(fn)
        fn.__click_params__[-1].lever_group = group
        return fn

    return decorate


class GroupedCommand(click.Command):
    """A command whose ``--help`` lists options in sections (core groups, then plugins)."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        groups: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                groups.setdefault(getattr(param, "lever_group", "Options"), []).append(record)
        for title, records in groups.items():
            with formatter.section(title):
                formatter.write_dl(records)


# ------------------------------------------------------------------ shared options
def embedding_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--img-emb, --cand-emb and --emb-key (shared by train, select and evaluate)."""
    fn = opt(
        "--emb-key",
        group="Data",
        default=None,
        help="Tensor name inside a multi-tensor embedding file.",
    )(fn)
    fn = opt(
        "--cand-emb",
        "cand_emb",
        group="Data",
        type=click.Path(dir_okay=False),
        default=None,
        help="Separate candidate embedding table (default: --img-emb).",
    )(fn)
    fn = opt(
        "--img-emb",
        "--img_emb",
        "img_emb",
        group="Data",
        type=click.Path(dir_okay=False),
        help="Embedding table [N, d]: .pt/.pth, .npy or .safetensors.  [required]",
    )(fn)
    return fn


def data_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The core options that decide how RL data becomes a table (train, prepare, select)."""
    decorators = [
        opt(
            "--beam-data",
            "--beam_data",
            "beam_data",
            group="Data",
            type=click.Path(dir_okay=False),
            help="RL data JSON (format: docs/algorithm.md#rl-data).  [required]",
        ),
        opt(
            "--max-pool",
            "--max_pool",
            "max_pool",
            group="Data",
            type=Number(int, 1),
            default=None,
            metavar="N",
            help="Cut each query's pool to its first N ids (default: keep every pool "
            "whole; refused, naming this flag, when padding to the largest pool would "
            "not fit in memory).",
        ),
        opt(
            "--keep-fallback",
            "--no_skip_fallback_reward",
            "keep_fallback",
            group="Data",
            is_flag=True,
            help="Keep candidates whose evaluation fell back.",
        ),
        opt(
            "--require-positive-query",
            "--require_positive_query",
            "require_positive",
            group="Data",
            is_flag=True,
            help="Keep only queries with at least one vqa_correct == 1 candidate.",
        ),
        opt(
            "--cache-dir",
            "cache_dir",
            group="Data",
            type=click.Path(file_okay=False),
            default=None,
            metavar="DIR",
            help="Keep the prepared cache of --beam-data in DIR instead of beside the file "
            "(for read-only or shared datasets).",
        ),
        opt(
            "--gen-methods",
            "--gen_methods",
            "gen_methods",
            group="Data",
            default=None,
            metavar="LIST",
            help="Keep only candidates of these gen_method values, comma-separated "
            "(e.g. beam,sample).",
        ),
        opt(
            "--reward-mode",
            "--reward_mode",
            "reward_mode",
            group="Rewards",
            default="hard_plus_soft",
            show_default=True,
            help="Raw-reward formula, from a plugin.",
        ),
        opt(
            "--hard-weight",
            "--hard_weight",
            "hard_weight",
            group="Rewards",
            type=Number(float),
            default=1.0,
            show_default=True,
            help="wh: weight of vqa_correct.",
        ),
        opt(
            "--soft-weight",
            "--soft_weight",
            "soft_weight",
            group="Rewards",
            type=Number(float),
            default=1.0,
            show_default=True,
            help="ws: weight of vqa_acc_score / vqa_gt_prob.",
        ),
        opt(
            "--rel-weight",
            "--rel_weight",
            "rel_weight",
            group="Rewards",
            type=Number(float),
            default=0.1,
            show_default=True,
            help="wl: weight of vqa_rel_score.",
        ),
        opt(
            "--normalize",
            "--normalize_method",
            "normalize",
            group="Rewards",
            default="z_score_clamp",
            show_default=True,
            help="Group normaliser, from a plugin.",
        ),
    ]
    for decorator in reversed(decorators):
        fn = decorator(fn)
    return fn


def plugin_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--plugin and --no-plugin."""
    fn = opt(
        "--no-plugin",
        "plugins_off",
        group="Plugins",
        multiple=True,
        metavar="NAME",
        help="Disable a plugin that is on by default (repeatable).",
    )(fn)
    fn = opt(
        "--plugin",
        "plugins_on",
        group="Plugins",
        multiple=True,
        metavar="NAME",
        help="Enable an installed plugin (repeatable).",
    )(fn)
    return fn


def policy_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--policy and the trunk's options, which every policy may read."""
    decorators = [
        opt(
            "--policy",
            group="Policy",
            default="cosine-bilinear",
            show_default=True,
            metavar="NAME",
            help="The policy to train, built by a plugin (see `lever-train plugins`).",
        ),
        opt(
            "--hidden-dim",
            "--hidden_dim",
            "hidden_dim",
            group="Policy",
            type=Number(int, 1),
            default=None,
            help="Policy width (default 256, or the --sft-ckpt's).",
        ),
        opt(
            "--num-layers",
            "--num_layers",
            "num_layers",
            group="Policy",
            type=Number(int, 1, 64),
            default=None,
            help="Cross-attention layers (default 1, or the --sft-ckpt's).",
        ),
        opt(
            "--num-heads",
            "--num_heads",
            "num_heads",
            group="Policy",
            type=Number(int, 1),
            default=None,
            help="Attention heads (default 1); must divide the width.",
        ),
        opt(
            "--dropout",
            group="Policy",
            type=Number(float, 0, 1, max_open=True),
            default=None,
            help="Dropout on the query state and item keys in training (default 0.5).",
        ),
        opt(
            "--attn-dropout",
            "--attn_dropout",
            "attn_dropout",
            group="Policy",
            type=Number(float, 0, 1, max_open=True),
            default=None,
            help="Dropout on the attention weights in training (default 0.1).",
        ),
        opt(
            "--policy-temperature",
            "temperature",
            group="Policy",
            type=Number(float, 0, min_open=True),
            default=None,
            help="Logit temperature tau_p of the pointer scores (default 0.1).",
        ),
    ]
    for decorator in reversed(decorators):
        fn = decorator(fn)
    return fn


def judge_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--judge, --store, --no-store and --judge-timeout."""
    decorators = [
        opt(
            "--judge",
            group="Judge",
            default=None,
            metavar="NAME",
            help="Downstream judge (an environment plugin): validation then also judges "
            "the policy's free greedy selection; online phases use it.",
        ),
        opt(
            "--store",
            group="Judge",
            type=click.Path(dir_okay=False),
            default=None,
            help="SQLite verdict store shared by runs (default: "
            "$XDG_CACHE_HOME/lever-train/verdicts.sqlite).",
        ),
        opt("--no-store", group="Judge", is_flag=True, help="Keep verdicts in memory only."),
        opt(
            "--judge-timeout",
            group="Judge",
            type=Number(float, 0),
            default=0.0,
            show_default=True,
            metavar="SECONDS",
            help="Fail the run (with a snapshot to resume from) when one call to the judge "
            "takes longer; 0: no limit. A stop signal ends the wait at once either way.",
        ),
    ]
    for decorator in reversed(decorators):
        fn = decorator(fn)
    return fn


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


# ------------------------------------------------------------------ commands
@functools.cache
def installed_plugins() -> tuple[Any, ...]:
    """The installed plugins (discovered once per process)."""
    from . import completion
    from .plugins import discover

    found = tuple(discover())
    completion.save(found)  # what shell completion knows of plugin options
    return found


def add_plugin_options(command: click.Command, name: str) -> click.Command:
    """Add every installed plugin's options that ``name`` takes, grouped by plugin, and
    (to ``train``) the plugins' alias flags."""
    from .plugins import alias_dest

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
    from . import completion

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


@main.command(
    "train", cls=GroupedCommand, context_settings={"auto_envvar_prefix": settings.ENV_PREFIX}
)
@opt(
    "--config",
    group="Configuration",
    type=click.Path(dir_okay=False),
    default=None,
    is_eager=True,
    callback=settings.layer_callback,
    metavar="FILE",
    help="Read option values from a TOML or JSON file (a run's run_config.json works: "
    "it repeats that run). Precedence: command line > LEVER_TRAIN_* environment > "
    "--config > --preset > defaults.",
)
@opt(
    "--preset",
    group="Configuration",
    default=None,
    is_eager=True,
    callback=settings.layer_callback,
    metavar="NAME",
    shell_complete=lambda ctx, param, incomplete: [
        n for n in preset_names() if n.startswith(incomplete)
    ],
    help="Start from a bundled configuration (`upstream`: the reference algorithm of "
    "the project started from, every setting pinned).",
)
@opt(
    "--print-config",
    group="Configuration",
    is_flag=True,
    help="Print the resolved configuration as TOML (a valid --config file, each value "
    "with where it came from) and exit without training.",
)
@data_options
@opt(
    "--val-ratio",
    "--val_ratio",
    "val_ratio",
    group="Data",
    type=Number(float, 0, 1, max_open=True),
    default=0.2,
    show_default=True,
    help="Share of queries kept for validation (see --val-split).",
)
@opt(
    "--val-split",
    group="Data",
    type=click.Choice(["random", "last"]),
    default="random",
    show_default=True,
    help="Which queries validate: random (drawn with --split-seed) or last (the highest "
    "query ids, the same split for every seed).",
)
@opt(
    "--split-seed",
    group="Data",
    type=Number(int, 0, 2**63 - 1),
    default=None,
    metavar="N",
    help="Seed of the random validation split (default: --seed, so each seed also "
    "draws its own split).",
)
@opt(
    "--no-cache",
    group="Data",
    is_flag=True,
    help="Neither read nor write the prepared cache next to --beam-data.",
)
@embedding_options
@policy_options
@opt(
    "--sft-ckpt",
    "--sft_ckpt",
    "sft_ckpt",
    group="Policy",
    type=click.Path(dir_okay=False),
    default=None,
    help="Starting checkpoint (safetensors, torch.save dict, Lightning .ckpt).",
)
@opt(
    "--trust-checkpoint",
    group="Policy",
    is_flag=True,
    help="Allow a full (unsafe) pickle load of --sft-ckpt.",
)
@opt(
    "--partial-load",
    group="Policy",
    is_flag=True,
    help="Start from an --sft-ckpt that lacks some of the policy's weights: those start "
    "from the --seed initialisation (listed in the log). Not needed for a checkpoint of "
    "another policy (its missing modules are expected).",
)
@opt(
    "--output-dir",
    "--output_dir",
    "output_dir",
    group="Run",
    type=click.Path(file_okay=False),
    help="Where checkpoints and metrics go.  [required]",
)
@opt(
    "--overwrite",
    group="Run",
    is_flag=True,
    help="Remove the files of a previous run in --output-dir (checkpoints, metrics, "
    "snapshot, run_config.json; nothing else) before this run writes.",
)
@opt(
    "--batch-size",
    "--batch_size",
    "batch_size",
    group="Run",
    type=Number(int, 1),
    default=32,
    show_default=True,
    help="Queries per optimiser step.",
)
@opt(
    "--weight-decay",
    "--weight_decay",
    "weight_decay",
    group="Run",
    type=Number(float, 0),
    default=0.01,
    show_default=True,
    help="AdamW weight decay of every phase.",
)
@opt(
    "--grad-clip",
    "--grad_clip",
    "grad_clip",
    group="Run",
    type=Number(float, 0, min_open=True),
    default=1.0,
    show_default=True,
    help="Gradient-norm clip of every step.",
)
@opt(
    "--seed",
    group="Run",
    type=Number(int, 0, 2**63 - 1),
    default=42,
    show_default=True,
    help="Seed of the initialisation, dropout, the query order, sampling, and the "
    "random validation split (unless --split-seed).",
)
@opt(
    "--device",
    group="Run",
    default="auto",
    show_default=True,
    help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N; asking for CUDA "
    "without it is an error.",
)
@opt(
    "--log-every",
    group="Run",
    type=Number(int, 1),
    default=10,
    show_default=True,
    metavar="N",
    help="Log the step values (steps.jsonl, trackers) every N optimiser steps, and at "
    "the last step of every epoch.",
)
@opt(
    "--deterministic",
    group="Run",
    is_flag=True,
    help="Deterministic algorithms only (also on CUDA); slower on GPU.",
)
@opt(
    "--max-bad-steps",
    group="Run",
    type=Number(int, 1),
    default=10,
    show_default=True,
    help="Stop after this many consecutive steps with a non-finite loss or gradient.",
)
@opt(
    "--keep-last",
    group="Run",
    type=Number(int, 1),
    default=None,
    help="Keep only the newest N epoch checkpoints (default: all).",
)
@opt(
    "--best-metric",
    group="Run",
    default=None,
    metavar="NAME",
    help="The metric that chooses best.safetensors among the starting policy and the "
    "epochs (default: judge_correct@greedy with --judge, else policy_reward@1).",
)
@opt(
    "--best-mode",
    group="Run",
    type=click.Choice(["max", "min"]),
    default="max",
    show_default=True,
    help="Whether a larger or smaller --best-metric is better.",
)
@opt(
    "--best-rule",
    group="Run",
    type=click.Choice(["paired", "value"]),
    default="paired",
    show_default=True,
    help="paired: an epoch becomes best.safetensors only when it beats the best so far "
    "beyond the noise (paired 95 % interval over the validation queries); value: "
    "whenever its --best-metric value is better.",
)
@opt(
    "--resume",
    group="Run",
    type=click.Path(file_okay=False),
    default=None,
    metavar="RUN_DIR",
    help="Continue the run in RUN_DIR from its newest snapshot, with its options; more "
    "epochs (e.g. --rce-epochs 8) extend it, and other options are applied where sound "
    "or refused.",
)
@judge_options
@plugin_options
@click.pass_context
@user_errors
def train(ctx: click.Context, **opts: Any) -> None:
    """Train on RL data: every active phase in order (RCE, then GRPO, by default)."""
    settings.check_environment(ctx)
    settings.resolve_plugin_lists(ctx, opts)
    for line in settings.warnings(ctx):
        warn(line)
    if opts.pop("print_config", False):
        print_config(ctx, opts)
        return
    from .run import assemble
    from .trainer import SNAPSHOT_NAME, StopRequested

    run = assemble(opts, given_options(ctx, opts), click.echo, warn, check=option_checker(ctx))
    if run.complete is not None:
        click.echo(run.complete)
        return
    trainer, output_dir = run.trainer, run.output_dir
    assert trainer is not None
    install_stop_handlers(trainer)
    try:
        state = trainer.fit(resume=run.resume)
    except StopRequested as stop:
        click.echo(
            f"stopped by {stop.reason} after phase {stop.phase} epoch {stop.epoch} step "
            f"{stop.step}; snapshot {output_dir / SNAPSHOT_NAME}",
            err=True,
        )
        click.echo(f"resume with: lever-train --resume {output_dir}", err=True)
        sys.exit(EXIT_STOPPED)
    except KeyboardInterrupt:
        click.echo(
            f"interrupted at once; the newest complete snapshot is in {output_dir}, "
            f"resume with: lever-train --resume {output_dir}",
            err=True,
        )
        sys.exit(EXIT_INTERRUPTED)
    except LeverError as exc:
        if getattr(exc, "snapshot", None):
            raise LeverError(
                f"{exc}; a snapshot of the last completed step is in "
                f"{output_dir}, resume with: lever-train --resume {output_dir}"
            ) from None
        raise
    finally:
        restore_signal_handlers()
        run.release()
    if state.history:
        click.echo(f"done: {len(state.history)} epochs, checkpoints in {output_dir}")


def print_config(ctx: click.Context, opts: dict[str, Any]) -> None:
    """``--print-config``: the resolved options of the core and the active plugins."""
    from .run import activate_plugins

    plugins = activate_plugins(opts, given_options(ctx, opts), warn)
    owned = {o.dest for p in installed_plugins() for o in p.options}
    active = {d for d in opts if d not in owned} | set(plugins.options())
    click.echo(
        "# lever-train configuration, resolved (command line > environment > --config > "
        "--preset > defaults)"
    )
    click.echo(f"# active plugins: {', '.join(plugins.names) or 'none'}")
    click.echo(settings.render(ctx, opts, active), nl=False)


_saved_handlers: dict[int, Any] = {}


def install_stop_handlers(trainer: Any) -> None:
    """SIGINT/SIGTERM: finish the step, write a snapshot, stop; a second SIGINT stops at once."""

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if trainer.stop_requested is not None and signum == signal.SIGINT:
            raise Interrupted
        trainer.stop_requested = name
        click.echo(
            f"\n{name}: finishing the current step, then writing a resumable snapshot "
            "(Ctrl-C again to stop at once)",
            err=True,
        )

    for sig in (signal.SIGINT, signal.SIGTERM):
        _saved_handlers[sig] = signal.signal(sig, handler)


def restore_signal_handlers() -> None:
    """Put back the handlers :func:`install_stop_handlers` replaced."""
    while _saved_handlers:
        sig, old = _saved_handlers.popitem()
        signal.signal(sig, old)


@main.command("plugins")
def plugins_cmd() -> None:
    """List installed plugins: name, distribution, version, hooks, options, default state."""
    found = installed_plugins()
    if not found:
        click.echo("no plugins installed")
        return
    for p in found:
        dist = f"{p.distribution or '?'} {p.version or '?'}"
        if p.broken:
            click.echo(f"{p.name}  [{dist}]  BROKEN: {p.error}")
            continue
        default = "on by default" if p.enabled_by_default else "off by default"
        click.echo(f"{p.name}  [{dist}]  {default}")
        if p.description:
            click.echo(f"    {p.description}")
        click.echo(f"    hooks: {', '.join(p.hooks) or 'none'}")
        if p.policies:
            click.echo(f"    policies: {', '.join(p.policies)}")
        aliases = [*p.enable_flags, *(f"{f} (= --no-plugin)" for f in p.disable_flags)]
        if aliases:
            click.echo(f"    aliases: {', '.join(aliases)}")
        if p.options:
            shown = ", ".join(
                f"{o.name} (removed: {o.extra['removed']})"
                if o.extra.get("removed")
                else f"{o.name} ({o.default!r})"
                if o.type != "bool"
                else o.name
                for o in p.options
            )
            click.echo(f"    options: {shown}")


@main.command("demo-data")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--queries",
    type=click.IntRange(min=5),
    default=400,
    show_default=True,
    help="Number of queries.",
)
@click.option(
    "--pool",
    type=click.IntRange(min=4),
    default=32,
    show_default=True,
    help="Candidate demonstrations per query.",
)
@click.option(
    "--dim", type=click.IntRange(min=2), default=64, show_default=True, help="Embedding width."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the dataset.")
@user_errors
def demo_data(out_dir: str, queries: int, pool: int, dim: int, seed: int) -> None:
    """Write a synthetic RL dataset with a learnable signal into OUT_DIR."""
    from .demo import DemoSpec, demo_train_command, write_demo

    spec = DemoSpec(queries=queries, demos=max(3 * queries, pool), pool=pool, dim=dim, seed=seed)
    data_path, emb_path = write_demo(Path(out_dir), spec)
    click.echo(f"wrote {data_path} and {emb_path}")
    click.echo(f"train with: {demo_train_command(data_path, emb_path)}")
    click.echo("then draw the curves: lever-train plot runs/demo")


@main.command("plot")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(), metavar="RUN_DIR...")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False),
    default=None,
    help="Picture to write: .png, .svg or .pdf (default: RUN_DIR/curves.png for one run).",
)
@click.option("--title", default=None, help="A title above the panels.")
@user_errors
def plot_cmd(run_dirs: tuple[str, ...], output: str | None, title: str | None) -> None:
    """Draw the curves of one or more runs (overlaid) from their metrics.jsonl and
    steps.jsonl: training and validation loss, KL and its weight, policy_reward@1
    against random and oracle, normalized_gain, and downstream judge_* metrics.

    Needs matplotlib: pip install 'lever-trainer[plot]'.
    """
    from .plot import draw, read_run, run_names

    paths = [Path(d) for d in run_dirs]
    if output is None:
        if len(paths) > 1:
            raise LeverError("--output: name the picture to write when plotting several runs")
        output = str(paths[0] / "curves.png")
    runs = [read_run(p, n) for p, n in zip(paths, run_names(paths), strict=True)]
    for run in runs:
        for note in run.notes:
            click.echo(f"note: {note}", err=True)
    draw(runs, Path(output), title)
    click.echo(f"wrote {output} ({len(runs)} run{'s' if len(runs) > 1 else ''})")


@main.command("prepare", cls=GroupedCommand)
@data_options
@plugin_options
@click.pass_context
@user_errors
def prepare(ctx: click.Context, **opts: Any) -> None:
    """Convert RL data JSON into its prepared binary form, next to the file (or in
    --cache-dir).

    Training reads the prepared form instead of the JSON whenever it was made from
    the same bytes (sha256) with the same data options; otherwise it rebuilds it.
    """
    from .run import activate_plugins, load_data

    if not opts.get("beam_data"):
        raise LeverError("missing option --beam-data")
    plugins = activate_plugins(opts, given_options(ctx, opts), warn)
    _, report = load_data(opts, plugins, click.echo, warn)
    for line in report.lines():
        click.echo(line)
    if not report.cache:
        raise LeverError(f"{report.cache_path}: could not write the prepared form")


def query_file_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--queries (alias --beam-data) and --max-pool: queries with pools, with or without
    logged sequences."""
    fn = opt(
        "--max-pool",
        "--max_pool",
        "max_pool",
        group="Data",
        type=Number(int, 1),
        default=None,
        metavar="N",
        help="Cut each query's pool to its first N ids (default: keep every pool whole; "
        "refused, naming this flag, when padding to the largest pool would not fit in "
        "memory).",
    )(fn)
    fn = opt(
        "--queries",
        "--beam-data",
        "--beam_data",
        "queries",
        group="Data",
        type=click.Path(dir_okay=False),
        help="Queries with candidate pools: RL data JSON (with or without logged sequences), "
        "a {query id: [pool ids]} JSON object, or JSON Lines.  [required]",
    )(fn)
    return fn


class SelectionWriter:
    """Writes picks as they are made: JSON ``{qid: [ids]}`` (or ``{qid: {"ids",
    "scores"}}``), or JSON Lines when the output's name ends in ``.jsonl``."""

    def __init__(self, fh: Any, output: str, scores: bool) -> None:
        self.fh, self.scores, self.count = fh, scores, 0
        self.lines = Path(output).suffix.lower() in (".jsonl", ".ndjson")

    def write(self, selection: Any) -> None:
        """Append one piece of picks."""
        rows = zip(selection.query_ids, selection.picks, selection.scores, strict=True)
        parts = []
        for q, p, s in rows:
            if self.lines:
                record = {"query_id": q, "ids": p, **({"scores": s} if self.scores else {})}
                parts.append(json.dumps(record) + "\n")
            else:
                value = {"ids": p, "scores": s} if self.scores else p
                parts.append(("{" if self.count == 0 else ", ") + f'"{q}": {json.dumps(value)}')
            self.count += 1
        self.fh.write("".join(parts).encode())

    def close(self) -> None:
        """End the document (an empty selection is ``{}``)."""
        if not self.lines:
            self.fh.write(("{}\n" if self.count == 0 else "}\n").encode())


@main.command("select", cls=GroupedCommand)
@opt(
    "--ckpt",
    group="Policy",
    type=click.Path(dir_okay=False),
    help="A checkpoint of this project (or any --sft-ckpt format).  [required]",
)
@query_file_option
@embedding_options
@opt(
    "--output",
    group="Run",
    type=click.Path(dir_okay=False),
    help="Where the picks go: {query id: [global ids]} JSON, or JSON Lines (*.jsonl).  [required]",
)
@opt(
    "--shots",
    group="Run",
    type=Number(int, 1),
    default=None,
    help="Demonstrations to pick per query (default: the checkpoint's S, else 2).",
)
@opt("--scores", group="Run", is_flag=True, help="Also write each pick's probability at its step.")
@opt(
    "--batch-size",
    group="Run",
    type=Number(int, 1),
    default=512,
    show_default=True,
    help="Queries per forward pass.",
)
@opt(
    "--device",
    group="Run",
    default="auto",
    show_default=True,
    help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N.",
)
@opt(
    "--trust-checkpoint",
    group="Policy",
    is_flag=True,
    help="Allow a full (unsafe) pickle load of --ckpt.",
)
@plugin_options
@click.pass_context
@user_errors
def select_cmd(ctx: click.Context, **opts: Any) -> None:
    """Pick demonstrations for every query of a query file with a trained policy.

    The policy's free greedy selection over each query's whole pool (no logged
    sequences needed); a policy with a STOP item may pick fewer than --shots.
    """
    from .checkpoint import header_metadata
    from .data import check_pool_ids, iter_pools, load_embeddings
    from .fileio import STDOUT, open_output, output_kind
    from .policies import policy_from_checkpoint, recorded_policy
    from .run import activate_plugins, resolve_device
    from .select import select_greedy

    for name, flag in (
        ("ckpt", "--ckpt"),
        ("queries", "--queries"),
        ("img_emb", "--img-emb"),
        ("output", "--output"),
    ):
        if not opts.get(name):
            raise LeverError(f"missing option {flag}")
    output = opts["output"]
    to_stdout = output_kind(output, "--output") == STDOUT
    say = functools.partial(click.echo, err=to_stdout)  # the picks may own stdout
    queries = Path(opts["queries"])
    if not queries.is_file():
        raise LeverError(f"{queries}: file not found")
    device = resolve_device(opts["device"], warn)
    plugins = activate_plugins(opts, given_options(ctx, opts), warn)
    emb = load_embeddings(opts["img_emb"], opts["cand_emb"], opts["emb_key"])
    model, lines = policy_from_checkpoint(
        plugins, opts["ckpt"], emb.dim, opts["trust_checkpoint"], warn
    )
    for line in lines:
        say(line)
    shots = opts["shots"]
    if shots is None:
        recorded = recorded_policy(header_metadata(opts["ckpt"]))
        shots = int((recorded[1] if recorded else {}).get("shots") or 2)
    model = model.to(device)
    # Streamed: queries are read, selected and written a piece at a time, so memory
    # stays flat in the number of queries. A regular --output file appears only once
    # every query is done (an error midway leaves any previous file as it was).
    with open_output(output, "--output") as fh:
        writer = SelectionWriter(fh, output, opts["scores"])
        for pools in iter_pools(queries, opts["max_pool"], chunk=max(opts["batch_size"], 1024)):
            check_pool_ids(pools, emb, opts["queries"])
            short = pools.pool_len < shots
            if bool(short.any()):
                row = int(short.nonzero()[0, 0])
                raise LeverError(
                    f"--shots {shots}: query {int(pools.query_ids[row])}'s pool holds only "
                    f"{int(pools.pool_len[row])} ids"
                )
            try:
                selection = select_greedy(
                    model, pools, emb, shots, opts["batch_size"], device, opts["scores"]
                )
            except LeverError as exc:
                raise LeverError(f"{opts['ckpt']}: {exc}") from None
            writer.write(selection)
        writer.close()
    say(f"wrote {writer.count} selections to {'standard output' if to_stdout else output}")


@main.command("evaluate", cls=GroupedCommand)
@click.argument("checkpoints", nargs=-1, type=click.Path(dir_okay=False))
@query_file_option
@embedding_options
@judge_options
@opt(
    "--baselines",
    group="Run",
    default=",".join(("random", "cosine", "cosine-reversed", "start", "best")),
    show_default=True,
    metavar="LIST",
    help="Comma-separated: random, cosine, cosine-reversed, start (the first checkpoint's "
    "starting policy), best; '' for none.",
)
@opt(
    "--shots",
    group="Run",
    type=Number(int, 1),
    default=None,
    help="Demonstrations per query (default: the data's S, else the checkpoint's).",
)
@opt(
    "--output",
    group="Run",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the results as JSON here.",
)
@opt(
    "--batch-size",
    group="Run",
    type=Number(int, 1),
    default=512,
    show_default=True,
    help="Queries per forward pass.",
)
@opt("--device", group="Run", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@opt(
    "--trust-checkpoint",
    group="Policy",
    is_flag=True,
    help="Allow a full (unsafe) pickle load of the checkpoints.",
)
@opt(
    "--reward-mode",
    "--reward_mode",
    "reward_mode",
    group="Rewards",
    default="hard_plus_soft",
    show_default=True,
    help="Raw-reward formula of judge_reward and the offline metrics.",
)
@opt(
    "--hard-weight",
    "hard_weight",
    group="Rewards",
    type=Number(float),
    default=1.0,
    show_default=True,
    help="wh: weight of vqa_correct.",
)
@opt(
    "--soft-weight",
    "soft_weight",
    group="Rewards",
    type=Number(float),
    default=1.0,
    show_default=True,
    help="ws: weight of vqa_acc_score / vqa_gt_prob.",
)
@opt(
    "--rel-weight",
    "rel_weight",
    group="Rewards",
    type=Number(float),
    default=0.1,
    show_default=True,
    help="wl: weight of vqa_rel_score.",
)
@plugin_options
@click.pass_context
@user_errors
def evaluate_cmd(ctx: click.Context, checkpoints: tuple[str, ...], **opts: Any) -> None:
    """Compare checkpoints and baselines on a query file, side by side.

    With --judge, the downstream verdicts of each selector's free greedy selection
    (judge_correct, judge_reward); where the file has logged sequences, the offline
    metrics of the policies too. A table on screen; --output writes it as JSON.
    """
    from .assess import BASELINES, evaluate, has_logged_sequences
    from .data import load_embeddings
    from .fileio import STDOUT, output_kind, write_output
    from .run import activate_plugins, load_data, make_judge, resolve_device

    for name, flag in (("queries", "--queries"), ("img_emb", "--img-emb")):
        if not opts.get(name):
            raise LeverError(f"missing option {flag}")
    to_stdout = False
    if opts["output"]:
        to_stdout = output_kind(opts["output"], "--output") == STDOUT
    say = functools.partial(click.echo, err=to_stdout)  # the JSON may own stdout
    baselines = [b.strip() for b in opts["baselines"].split(",") if b.strip()]
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise LeverError(
            f"--baselines: unknown baseline {unknown[0]!r} (known: {', '.join(BASELINES)})"
        )
    if not checkpoints and not opts.get("judge"):
        raise LeverError("nothing to measure: give checkpoints, or --judge NAME for the baselines")
    if "start" in baselines and not checkpoints:
        if ctx.get_parameter_source("baselines") != click.core.ParameterSource.DEFAULT:
            raise LeverError(
                "--baselines start: the starting policy is rebuilt from a checkpoint's "
                "metadata; give a checkpoint, or leave start out"
            )
        baselines.remove("start")  # the default list: measured when there is a checkpoint
    if not checkpoints and not baselines:
        raise LeverError("--baselines: nothing to measure: give checkpoints or baselines")
    device = resolve_device(opts["device"], warn)
    plugins = activate_plugins(opts, given_options(ctx, opts), warn)
    settings = {
        **plugins.option_defaults(),
        **opts,
        "beam_data": opts["queries"],
        "keep_fallback": False,
        "gen_methods": None,
        "require_positive": False,
        "normalize": "z_score_clamp",
        "no_cache": True,
        "val_ratio": 0.0,
    }
    judge = make_judge(settings, plugins, warn)
    queries = Path(opts["queries"])
    if not queries.is_file():
        raise LeverError(f"{queries}: file not found")
    table = None
    if has_logged_sequences(queries):
        table, _ = load_data(settings, plugins, say, warn)
    emb = load_embeddings(opts["img_emb"], opts["cand_emb"], opts["emb_key"])
    report = evaluate(
        plugins,
        list(checkpoints),
        queries,
        emb,
        judge,
        baselines,
        table,
        opts["shots"],
        opts["max_pool"],
        opts["batch_size"],
        device,
        opts["trust_checkpoint"],
        say,
    )
    if not report.selectors:
        raise LeverError(
            f"nothing was measured on {queries} (baselines {', '.join(baselines)}): "
            "give a checkpoint, or baselines that apply"
        )
    say(f"{report.n_queries} queries of {queries}, {report.steps} demonstrations each")
    for line in report.table():
        say(line)
    for note in report.notes:
        say(f"note: {note}")
    if judge is not None:
        calls = sum(judge.calls.values())
        say(f"judge: {judge.name} {judge.version}, {calls} new verdicts")
    if opts["output"]:
        write_output(opts["output"], (report.to_json() + "\n").encode(), "--output")
        say(f"wrote {'standard output' if to_stdout else opts['output']}")


@main.command("export-verdicts")
@click.option(
    "--store",
    type=click.Path(dir_okay=False),
    default=None,
    help="The verdict store (default: the shared one).",
)
@click.option(
    "--judge",
    "judge_name",
    required=True,
    metavar="NAME",
    help="Environment whose verdicts to export.",
)
@click.option(
    "--version", "env_version", default=None, help="Its version (default: the only one stored)."
)
@click.option(
    "--output", required=True, type=click.Path(dir_okay=False), help="RL data JSON to write."
)
@user_errors
def export_verdicts(
    store: str | None, judge_name: str, env_version: str | None, output: str
) -> None:
    """Write the stored verdicts of one environment as RL data JSON: every judged sequence
    a logged candidate (gen_method "judge"), ready for offline training."""
    from .fileio import STDOUT, output_kind, write_output
    from .judge import VerdictStore, default_store_path, export_rl_data

    to_stdout = output_kind(output, "--output") == STDOUT
    path = Path(store) if store else default_store_path()
    if not path.is_file():
        raise LeverError(f"--store: {path} does not exist")
    verdicts = VerdictStore(path)
    versions = verdicts.versions(judge_name)
    if not versions:
        raise LeverError(f"--judge: {path} holds no verdicts of environment {judge_name!r}")
    if env_version is None:
        if len(versions) > 1:
            raise LeverError(
                f"--version: {path} holds {judge_name} versions {', '.join(sorted(versions))}; "
                "name one"
            )
        env_version = next(iter(versions))
    elif env_version not in versions:
        raise LeverError(f"--version: {path} holds no verdicts of {judge_name} {env_version}")
    doc = export_rl_data(verdicts, judge_name, env_version)
    queries = sum(1 for k in doc if k.isdigit())
    write_output(output, (json.dumps(doc) + "\n").encode(), "--output")
    click.echo(
        f"wrote {versions[env_version]} verdicts of {queries} queries "
        f"({judge_name} {env_version}) to {'standard output' if to_stdout else output}",
        err=to_stdout,
    )


@main.command("convert-checkpoint")
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option(
    "--input-dim",
    type=click.IntRange(min=1),
    default=None,
    help="Embedding width d; must agree with SRC (default: read from SRC's weights).",
)
@click.option(
    "--num-heads",
    type=click.IntRange(min=1),
    default=None,
    help="Attention heads to record in the metadata (default: SRC's metadata, else 1).",
)
@click.option("--trust-checkpoint", is_flag=True, help="Allow a full (unsafe) pickle load of SRC.")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@user_errors
def convert_checkpoint_cmd(
    src: str,
    dst: str,
    input_dim: int | None,
    num_heads: int | None,
    trust_checkpoint: bool,
    overwrite: bool,
) -> None:
    """Convert a starting checkpoint SRC into this project's safetensors DST.

    SRC may be a torch.save dict with model_state_dict, a Lightning .ckpt, a bare
    state dict or one of this project's checkpoints. Only the policy's weights are
    kept; DST's metadata records the policy (name, width, options), SRC's path and
    sha256, and the ignored and missing keys. DST works as --sft-ckpt.
    """
    from .checkpoint import convert_checkpoint
    from .plugins import load_plugins
    from .policies import FOREIGN_POLICY, build_policy

    plugins = load_plugins(warn=warn)
    report = convert_checkpoint(
        src,
        dst,
        input_dim=input_dim,
        num_heads=num_heads,
        trust=trust_checkpoint,
        overwrite=overwrite,
        warn=warn,
        build=lambda d, options: build_policy(plugins, FOREIGN_POLICY, d, options),
    )
    for line in report.lines():
        click.echo(line)


# ------------------------------------------------------------------ serve-judge
# A self-contained block: the server lives in lever_trainer/serve.py.
@main.command("serve-judge", cls=GroupedCommand)
@click.argument("name", metavar="NAME")
@opt("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@opt(
    "--port",
    type=click.IntRange(1, 65535),
    default=8000,
    show_default=True,
    help="Port to listen on.",
)
@opt(
    "--threads",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Batches judged at once (worker threads calling the environment); 1 for an "
    "environment that is not thread-safe.",
)
@opt(
    "--max-batch",
    type=click.IntRange(min=1),
    default=4096,
    show_default=True,
    help="Most (query, sequence) pairs in one request; more is refused (413).",
)
@opt(
    "--max-body-mb",
    type=Number(float, 0, min_open=True),
    default=16.0,
    show_default=True,
    help="Largest request body in MiB; a larger one is refused (413).",
)
@opt("--access-log", is_flag=True, help="Log one line per request.")
@opt(
    "--plugin",
    "plugins_on",
    multiple=True,
    metavar="NAME",
    help="Enable a plugin that is off by default (repeatable): one providing NAME.",
)
@click.pass_context
@user_errors
def serve_judge_cmd(ctx: click.Context, name: str, **opts: Any) -> None:
    """Serve the installed environment NAME over HTTP for `--judge remote --judge-url`.

    POST /judge takes {"query_ids": [...], "sequences": [[...], ...]} and answers
    {"verdicts": [...], "name": ..., "version": ...}; GET /health answers the name and
    version. With LEVER_JUDGE_TOKEN set, both require "Authorization: Bearer TOKEN".
    Needs the serve extra: pip install 'lever-trainer[serve]'.
    """
    from .serve import Limits, serve_judge

    limits = Limits(
        max_body_bytes=int(opts.pop("max_body_mb") * 2**20),
        max_batch=opts.pop("max_batch"),
        threads=opts.pop("threads"),
    )
    host, port = opts.pop("host"), opts.pop("port")
    access_log, plugins_on = opts.pop("access_log"), opts.pop("plugins_on")
    serve_judge(name, opts, host, port, limits, plugins_on, access_log, click.echo, warn)

"""``lever-train train``: parse, assemble the run (:mod:`lever_trainer.run`), fit, report."""

from __future__ import annotations

import signal
import sys
from typing import Any

import click

from .. import settings
from ..errors import Interrupted, LeverError
from ..plan import RunPlan, Settings, plan_run, preflight
from .group import installed_plugins, plugin_declarations
from .params import (
    EXIT_INTERRUPTED,
    given_options,
    option_checker,
    table_command,
    user_errors,
    warn,
)

#: Exit status after a clean stop on SIGINT/SIGTERM (a resumable snapshot was written).
EXIT_STOPPED = 3


@table_command("train", context_settings={"auto_envvar_prefix": settings.ENV_PREFIX})
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
    plan = plan_run(Settings.from_options("train", opts), given_options(ctx, opts))
    check_before_torch(plan)
    from ..run import start

    run = start(plan, click.echo, warn, check=option_checker(ctx))
    if run.complete is not None:
        click.echo(run.complete)
        return
    fit(run)


def check_before_torch(plan: RunPlan) -> None:
    """The one-line errors that need no plugin imported (nor torch) come first, and
    fast: unknown or broken plugins, missing files, an unusable output directory, a
    removed option, two plugins asked for that choose the same thing."""
    from ..plugins import alias_dest, check_choices

    declared = plugin_declarations()
    preflight(plan, {d.plugin: d.refusal for d in declared if d.refusal})
    removed = {o.dest: o.extra.get("removed") for d in declared for o in d.options}
    for dest, flag in plan.given.items():
        if removed.get(dest):
            raise LeverError(f"{flag} was removed: {removed[dest]}")
    values = plan.settings.plugin_values
    by_name = {d.plugin: d for d in declared}
    names = [*plan.enable]
    names += [d.plugin for d in declared if any(values.get(alias_dest(f)) for f in d.enable_flags)]
    check_choices([by_name[n] for n in dict.fromkeys(names) if n in by_name])


def fit(run: Any) -> None:
    """Train the started ``run``; a stop or a failure says how to resume."""
    from ..trainer import SNAPSHOT_NAME, StopRequested

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
    from ..run import activate_plugins

    plugins = activate_plugins(Settings.from_options("train", opts), given_options(ctx, opts), warn)
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

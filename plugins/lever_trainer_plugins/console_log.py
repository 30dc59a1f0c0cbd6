"""Epoch lines and a step progress bar on the terminal. On by default."""

from __future__ import annotations

import sys

import click

from lever_trainer.api import TrainState, format_metrics, hookimpl

ENABLED_BY_DEFAULT = True
DESCRIPTION = "print one line per epoch, and a progress bar on a terminal"

_BAR_WIDTH = 30


def _show_bar() -> bool:
    return sys.stderr.isatty()


@hookimpl
def on_step_end(state: TrainState) -> None:
    """Redraw the progress bar of the current epoch (terminals only)."""
    if not _show_bar() or state.steps_per_epoch == 0:
        return
    done = state.step_in_epoch / state.steps_per_epoch
    filled = int(done * _BAR_WIDTH)
    loss = state.last_step.get("loss", float("nan"))
    bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
    click.echo(
        f"\r{state.phase} epoch {state.epoch} [{bar}] "
        f"{state.step_in_epoch}/{state.steps_per_epoch} loss {loss:.4f}",
        nl=False,
        err=True,
    )


@hookimpl
def on_epoch_end(state: TrainState, metrics: dict[str, float]) -> None:
    """Print ``phase epoch n/N: metrics`` after each epoch."""
    if _show_bar():
        click.echo("\r\033[K", nl=False, err=True)
    extra = state.current_phase.log_metrics if state.current_phase is not None else ()
    state.log(
        f"{state.phase} epoch {state.epoch}/{state.epochs}: "
        f"{format_metrics(metrics, extra)}  ({metrics.get('epoch_seconds', 0.0):.1f}s)"
    )

"""End the run when a metric stops improving (after Lightning's and Keras' EarlyStopping).

After every epoch of the phases named by ``--early-stop-phases`` (default all), the
epoch's ``--early-stop-metric`` (default ``val_loss``; any key of the epoch's metrics)
is compared with the best value of the phase so far: it improves when it is lower
(``--early-stop-mode min``) or higher (``max``) by more than ``--early-stop-min-delta``;
``auto`` (default) means ``min`` for metrics whose name contains ``loss``, else ``max``.
After ``--early-stop-patience`` epochs without improvement the plugin asks the run to
stop (``state.request_stop``): that epoch's checkpoint and snapshot are written as usual,
no further epoch or phase runs, and ``--resume`` trains nothing more. The best value
starts afresh with each phase (phases optimise different losses). A NaN never improves.
Its state (phase, best value, epochs without improvement) travels in resume snapshots.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lever_trainer.api import About, LeverError, Option, TrainState, hookimpl

from ._phase_list import phase_set

NAME = "early-stopping"


@hookimpl
def about() -> About:
    """What ``lever-train plugins`` shows of this plugin."""
    return About(
        description="stop the run when a metric has not improved for --early-stop-patience epochs",
    )


def _state(state: TrainState) -> dict[str, Any]:
    saved: dict[str, Any] = state.extra.setdefault(NAME, {"phase": None, "best": None, "bad": 0})
    return saved


def direction(metric: str, mode: str) -> str:
    """``min`` or ``max`` for ``metric`` under ``--early-stop-mode``."""
    if mode != "auto":
        return mode
    return "min" if "loss" in metric else "max"


@hookimpl
def on_train_start(state: TrainState) -> None:
    """Refuse, before the first epoch, a metric that no epoch of this run reports."""
    metric = str(EARLY_STOP_METRIC.of(state.options))
    if not state.knows_metric(metric):
        raise LeverError(
            f"--early-stop-metric {metric!r}: no epoch of this run reports it (its "
            f"metrics: {', '.join(sorted(state.metric_names))})"
        )


@hookimpl
def on_epoch_end(state: TrainState, metrics: dict[str, float]) -> None:
    """Count epochs without improvement; request the stop at the patience."""
    phases = phase_set(state, EARLY_STOP_PHASES)
    if phases is not None and state.phase not in phases:
        return
    metric = str(EARLY_STOP_METRIC.of(state.options))
    if metric not in metrics:
        raise LeverError(
            f"--early-stop-metric {metric!r}: not among the metrics of {state.phase} epoch "
            f"{state.epoch} ({', '.join(sorted(metrics))})"
        )
    saved = _state(state)
    if saved["phase"] != state.phase:
        saved.update(phase=state.phase, best=None, bad=0)
    value = float(metrics[metric])
    delta = float(EARLY_STOP_MIN_DELTA.of(state.options))
    best = saved["best"]
    if direction(metric, str(EARLY_STOP_MODE.of(state.options))) == "min":
        improved = not math.isnan(value) and (best is None or value < best - delta)
    else:
        improved = not math.isnan(value) and (best is None or value > best + delta)
    if improved:
        saved.update(best=value, bad=0)
        return
    saved["bad"] += 1
    patience = int(EARLY_STOP_PATIENCE.of(state.options))
    if saved["bad"] >= patience:
        shown = "none" if best is None else f"{best:.6g}"
        state.request_stop(
            f"{metric} has not improved by more than {delta:g} for {patience} epochs (best {shown})"
        )


@hookimpl
def plugin_state_dict(state: TrainState) -> dict[str, Any]:
    """Phase, best value and epochs without improvement."""
    return dict(_state(state))


@hookimpl
def load_plugin_state(state: TrainState, saved: dict[str, Any]) -> None:
    """Restore the counters."""
    state.extra[NAME] = dict(saved)


EARLY_STOP_METRIC = Option(
    ("--early-stop-metric",),
    "str",
    "val_loss",
    "early-stopping: the epoch metric to watch (e.g. val_loss, policy_reward@1).",
    metavar="NAME",
)
EARLY_STOP_MODE = Option(
    ("--early-stop-mode",),
    "choice",
    "auto",
    "early-stopping: whether lower (min) or higher (max) is better; auto: min for "
    "names containing 'loss'.",
    choices=("auto", "min", "max"),
)
EARLY_STOP_PATIENCE = Option(
    ("--early-stop-patience",),
    "int",
    3,
    "early-stopping: epochs without improvement before the run stops.",
    min=1,
)
EARLY_STOP_MIN_DELTA = Option(
    ("--early-stop-min-delta",),
    "float",
    0.0,
    "early-stopping: the smallest change that counts as an improvement.",
    min=0,
)
EARLY_STOP_PHASES = Option(
    ("--early-stop-phases",),
    "str",
    "all",
    "early-stopping: phases whose epochs are watched ('all' or names, comma-separated).",
    metavar="PHASES",
)


@hookimpl
def add_options() -> Sequence[Option]:
    """Metric, mode, patience, minimum change and phases."""
    return [
        EARLY_STOP_METRIC,
        EARLY_STOP_MODE,
        EARLY_STOP_PATIENCE,
        EARLY_STOP_MIN_DELTA,
        EARLY_STOP_PHASES,
    ]

"""A learning-rate schedule per phase: linear warm-up, then constant, linear or cosine decay.

Each phase's schedule runs over that phase alone, from its base rate (``--rce-lr``,
``--grpo-lr``, ...). With ``p`` the share of the phase done before the step
(``(epoch - 1 + step_in_epoch / steps_per_epoch) / epochs``), ``d`` the share one step
takes, ``w = --lr-warmup`` and ``m = --lr-min-ratio``:

* warm-up, ``p < w``: ``lr = base * (p + d) / w`` (the first step already moves);
* then, with ``q = (p - w) / (1 - w)``: ``constant``: ``base``; ``linear``:
  ``base * (m + (1 - m) * (1 - q))``; ``cosine``: ``base * (m + (1 - m) * (1 + cos(pi q)) / 2)``.

The position is counted in epochs, so epochs of different lengths (a data curriculum)
keep the schedule on time. The rate reaches every step through the ``learning_rate``
hook and is reported as ``lr``; ``--lr-schedule-phases`` picks the phases (default all).
The schedule is a function of the phase's position, which resume snapshots restore, so
a resumed run continues on the same rates; the snapshot also keeps the last rate set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lever_trainer.api import About, Option, TrainState, hookimpl

from ._phase_list import phase_set

NAME = "lr-schedule"


@hookimpl
def about() -> About:
    """What ``lever-train plugins`` shows of this plugin."""
    return About(
        description="per-phase learning-rate warm-up, then constant, linear or cosine decay",
    )


def scheduled_lr(
    base: float,
    progress: float,
    step_share: float,
    kind: str,
    warmup: float,
    min_ratio: float,
) -> float:
    """The rate at ``progress`` (share of the phase done) for one step of ``step_share``."""
    if progress < warmup:
        return base * min(1.0, (progress + step_share) / warmup)
    q = (progress - warmup) / (1.0 - warmup) if warmup < 1.0 else 1.0
    if kind == "constant":
        return base
    if kind == "linear":
        return base * (min_ratio + (1.0 - min_ratio) * (1.0 - q))
    return base * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * q)))


@hookimpl
def learning_rate(state: TrainState, phase: str, base_lr: float) -> float | None:
    """The scheduled rate of the step about to be taken."""
    phases = phase_set(state, LR_SCHEDULE_PHASES)
    if phases is not None and phase not in phases:
        return None
    per_epoch = max(state.steps_per_epoch, 1)
    epochs = max(state.epochs, 1)
    progress = (state.epoch - 1 + state.step_in_epoch / per_epoch) / epochs
    lr = scheduled_lr(
        base_lr,
        progress,
        1.0 / (per_epoch * epochs),
        str(LR_SCHEDULE.of(state.options)),
        float(LR_WARMUP.of(state.options)),
        float(LR_MIN_RATIO.of(state.options)),
    )
    state.extra[NAME] = {"phase": phase, "step": state.step, "lr": lr}
    return lr


@hookimpl
def plugin_state_dict(state: TrainState) -> dict[str, Any] | None:
    """The last rate set, with its phase and step."""
    saved: dict[str, Any] | None = state.extra.get(NAME)
    return None if saved is None else dict(saved)


@hookimpl
def load_plugin_state(state: TrainState, saved: dict[str, Any]) -> None:
    """Restore the last rate set."""
    state.extra[NAME] = dict(saved)


LR_SCHEDULE = Option(
    ("--lr-schedule",),
    "choice",
    "cosine",
    "lr-schedule: the decay after the warm-up.",
    choices=("constant", "linear", "cosine"),
)
LR_WARMUP = Option(
    ("--lr-warmup",),
    "float",
    0.1,
    "lr-schedule: share of each phase spent warming up linearly from 0.",
    min=0,
    max=1,
)
LR_MIN_RATIO = Option(
    ("--lr-min-ratio",),
    "float",
    0.0,
    "lr-schedule: the rate the decay ends at, as a share of the base rate.",
    min=0,
    max=1,
)
LR_SCHEDULE_PHASES = Option(
    ("--lr-schedule-phases",),
    "str",
    "all",
    "lr-schedule: phases that follow the schedule ('all' or names, comma-separated).",
    metavar="PHASES",
)


@hookimpl
def add_options() -> Sequence[Option]:
    """Shape, warm-up, floor and phases of the schedule."""
    return [
        LR_SCHEDULE,
        LR_WARMUP,
        LR_MIN_RATIO,
        LR_SCHEDULE_PHASES,
    ]

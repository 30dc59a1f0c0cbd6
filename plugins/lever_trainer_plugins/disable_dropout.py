"""Train with dropout off in the phases that measure ratios against eval-mode log-probs.

GRPO's reference log-probs are computed in eval mode (no dropout), while by default
the new log-probs come from the training-mode policy, whose dropout (0.5 on the query
state and item keys) moves them by itself: the measured KL stays above the adaptive
rule's 0.1 threshold even where the weights have not moved, and the KL weight climbs
to its ceiling. With this plugin the phases named by ``--disable-dropout-phases``
(default ``grpo``; ``all`` for every phase) run their steps in eval mode, which the
policy protocol makes exactly "dropout off" (it is the only difference between the
modes); the other phases keep dropout.
"""

from __future__ import annotations

from collections.abc import Sequence

from lever_trainer.api import About, Option, TrainState, hookimpl

from ._phase_list import phase_set


@hookimpl
def about() -> About:
    """What ``lever-train plugins`` shows of this plugin."""
    return About(
        description="dropout off during GRPO steps (the reference log-probs are eval-mode)",
    )


@hookimpl
def train_mode(state: TrainState, phase: str) -> bool | None:
    """False (eval mode: no dropout) for the chosen phases."""
    phases = phase_set(state, DISABLE_DROPOUT_PHASES)
    return False if phases is None or phase in phases else None


DISABLE_DROPOUT_PHASES = Option(
    ("--disable-dropout-phases",),
    "str",
    "grpo",
    "disable-dropout: phases that train with dropout off ('all' or names, comma-separated).",
    metavar="PHASES",
)


@hookimpl
def add_options() -> Sequence[Option]:
    """Which phases train without dropout."""
    return [DISABLE_DROPOUT_PHASES]

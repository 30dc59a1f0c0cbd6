"""The GRPO curriculum (docs/algorithm.md): which logged candidates a step keeps. On by default.

In GRPO epochs ``< --early-epochs`` each query keeps its top ``--early-top-k``
candidates by the phase's reward, later its top ``--late-top-k``; ties go to the lower
candidate index. ``--no-plugin grpo-curriculum`` keeps every candidate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lever_trainer.api import About, Batch, Option, TrainState, hookimpl, top_k_mask


@hookimpl
def about() -> About:
    """What ``lever-train plugins`` shows of this plugin."""
    return About(
        description="GRPO keeps each query's top 3 candidates in its first epoch, then the top 5",
        enabled_by_default=True,
    )


@hookimpl
def select_candidates(
    state: TrainState, phase: str, batch: Batch, rewards: torch.Tensor
) -> torch.Tensor | None:
    """The top-k mask of the current GRPO epoch."""
    if phase != "grpo":
        return None
    early = state.epoch - 1 < EARLY_EPOCHS.of(state.options)
    k = EARLY_TOP_K.of(state.options) if early else LATE_TOP_K.of(state.options)
    return top_k_mask(rewards, batch.cand_mask, int(k))


EARLY_TOP_K = Option(
    ("--early-top-k", "--early_top_k"),
    "int",
    3,
    "Candidates kept per query in the early GRPO epochs.",
    min=1,
)
LATE_TOP_K = Option(
    ("--late-top-k", "--late_top_k"),
    "int",
    5,
    "Candidates kept per query in the later GRPO epochs.",
    min=1,
)
EARLY_EPOCHS = Option(
    ("--early-epochs", "--early_epochs"),
    "int",
    1,
    "How many GRPO epochs count as early.",
    min=0,
)


@hookimpl
def add_options() -> Sequence[Option]:
    """The curriculum's two group sizes and the switch epoch."""
    return [
        EARLY_TOP_K,
        LATE_TOP_K,
        EARLY_EPOCHS,
    ]

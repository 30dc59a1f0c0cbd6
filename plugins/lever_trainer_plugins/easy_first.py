"""A data curriculum (upstream's plan 9): the first epochs visit the easy queries only.

Upstream trained first on a hand-made file of "high-quality" queries (about 53 % of
them: those whose good and bad logged sequences are far apart), then on all queries.
Here the easy subset is chosen from the data: a query's ease is the spread of its
logged raw rewards, ``max - min`` over its candidates (a query with all-equal rewards
teaches nothing and is the hardest); the ``--easy-fraction`` of the training queries
with the largest spread (ties: the lower row) form the subset. In each phase named by
``--easy-phases`` (default all) the first ``--easy-epochs`` epochs visit only that
subset, shuffled with the run's generator; later epochs visit every query (the default
order). Epochs of the subset are shorter (fewer steps).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lever_trainer.api import About, Option, TrainState, hookimpl

from ._phase_list import phase_set

NAME = "easy-first"


@hookimpl
def about() -> About:
    """What ``lever-train plugins`` shows of this plugin."""
    return About(
        description="the first epochs of a phase visit only the queries whose rewards spread most",
    )


def easy_rows(state: TrainState) -> torch.Tensor:
    """The rows of ``state.train`` in the easy subset, in row order (cached per run)."""
    fraction = float(EASY_FRACTION.of(state.options))
    cached = state.extra.get(NAME)
    if cached is not None and cached["fraction"] == fraction:
        rows: torch.Tensor = cached["rows"]
        return rows
    table = state.train
    mask = table.cand_mask()
    rewards = table.rewards_raw
    spread = rewards.masked_fill(~mask, float("-inf")).amax(-1) - rewards.masked_fill(
        ~mask, float("inf")
    ).amin(-1)
    order = torch.sort(spread, descending=True, stable=True).indices
    count = min(len(order), max(1, round(fraction * len(order))))
    rows = torch.sort(order[:count]).values
    state.extra[NAME] = {"fraction": fraction, "rows": rows}
    state.log(
        f"easy-first: {count} of {len(order)} training queries, raw-reward spread >= "
        f"{float(spread[order[count - 1]]):.4g}"
    )
    return rows


@hookimpl
def train_rows(
    state: TrainState, phase: str, epoch: int, generator: torch.Generator
) -> torch.Tensor | None:
    """The easy subset, shuffled, in the first epochs of the chosen phases."""
    phases = phase_set(state, EASY_PHASES)
    if (phases is not None and phase not in phases) or epoch > int(EASY_EPOCHS.of(state.options)):
        return None
    rows = easy_rows(state)
    return rows[torch.randperm(len(rows), generator=generator)]


EASY_FRACTION = Option(
    ("--easy-fraction",),
    "float",
    0.5,
    "easy-first: share of the training queries in the easy subset.",
    min=0,
    max=1,
    min_open=True,
)
EASY_EPOCHS = Option(
    ("--easy-epochs",),
    "int",
    1,
    "easy-first: epochs of each chosen phase that visit only the easy subset.",
    min=0,
)
EASY_PHASES = Option(
    ("--easy-phases",),
    "str",
    "all",
    "easy-first: phases that start with the easy subset ('all' or names, comma-separated).",
    metavar="PHASES",
)


@hookimpl
def add_options() -> Sequence[Option]:
    """Size of the subset, its epochs and phases."""
    return [
        EASY_FRACTION,
        EASY_EPOCHS,
        EASY_PHASES,
    ]

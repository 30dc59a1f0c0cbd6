"""Move GRPO's reference log-probs towards the current policy every N steps.

By default the reference stays fixed for the whole phase, so a long
phase measures ever larger ratios and the clip binds on more and more candidates. Every
``--ref-sync-steps`` optimiser steps of a phase that measures ratios against a
reference, this plugin recomputes the current policy's eval-mode log-probs of every
training candidate and mixes them in:
``ref = alpha * current + (1 - alpha) * ref`` (``--ref-sync-alpha``; TRL's
``ref_model_mixup_alpha`` mixes weights, this mixes log-probs, the only reference this
trainer keeps). Each refresh costs one gradient-free pass over the training set. The
reference is part of every resume snapshot, and so is this plugin's count of refreshes.
Phase ``online`` measures against each round's proposer instead; a run where it trains
and no phase with a fixed reference does refuses this plugin at start-up.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lever_trainer.api import About, Option, TrainState, hookimpl

from ._group_objective import refuse_unless_applied

NAME = "reference-sync"


@hookimpl
def about() -> About:
    """What ``lever-train plugins`` shows of this plugin."""
    return About(
        description="every N GRPO steps: ref = alpha * current log-probs + (1 - alpha) * ref",
    )


def _state(state: TrainState) -> dict[str, Any]:
    saved: dict[str, Any] = state.extra.setdefault(NAME, {"syncs": 0, "last_step": -1})
    return saved


@hookimpl
def on_step_end(state: TrainState) -> None:
    """Refresh the reference after every ``--ref-sync-steps``-th step of the phase."""
    phase = state.current_phase
    if phase is None or not phase.needs_reference or state.ref_logprobs is None:
        return
    if state.step % int(REF_SYNC_STEPS.of(state.options)):
        return
    alpha = float(REF_SYNC_ALPHA.of(state.options))
    # a new tensor, never in place: the starting model's log-probs may be the same object
    state.ref_logprobs = alpha * state.eval_logprobs() + (1.0 - alpha) * state.ref_logprobs
    saved = _state(state)
    if saved["syncs"] == 0:
        state.log(
            f"reference-sync: {state.phase} step {state.step}: reference = {alpha:g} current "
            f"+ {1.0 - alpha:g} reference (every {REF_SYNC_STEPS.of(state.options)} steps)"
        )
    saved["syncs"] += 1
    saved["last_step"] = state.step


@hookimpl
def on_train_start(state: TrainState) -> None:
    """Refuse a run where only ``online`` would learn: its reference is each round's
    proposer, which this plugin does not move."""
    applies = {p.name for p in state.phases if p.needs_reference}
    refuse_unless_applied(state, NAME, applies, "it moves a phase's fixed reference")


@hookimpl
def plugin_state_dict(state: TrainState) -> dict[str, Any]:
    """How many refreshes so far, and the step of the last one."""
    return dict(_state(state))


@hookimpl
def load_plugin_state(state: TrainState, saved: dict[str, Any]) -> None:
    """Restore the count (the reference itself is restored with the snapshot)."""
    state.extra[NAME] = {"syncs": int(saved["syncs"]), "last_step": int(saved["last_step"])}


REF_SYNC_STEPS = Option(
    ("--ref-sync-steps",),
    "int",
    100,
    "reference-sync: refresh the reference every N optimiser steps of the phase.",
    min=1,
)
REF_SYNC_ALPHA = Option(
    ("--ref-sync-alpha",),
    "float",
    0.6,
    "reference-sync: weight of the current policy's log-probs in the new reference.",
    min=0,
    max=1,
    min_open=True,
)


@hookimpl
def add_options() -> Sequence[Option]:
    """Period and mix-up weight."""
    return [
        REF_SYNC_STEPS,
        REF_SYNC_ALPHA,
    ]

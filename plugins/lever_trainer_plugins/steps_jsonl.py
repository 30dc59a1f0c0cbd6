"""Append the step values to ``steps.jsonl`` in the output directory. On by default.

Every ``--log-every`` optimiser steps (counted over the whole run), and at the last step
of every epoch, one JSON line is appended and flushed:

    {"global_step": 120, "phase": "rce", "epoch": 3, "step": 40, "steps_per_epoch": 40,
     "time": 1767000000.123, "loss": 7.41, "tau": 1.62, "grad_norm": 0.93}

``global_step`` counts optimiser steps over the whole run, ``step`` within the epoch;
then every value of the step (``state.last_step``: ``loss``, the phase's other values,
``grad_norm``). A step skipped for a non-finite loss or gradient is written as
``"skipped": true`` with no values; a value that is not finite is ``null``. A resumed run
first cuts the file back to the line of its snapshot, so no step appears twice.
"""

from __future__ import annotations

import time
from typing import Any

from lever_trainer.api import About, TrainState, append_text, hookimpl, json_line, truncate_file

from ._trackers import should_log


@hookimpl
def about() -> About:
    """What ``lever-train plugins`` shows of this plugin."""
    return About(
        description="append the step values to OUTPUT_DIR/steps.jsonl every --log-every steps",
        enabled_by_default=True,
    )


FILE_NAME = "steps.jsonl"
_KEY = "steps-jsonl"


def step_record(state: TrainState) -> dict[str, Any]:
    """The line written for the current step (also what the trackers log)."""
    record: dict[str, Any] = {
        "global_step": state.global_step,
        "phase": state.phase,
        "epoch": state.epoch,
        "step": state.step_in_epoch,
        "steps_per_epoch": state.steps_per_epoch,
        "time": round(time.time(), 3),
    }
    if state.last_step:
        record.update(state.last_step)
    else:
        record["skipped"] = True
    return record


def _prepare(state: TrainState) -> None:
    """Once per run: start the file afresh, or cut it back to the resumed snapshot."""
    mine = state.extra.setdefault(_KEY, {"truncate_to": 0})
    if mine.get("ready"):
        return
    truncate_file(state.output_dir / FILE_NAME, int(mine.get("truncate_to") or 0))
    mine["ready"] = True


@hookimpl
def on_train_start(state: TrainState) -> None:
    """A new run starts the file afresh (a resumed one: see ``load_plugin_state``)."""
    state.extra[_KEY] = {"truncate_to": 0}


@hookimpl
def on_phase_start(state: TrainState) -> None:
    """Make the file ready before the phase's first step."""
    _prepare(state)


@hookimpl
def on_step_end(state: TrainState) -> None:
    """Append and flush the step's line when it is a logged step."""
    if not should_log(state):
        return
    _prepare(state)
    append_text(state.output_dir / FILE_NAME, json_line(step_record(state)) + "\n")


@hookimpl
def plugin_state_dict(state: TrainState) -> dict[str, Any]:
    """The file's length at the snapshot: a resumed run continues from there."""
    path = state.output_dir / FILE_NAME
    return {"bytes": path.stat().st_size if path.exists() else 0}


@hookimpl
def load_plugin_state(state: TrainState, saved: dict[str, Any]) -> None:
    """Cut the file back to its length at the snapshot before the next line."""
    state.extra[_KEY] = {"truncate_to": int(saved.get("bytes", 0))}

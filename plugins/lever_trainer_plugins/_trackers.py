"""What the tracker plugins (``tensorboard``, ``mlflow``, ``wandb``) share: when to log what.

Each tracker plugin is an instance of a :class:`TrackerPlugin` subclass that says how to
open a run of its library, log a dict of numbers at a step, and close; this base class
answers the hooks. What reaches the tracker, with ``global_step`` as the step:

* every ``--log-every`` steps and at the end of each epoch, the step's values as
  ``PHASE/KEY`` (``rce/loss``, ``grpo/kl``, ``grpo/grad_norm``, ...);
* the start validation (step 0) and every epoch's metrics as ``epoch/KEY``
  (``epoch/val_loss``, ``epoch/policy_reward@1``, ``epoch/kl_beta``, ...), with
  ``epoch/phase_index`` (0 = start, then 1, 2, ... for each phase) and ``epoch/epoch``;
* the run's options as the tracker's parameters (hyper-parameters).

Values that are not finite numbers are left out. The tracker's run id is kept in the
resume snapshot, so ``--resume`` continues the same tracker run. The library is imported
only when a run uses the plugin; a missing one is an error naming the extra to install.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from lever_trainer.api import LOG_EVERY, About, LeverError, Option, TrainState, hookimpl


def should_log(state: TrainState) -> bool:
    """Every ``--log-every`` global steps, and the last step of each epoch."""
    every = int(LOG_EVERY.of(state.options) or 10)
    return state.global_step % every == 0 or state.step_in_epoch >= state.steps_per_epoch


def finite(values: Mapping[str, Any]) -> dict[str, float]:
    """The entries of ``values`` that are finite numbers, as floats."""
    out = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def run_params(state: TrainState) -> dict[str, str]:
    """The run's options as flat strings (a tracker's parameters), plus its plugins."""
    params = {}
    for key, value in sorted(state.options.items()):
        if value is None:
            continue
        params[key] = json.dumps(list(value)) if isinstance(value, tuple | list) else str(value)
    if state.plugins is not None:
        params["plugins"] = ",".join(state.plugins.names)
    return params


def run_values(state: TrainState) -> dict[str, Any]:
    """The run's options as JSON values (a tracker's config), plus its plugins."""
    values: dict[str, Any] = {}
    for key, value in sorted(state.options.items()):
        if isinstance(value, tuple):
            value = list(value)
        values[key] = (
            value
            if isinstance(value, str | int | float | bool | list)
            else (None if value is None else str(value))
        )
    if state.plugins is not None:
        values["plugins"] = list(state.plugins.names)
    return values


class Session:
    """One open run of a tracker library."""

    run_id: str | None = None

    def log(self, values: Mapping[str, float], step: int) -> None:
        """Record ``values`` at ``step``."""
        raise NotImplementedError

    def flush(self) -> None:
        """Make what was logged visible to readers (end of an epoch)."""

    def close(self) -> None:
        """End the run."""


class TrackerPlugin:
    """Base class of a tracker plugin; a subclass sets the attributes and :meth:`open`."""

    NAME = ""
    #: The line ``lever-train plugins`` shows (the ``about`` answer).
    DESCRIPTION = ""
    #: The module to import, and the extra that installs it.
    LIBRARY = ""
    EXTRA = ""

    @hookimpl
    def about(self) -> About:
        """What ``lever-train plugins`` shows of this tracker: off by default."""
        return About(description=self.DESCRIPTION)

    def options(self) -> Sequence[Option]:
        """This tracker's options."""
        return []

    def open(self, state: TrainState, run_id: str | None) -> Session:
        """Start (or, with ``run_id``, continue) a run of the tracker."""
        raise NotImplementedError

    # -- hooks -------------------------------------------------------------------
    def _mine(self, state: TrainState) -> dict[str, Any]:
        mine: dict[str, Any] = state.extra.setdefault(self.NAME, {})
        return mine

    def _session(self, state: TrainState) -> Session:
        mine = self._mine(state)
        if mine.get("session") is None:
            mine["session"] = self.open(state, mine.get("run_id"))
        session: Session = mine["session"]
        return session

    @hookimpl
    def add_options(self) -> Sequence[Option]:
        """The tracker's options."""
        return self.options()

    @hookimpl
    def on_train_start(self, state: TrainState) -> None:
        """Fail early, before any step, when the tracker's library is not installed."""
        if importlib.util.find_spec(self.LIBRARY) is None:
            raise LeverError(
                f"plugin {self.NAME} needs the {self.LIBRARY} package, which is not "
                f"installed: pip install 'lever-trainer[{self.EXTRA}]'"
            )
        self._mine(state)

    @hookimpl
    def on_start_validation(self, state: TrainState, metrics: dict[str, float]) -> None:
        """The starting policy's validation, at step 0."""
        values = {f"epoch/{k}": v for k, v in finite(metrics).items()}
        values.update({"epoch/phase_index": 0.0, "epoch/epoch": 0.0})
        self._session(state).log(values, 0)

    @hookimpl
    def on_step_end(self, state: TrainState) -> None:
        """The step's values, every ``--log-every`` steps and at the end of each epoch."""
        if not should_log(state) or not state.last_step:
            return
        values = {f"{state.phase}/{k}": v for k, v in finite(state.last_step).items()}
        self._session(state).log(values, state.global_step)

    @hookimpl
    def on_epoch_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        """The epoch's metrics, at the run's global step."""
        values = {f"epoch/{k}": v for k, v in finite(metrics).items()}
        names = [p.name for p in state.phases]
        index = names.index(state.phase) + 1 if state.phase in names else 0
        values.update({"epoch/phase_index": float(index), "epoch/epoch": float(state.epoch)})
        session = self._session(state)
        session.log(values, state.global_step)
        session.flush()

    @hookimpl
    def on_train_end(self, state: TrainState) -> None:
        """Close the tracker's run."""
        mine = self._mine(state)
        session = mine.pop("session", None)
        if session is not None:
            session.close()

    @hookimpl
    def plugin_state_dict(self, state: TrainState) -> dict[str, Any] | None:
        """The tracker's run id, so that a resumed run continues it."""
        session = self._mine(state).get("session")
        run_id = session.run_id if session is not None else self._mine(state).get("run_id")
        return {"run_id": run_id} if run_id else None

    @hookimpl
    def load_plugin_state(self, state: TrainState, saved: dict[str, Any]) -> None:
        """Continue the tracker run of the snapshot."""
        self._mine(state)["run_id"] = saved.get("run_id")

"""Log the run to Weights & Biases. Off by default.

``--plugin wandb`` starts a run of project ``--wandb-project`` (``lever-trainer``) in
``--wandb-mode``: ``offline`` (the default: needs no account and sends nothing; the run
is kept in ``OUTPUT_DIR/wandb`` and ``wandb sync OUTPUT_DIR/wandb/offline-run-*``
uploads it later) or ``online``. Needs ``wandb``: ``pip install 'lever-trainer[wandb]'``.
The run's options are its config; a resumed run continues the same W&B run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lever_trainer.api import LeverError, Option, TrainState

from ._trackers import Session, TrackerPlugin, run_values


class WandbSession(Session):
    """A ``wandb`` run."""

    def __init__(self, run: Any) -> None:
        self.run = run
        self.run_id = str(run.id)

    def log(self, values: Mapping[str, float], step: int) -> None:
        # W&B steps must not go backwards; the step index is a metric of its own.
        self.run.log({**values, "global_step": step})

    def close(self) -> None:
        import wandb

        self.run.finish()
        # finish() may return before W&B's service has written the run out (seen with
        # offline runs); shutting the service down waits for it, so that the run is
        # complete on disk when lever-train exits (ready for `wandb sync`).
        wandb.teardown()


WANDB_PROJECT = Option(("--wandb-project",), "str", "lever-trainer", "W&B project.", metavar="NAME")
WANDB_ENTITY = Option(
    ("--wandb-entity",), "str", None, "W&B entity (user or team).", metavar="NAME"
)
WANDB_MODE = Option(
    ("--wandb-mode",),
    "choice",
    "offline",
    "offline: keep the run on disk (no account needed; `wandb sync` later); "
    "online: stream it to the W&B server.",
    choices=("offline", "online"),
)
WANDB_DIR = Option(
    ("--wandb-dir",),
    "path",
    None,
    "Folder W&B writes into (default: OUTPUT_DIR).",
    metavar="DIR",
)
WANDB_RUN_NAME = Option(
    ("--wandb-run-name",),
    "str",
    None,
    "W&B run name (default: the output folder's name).",
    metavar="NAME",
)


class WandbPlugin(TrackerPlugin):
    """The ``wandb`` plugin."""

    NAME = "wandb"
    DESCRIPTION = (
        "log steps, epochs and options to Weights & Biases, offline by default (extra: wandb)"
    )
    LIBRARY = "wandb"
    EXTRA = "wandb"

    def options(self) -> Sequence[Option]:
        return [
            WANDB_PROJECT,
            WANDB_ENTITY,
            WANDB_MODE,
            WANDB_DIR,
            WANDB_RUN_NAME,
        ]

    def open(self, state: TrainState, run_id: str | None) -> Session:
        import wandb

        folder = Path(WANDB_DIR.of(state.options) or state.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            run = wandb.init(
                project=WANDB_PROJECT.of(state.options),
                entity=WANDB_ENTITY.of(state.options),
                mode=WANDB_MODE.of(state.options) or "offline",
                dir=str(folder),
                name=WANDB_RUN_NAME.of(state.options) or state.output_dir.absolute().name,
                config=run_values(state),
                id=run_id,
                resume="allow" if run_id else None,
                reinit="create_new",
            )
        except Exception as exc:  # no account for online mode, a refused connection, ...
            raise LeverError(f"plugin wandb: cannot start a run: {exc}") from None
        run.define_metric("*", step_metric="global_step")
        return WandbSession(run)


plugin = WandbPlugin()

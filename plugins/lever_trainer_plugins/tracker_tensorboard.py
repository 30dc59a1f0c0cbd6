"""Log the run to TensorBoard event files (``torch.utils.tensorboard``). Off by default.

``--plugin tensorboard`` writes to ``--tensorboard-dir`` (default
``OUTPUT_DIR/tensorboard``); view with ``tensorboard --logdir OUTPUT_DIR/tensorboard``.
Needs the ``tensorboard`` package: ``pip install 'lever-trainer[tensorboard]'``. What
is logged: see :mod:`lever_trainer_plugins._trackers`; the run's options are written as
a text summary ``options``. A resumed run appends to the same directory, dropping any
event after its snapshot's step.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lever_trainer.api import Option, TrainState

from ._trackers import Session, TrackerPlugin, run_params


class TensorBoardSession(Session):
    """A ``SummaryWriter``."""

    def __init__(self, log_dir: Path, purge_step: int | None, params: Mapping[str, str]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        self.run_id = str(log_dir)
        if purge_step is None:
            table = "\n".join(f"| {k} | {json.dumps(v)[1:-1]} |" for k, v in params.items())
            self.writer.add_text("options", "| option | value |\n| --- | --- |\n" + table, 0)

    def log(self, values: Mapping[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


TENSORBOARD_DIR = Option(
    ("--tensorboard-dir",),
    "path",
    None,
    "Folder of the TensorBoard event files (default: OUTPUT_DIR/tensorboard).",
    metavar="DIR",
)


class TensorBoardPlugin(TrackerPlugin):
    """The ``tensorboard`` plugin."""

    NAME = "tensorboard"
    DESCRIPTION = "log steps, epochs and options to TensorBoard event files (extra: tensorboard)"
    LIBRARY = "tensorboard"
    EXTRA = "tensorboard"

    def options(self) -> Sequence[Option]:
        return [TENSORBOARD_DIR]

    def open(self, state: TrainState, run_id: str | None) -> Session:
        folder = TENSORBOARD_DIR.of(state.options) or state.output_dir / "tensorboard"
        resumed: Any = state.global_step if run_id else None
        return TensorBoardSession(Path(folder), resumed, run_params(state))


plugin = TensorBoardPlugin()

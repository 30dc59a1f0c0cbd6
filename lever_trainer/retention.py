"""Which epoch checkpoints a run keeps: the newest ``--keep-last`` and the best one.

The keeper is an object with its own state (the paths it holds, the best value so far),
saved in resume snapshots like any other state, so a resumed run removes and keeps
exactly what the uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .checkpoint import save_checkpoint

#: File name of the best checkpoint in the output directory.
BEST_NAME = "best.safetensors"


class CheckpointKeeper:
    """Saves epoch checkpoints, removes old ones (after the new one is complete), keeps
    the best."""

    def __init__(
        self,
        output_dir: Path,
        keep_last: int | None = None,
        best_metric: str | None = None,
        best_mode: str = "max",
    ) -> None:
        self.output_dir = output_dir
        self.keep_last = keep_last
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.saved: list[Path] = []
        self.best_value: float | None = None

    def save(
        self,
        name: str,
        weights: Mapping[str, torch.Tensor],
        metadata: dict[str, Any],
        metrics: Mapping[str, float],
        has_validation: bool,
    ) -> Path:
        """Write ``name`` with ``metadata``, then apply ``keep_last`` and ``best_metric``."""
        path = self.output_dir / name
        save_checkpoint(path, weights, metadata)
        self._retain(path)
        self._save_best(weights, metadata, metrics, has_validation)
        return path

    def _retain(self, newest: Path) -> None:
        if newest in self.saved:
            self.saved.remove(newest)
        self.saved.append(newest)
        if self.keep_last is None:
            return
        while len(self.saved) > self.keep_last:
            self.saved.pop(0).unlink(missing_ok=True)

    def _save_best(
        self,
        weights: Mapping[str, torch.Tensor],
        metadata: dict[str, Any],
        metrics: Mapping[str, float],
        has_validation: bool,
    ) -> None:
        name = self.best_metric
        if name is None:
            return
        value = metrics.get(name)
        if value is None or value != value:
            # not measured in this epoch (a metric of another phase; the name itself was
            # checked before training), or NaN: this epoch does not compete
            return
        better = self.best_value is None or (
            value > self.best_value if self.best_mode == "max" else value < self.best_value
        )
        if better:
            self.best_value = value
            meta = {**metadata, "best_metric": name, "best_value": value}
            save_checkpoint(self.output_dir / BEST_NAME, weights, meta)

    def state_dict(self) -> dict[str, Any]:
        """The paths held and the best value so far."""
        return {"saved": [str(p) for p in self.saved], "best_value": self.best_value}

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.saved = [Path(p) for p in saved["saved"]]
        self.best_value = saved["best_value"]


__all__ = ["BEST_NAME", "CheckpointKeeper"]

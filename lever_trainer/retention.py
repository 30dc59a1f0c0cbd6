"""Which epoch checkpoints a run keeps: the newest ``--keep-last`` and the best one.

The keeper is an object with its own state (the paths it holds, the best value so far,
the best candidate's per-query validation values), saved in resume snapshots like any
other state, so a resumed run removes, keeps and chooses exactly what the uninterrupted
run would.

Choosing the best checkpoint. The starting policy is the first candidate (its
validation before training). An epoch replaces the best only when it is better *beyond
the noise*: the 95 % interval of the paired per-query difference between the two
policies' values (:func:`~lever_trainer.metrics.clearly_better`) lies entirely on the
better side of zero. A difference inside that interval is what a different draw of
validation queries could reverse, so the earlier candidate stays. Metrics without
per-query values (training metrics such as ``train_loss``, or a plugin's) fall back to
the plain comparison of values, and the start does not compete on them; so does every
metric with ``paired=False`` (``--best-rule value``), where the start still competes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import save_checkpoint
from .metrics import clearly_better

#: File name of the best checkpoint in the output directory.
BEST_NAME = "best.safetensors"
#: The label of the starting policy among the candidates.
START = "start"


@dataclass
class Comparison:
    """An epoch compared with the best candidate before it.

    ``difference`` is signed so that positive is better (for ``--best-mode min`` it is
    old - new); ``half_width`` is the 95 % half-width of the paired difference over
    ``n`` queries (NaN when it was not a paired comparison).
    """

    label: str
    value: float
    against: str
    against_value: float
    difference: float
    half_width: float
    n: int
    replaced: bool

    @property
    def within_noise(self) -> bool:
        """Better on average, but not beyond the noise."""
        return not self.replaced and self.difference > 0 and self.n > 0

    def describe(self, metric: str) -> str:
        """``policy_reward@1 0.6123 vs 0.6010 (start): +0.0113 +- 0.0150 (paired 95 %, 140
        queries)``."""
        text = (
            f"{metric} {self.value:.4f} vs {self.against_value:.4f} ({self.against}): "
            f"{self.difference:+.4f}"
        )
        if self.n:
            half = f"{self.half_width:.4f}" if math.isfinite(self.half_width) else "?"
            text += f" +- {half} (paired 95 %, {self.n} queries)"
        return text


class CheckpointKeeper:
    """Saves epoch checkpoints, removes old ones (after the new one is complete), keeps
    the best (see the module docstring for the rule)."""

    def __init__(
        self,
        output_dir: Path,
        keep_last: int | None = None,
        best_metric: str | None = None,
        best_mode: str = "max",
        paired: bool = True,
    ) -> None:
        self.output_dir = output_dir
        #: False (``--best-rule value``): the plain comparison of values, no noise test.
        self.paired = paired
        self.keep_last = keep_last
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.saved: list[Path] = []
        self.best_value: float | None = None
        #: The best candidate's per-query values of ``best_metric`` (None: not known).
        self.best_per_query: torch.Tensor | None = None
        #: ``start``, ``rce epoch 3``, ...; None before the first candidate.
        self.best_label: str | None = None
        #: The start's value, and the trained epoch that came closest to beating it
        #: (while the start was the best), for the run's closing line.
        self.start_value: float | None = None
        self.start_per_query: torch.Tensor | None = None
        self.closest: Comparison | None = None
        #: The newest epoch's comparison (None when it did not compete).
        self.last: Comparison | None = None
        #: Whether the run has warned that validation cannot tell candidates apart.
        self.warned_noise = False

    @property
    def larger_is_better(self) -> bool:
        """``--best-mode max``."""
        return self.best_mode == "max"

    @property
    def start_is_best(self) -> bool:
        """The starting policy is the best candidate (no epoch beat it beyond the noise)."""
        return self.best_label == START

    def consider_start(self, metrics: Mapping[str, float], per_query: Mapping[str, Any]) -> None:
        """Enter the starting policy as the first candidate (nothing is written: the
        trainer writes it as ``best.safetensors`` at the end if it stays the best)."""
        name = self.best_metric
        values = per_query.get(name) if name is not None else None
        value = metrics.get(name) if name is not None else None
        if value is None or value != value or not isinstance(values, torch.Tensor):
            return
        self.best_value = self.start_value = float(value)
        self.best_per_query = values.detach().cpu().to(torch.float64).clone()
        self.start_per_query = self.best_per_query
        self.best_label = START

    def save(
        self,
        name: str,
        weights: Mapping[str, torch.Tensor],
        metadata: dict[str, Any],
        metrics: Mapping[str, float],
        has_validation: bool,
        per_query: Mapping[str, torch.Tensor] | None = None,
        label: str | None = None,
    ) -> Path:
        """Write ``name`` with ``metadata``, then apply ``keep_last`` and ``best_metric``
        (``per_query``: the epoch's per-query validation values; ``label``: how the log
        names the epoch, e.g. ``rce epoch 3``)."""
        path = self.output_dir / name
        save_checkpoint(path, weights, metadata)
        self._retain(path)
        self._save_best(weights, metadata, metrics, per_query or {}, label or name)
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
        per_query: Mapping[str, torch.Tensor],
        label: str,
    ) -> None:
        self.last = None
        name = self.best_metric
        if name is None:
            return
        value = metrics.get(name)
        if value is None or value != value:
            # not measured in this epoch (a metric of another phase; the name itself was
            # checked before training), or NaN: this epoch does not compete
            return
        value = float(value)
        values = per_query.get(name)
        if self.best_value is None:
            better = True
        elif (
            self.paired
            and values is not None
            and self.best_per_query is not None
            and values.shape == self.best_per_query.shape
        ):
            better, diff, half, n = clearly_better(
                values, self.best_per_query, self.larger_is_better
            )
            self.last = Comparison(
                label, value, str(self.best_label), self.best_value, diff, half, n, better
            )
        else:
            better = value > self.best_value if self.larger_is_better else value < self.best_value
            diff = value - self.best_value if self.larger_is_better else self.best_value - value
            self.last = Comparison(
                label, value, str(self.best_label), self.best_value, diff, math.nan, 0, better
            )
        if self.start_is_best and self.last is not None:
            if self.closest is None or self.last.difference > self.closest.difference:
                self.closest = self.last
        if better:
            self.best_value = value
            self.best_label = label
            self.best_per_query = (
                None if values is None else values.detach().cpu().to(torch.float64).clone()
            )
            meta = {**metadata, "best_metric": name, "best_value": value}
            save_checkpoint(self.output_dir / BEST_NAME, weights, meta)

    def write_start(self, weights: Mapping[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
        """Write the starting policy as ``best.safetensors`` (it stayed the best)."""
        path = self.output_dir / BEST_NAME
        meta = {**metadata, "best_metric": self.best_metric, "best_value": self.best_value}
        save_checkpoint(path, weights, meta)
        return path

    def state_dict(self) -> dict[str, Any]:
        """The paths held, the best candidate (value, label, per-query values), the
        start's value and the comparison closest to beating it."""
        return {
            "saved": [str(p) for p in self.saved],
            "best_value": self.best_value,
            "best_label": self.best_label,
            "best_per_query": self.best_per_query,
            "start_value": self.start_value,
            "start_per_query": self.start_per_query,
            "closest": None if self.closest is None else asdict(self.closest),
            "warned_noise": self.warned_noise,
        }

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (a snapshot of an older lever-train holds only the
        paths and the best value: its best then has no per-query values to pair with)."""
        self.saved = [Path(p) for p in saved["saved"]]
        self.best_value = saved["best_value"]
        self.best_label = saved.get("best_label")
        self.best_per_query = saved.get("best_per_query")
        self.start_value = saved.get("start_value")
        self.start_per_query = saved.get("start_per_query")
        closest = saved.get("closest")
        self.closest = None if closest is None else Comparison(**closest)
        self.warned_noise = bool(saved.get("warned_noise", False))


__all__ = ["BEST_NAME", "START", "CheckpointKeeper", "Comparison"]

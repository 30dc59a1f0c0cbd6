"""Objects handed to hooks: the training state and a phase's reward choice."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import torch

if TYPE_CHECKING:
    from .data import Batch, QueryTable
    from .model import PointerPolicy

#: The two training phases, in the order they run.
PHASES = ("rce", "grpo")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run. Plugins read it; only the CLI builds it."""

    rce_epochs: int = 5
    grpo_epochs: int = 0
    batch_size: int = 32
    rce_lr: float = 1e-4
    grpo_lr: float = 1e-5
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    rce_tau_start: float = 2.0
    rce_tau_end: float = 0.5
    kl_beta: float = 0.1
    clip_epsilon: float = 0.2
    advantage_clip: float = 5.0
    early_epochs: int = 1
    early_top_k: int = 3
    late_top_k: int = 5
    seed: int = 42
    device: str = "cpu"
    max_bad_steps: int = 10
    keep_last: int | None = None
    best_metric: str | None = None
    best_mode: str = "max"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, for checkpoint metadata and logs."""
        return asdict(self)


@dataclass(frozen=True)
class RewardChoice:
    """A ``select_reward`` answer: which reward tensor a phase's loss consumes.

    ``name`` is a short label ("raw", "normalized"), ``source`` names the tensor
    ("beam_rewards_raw", "beam_rewards"), and ``compute(batch)`` returns it as a
    [B, G] float tensor aligned with ``batch.sequences`` (padded entries ignored).
    """

    name: str
    source: str
    compute: Callable[[Batch], torch.Tensor]

    @classmethod
    def from_batch_field(cls, name: str, source: str, attr: str) -> RewardChoice:
        """A choice that reads the batch tensor ``attr`` ("rewards_raw", "rewards_norm")."""
        return cls(name=name, source=source, compute=_BatchField(attr))


class _BatchField:
    """Picklable ``batch -> getattr(batch, attr)``."""

    def __init__(self, attr: str) -> None:
        self.attr = attr

    def __call__(self, batch: Batch) -> torch.Tensor:
        value: torch.Tensor = getattr(batch, self.attr)
        return value


@dataclass
class TrainState:
    """What a hook sees of the run; passed to every hook as ``state``.

    Attributes:
        config: the run's :class:`TrainConfig` (read-only).
        model: the :class:`~lever_trainer.model.PointerPolicy` being trained.
        train, val: the training and validation :class:`~lever_trainer.data.QueryTable`.
        output_dir: where checkpoints and logs go.
        phase: ``"rce"``, ``"grpo"``, or None before the first phase.
        epoch: 1-based epoch within the phase (0 before its first epoch).
        step: optimiser steps taken in the current phase.
        steps_per_epoch: optimiser steps in one epoch of the current phase.
        step_in_epoch: optimiser steps taken in the current epoch.
        kl_beta: the current KL weight of the GRPO loss.
        metrics: the metrics of the last finished epoch (empty before).
        last_step: losses of the last optimiser step (``loss``, and ``kl`` in GRPO).
        history: one dict of metrics per finished epoch, in order.
        extra: free space for plugins, keyed by plugin name.
        logger: where :meth:`log` lines go (default: stdout).
    """

    config: TrainConfig
    model: PointerPolicy
    train: QueryTable
    val: QueryTable
    output_dir: Path
    phase: str | None = None
    epoch: int = 0
    step: int = 0
    steps_per_epoch: int = 0
    step_in_epoch: int = 0
    kl_beta: float = 0.1
    metrics: dict[str, float] = field(default_factory=dict)
    last_step: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    logger: Callable[[str], None] = click.echo

    def log(self, message: str) -> None:
        """Print one line of the run's log (plugins use this rather than print)."""
        self.logger(message)

    def phase_epochs(self, phase: str | None = None) -> int:
        """Number of epochs configured for ``phase`` (default: the current one)."""
        phase = phase or self.phase
        return self.config.rce_epochs if phase == "rce" else self.config.grpo_epochs

"""What a training phase is: the object a plugin contributes through the ``phases`` hook.

The trainer runs the active phases in ``order`` and, for each, builds an optimiser over
the parameters that still require gradients after ``configure_trainable_params``, then
runs ``epochs(state)`` epochs of batches: ``loss(state, batch)`` gives the step's loss,
the trainer backpropagates, clips and steps, then calls ``after_step``. Everything that
makes RCE RCE and GRPO GRPO lives in their plugins; the trainer names no phase.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from .data import Batch, QueryTable
    from .state import TrainState


@dataclass
class EpochData:
    """Batches a phase makes for one epoch instead of the logged training table.

    ``table`` holds one row per query with the sequences to learn from (an online phase's
    sampled and judged sequences, say); ``ref_logprobs`` [Q, G] are what the batches
    carry as ``batch.ref_logprobs`` (None for none); the epoch visits every row
    ``passes`` times, each pass in a new shuffled order.
    """

    table: QueryTable
    ref_logprobs: torch.Tensor | None = None
    passes: int = 1


class Phase:
    """Base class of a training phase. Subclasses set the class attributes and ``loss``.

    Class attributes:
        name: the phase's name (``rce``, ``grpo``, ...): checkpoint names, logs, hooks.
        order: where the phase runs; lower first (RCE 20, GRPO 30; a warm-up before
            RCE might use 10).
        epochs_option, lr_option: the ``dest`` of the options (declared by the same
            plugin through ``add_options``) that give its epochs and learning rate.
        needs_reward: ask ``select_reward`` for this phase before training (the answer
            is ``state.rewards[name]``); a phase with epochs and no answer stops the run.
        needs_reference: the phase measures ratios against reference log-probs; its
            batches carry ``ref_logprobs`` (see the ``reference_logprobs`` hook).
        log_metrics: metric keys the phase adds that the epoch line should show.
        metric_names: every metric key the phase adds to an epoch's metrics, declared
            once: ``train_<key>`` for each value ``loss`` returns besides ``loss``, and
            the keys of ``epoch_metrics``. ``--best-metric`` and ``--early-stop-metric``
            are checked against it before training, and a loss or ``epoch_metrics`` that
            reports a key it does not list stops the run naming the key. None (not
            declared, phases written before it) checks nothing and lets any ``train_*``
            name through.
    """

    name: ClassVar[str] = ""
    order: ClassVar[int] = 100
    epochs_option: ClassVar[str] = ""
    lr_option: ClassVar[str] = ""
    needs_reward: ClassVar[bool] = True
    needs_reference: ClassVar[bool] = False
    log_metrics: ClassVar[tuple[str, ...]] = ()
    metric_names: ClassVar[tuple[str, ...] | None] = None

    def init(self, state: TrainState) -> None:
        """Called once when the run is assembled, with the run's options in ``state``
        (before a snapshot's :meth:`load_state_dict` on ``--resume``)."""

    def epochs(self, state: TrainState) -> int:
        """How many epochs this phase runs (0: skipped).

        Read it from ``state.options`` (and ``state.config``): it is also asked before the
        data is loaded, when ``--resume`` checks whether a run has anything left to do."""
        return int(state.options.get(self.epochs_option) or 0) if self.epochs_option else 0

    def learning_rate(self, state: TrainState) -> float:
        """The learning rate of the phase's optimiser."""
        return float(state.options[self.lr_option])

    def make_optimizer(
        self, state: TrainState, params: Iterable[torch.nn.Parameter]
    ) -> torch.optim.Optimizer:
        """A fresh optimiser for the phase: AdamW with the run's weight decay."""
        import torch

        return torch.optim.AdamW(
            list(params), lr=self.learning_rate(state), weight_decay=state.config.weight_decay
        )

    def start(self, state: TrainState, resumed: bool) -> None:
        """Called when the phase begins (after its optimiser and reference log-probs are
        ready, before ``on_phase_start``); ``resumed`` when it continues from a snapshot."""

    def epoch_data(self, state: TrainState, epoch: int, resumed: bool) -> EpochData | None:
        """Data of its own for ``epoch`` (None: the logged training table, rows chosen by
        the ``train_rows`` hook). ``resumed``: the epoch continues from a snapshot, so
        return what was made for it before (keep it in :meth:`state_dict`)."""
        return None

    def loss(self, state: TrainState, batch: Batch) -> dict[str, torch.Tensor]:
        """The step's values for ``batch``: ``loss`` (a scalar to minimise) and any other
        scalars to log (each averaged over the epoch as ``train_<key>``)."""
        raise NotImplementedError

    def after_step(self, state: TrainState, values: dict[str, float]) -> None:
        """Called after each successful optimiser step with the step's values."""

    def epoch_metrics(self, state: TrainState) -> dict[str, float]:
        """Extra metrics recorded at the end of each epoch (e.g. the KL weight)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The phase's own state, kept in resume snapshots (tensors, numbers, strings, and
        lists and dicts of them: what ``plugin_state_dict`` may hold) and merged into each
        checkpoint's metadata. Restored only when the phase had started."""
        return {}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


__all__ = ["EpochData", "Phase"]

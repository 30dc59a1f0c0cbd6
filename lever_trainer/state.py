"""Objects handed to hooks: the run's settings, its training state, a reward choice.

Nothing here names a phase or a variant: phases, their options and their state come
from plugins (the ``phases`` and ``add_options`` hooks).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import LeverError

if TYPE_CHECKING:
    import torch

    from .data import Batch, Embeddings, QueryTable
    from .judge import Judge
    from .phase import Phase
    from .plugins import Decision, PluginSet
    from .policy import Policy


@dataclass(frozen=True)
class TrainConfig:
    """The core's settings of a run; phases and plugins keep theirs in ``state.options``."""

    batch_size: int = 32
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 42
    device: str = "cpu"
    max_bad_steps: int = 10
    keep_last: int | None = None
    best_metric: str | None = None
    best_mode: str = "max"
    best_rule: str = "paired"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, for checkpoint metadata and logs."""
        return asdict(self)


@dataclass(frozen=True)
class About:
    """What a plugin says of itself: its ``about`` hook's answer.

    Attributes:
        description: one line, shown by ``lever-train plugins`` (default: the first line
            of the plugin's docstring).
        enabled_by_default: the plugin takes part in every run unless ``--no-plugin
            NAME`` (otherwise it waits for ``--plugin NAME``).
        enable_flags, disable_flags: flags such as ``"--use_top1_only"`` that ``train``
            accepts as ``--plugin NAME`` / ``--no-plugin NAME`` (the spellings of the
            script a plugin replaces).
        chooses: what the plugin decides, in a few words ("the RCE reward"): two
            plugins that choose the same thing cannot both be asked for by name; the run
            is refused before it starts, naming both.
    """

    description: str = ""
    enabled_by_default: bool = False
    enable_flags: tuple[str, ...] = ()
    disable_flags: tuple[str, ...] = ()
    chooses: str = ""

    def __post_init__(self) -> None:
        for name in ("enable_flags", "disable_flags"):
            flags = getattr(self, name)
            if isinstance(flags, str) or not all(
                isinstance(f, str) and f.startswith("--") for f in flags
            ):
                raise TypeError(f"About.{name} must be a tuple of '--flags', got {flags!r}")
            object.__setattr__(self, name, tuple(flags))


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


@dataclass(frozen=True)
class PolicyObjective:
    """A ``policy_objective`` answer: the surrogate a GRPO-style step maximises.

    ``objective`` [B, G] is each kept candidate's surrogate value (the phase minimises
    minus its per-query mean). ``clipped_low`` / ``clipped_high`` [B, G] (bool, optional)
    mark the candidates whose gradient the lower / upper clip removed; the phase reports
    their fractions as ``clip_low`` and ``clip_high``.
    """

    objective: torch.Tensor
    clipped_low: torch.Tensor | None = None
    clipped_high: torch.Tensor | None = None


@dataclass
class StopRequest:
    """A plugin's request to end the run after the current epoch."""

    reason: str
    plugin: str | None


@dataclass
class TrainState:
    """What a hook sees of the run; passed to every hook as ``state``.

    Attributes:
        config: the core's :class:`TrainConfig` (read-only).
        options: every option value of the run by ``dest`` (the core's and every
            active plugin's, see the ``add_options`` hook), read-only.
        model: the policy being trained (a :class:`lever_trainer.api.Policy`).
        train, val: the training and validation :class:`~lever_trainer.data.QueryTable`.
        output_dir: where checkpoints and logs go.
        phase: the current phase's name, or None before the first phase.
        current_phase: the current :class:`~lever_trainer.phase.Phase` object, or None.
        phases: the run's phases, in the order they run.
        epoch: 1-based epoch within the phase (0 before its first epoch).
        epochs: the number of epochs of the current phase.
        step: optimiser steps taken in the current phase.
        global_step: optimiser steps taken in the whole run.
        steps_per_epoch: optimiser steps in one epoch of the current phase.
        step_in_epoch: optimiser steps taken in the current epoch.
        ref_logprobs: the reference log-probs [Q, G] of the training candidates the
            current phase measures ratios against (None for phases that use none).
        rewards: the ``select_reward`` answer of each phase that asked for one.
        metrics: the metrics of the last finished epoch (empty before).
        start_metrics: the validation metrics of the starting policy, before the first
            phase (empty without a validation split); "epoch 0" of the run.
        last_step: values of the last optimiser step (``loss`` and whatever the phase's
            loss returned, plus ``grad_norm``); empty after a step that was skipped for
            a non-finite loss or gradient.
        history: one dict of metrics per finished epoch, in order.
        best: set at the end of a run with a best checkpoint: ``label`` (``start`` or
            e.g. ``rce epoch 3``), ``metric`` and ``value`` of the candidate checkpoint
            selection chose as ``best.safetensors`` (see ``lever_trainer.retention``).
        extra: free space for plugins, keyed by plugin name.
        stop_request: set by :meth:`request_stop`.
        emb: the query and candidate embedding tables.
        judge: the run's downstream judge (``--judge``; a :class:`~lever_trainer.judge.Judge`
            with its verdict store), or None.
        logger: where :meth:`log` lines go (default: stdout).
        logprobs_fn: set by the trainer; see :meth:`eval_logprobs`.
    """

    config: TrainConfig
    model: Policy
    train: QueryTable
    val: QueryTable
    output_dir: Path
    options: Mapping[str, Any] = field(default_factory=dict)
    plugins: PluginSet | None = None
    phase: str | None = None
    current_phase: Phase | None = None
    phases: list[Phase] = field(default_factory=list)
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    global_step: int = 0
    steps_per_epoch: int = 0
    step_in_epoch: int = 0
    ref_logprobs: torch.Tensor | None = None
    rewards: dict[str, RewardChoice] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    start_metrics: dict[str, float] = field(default_factory=dict)
    last_step: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    stop_request: StopRequest | None = None
    judge: Judge | None = None
    emb: Embeddings | None = None
    logger: Callable[[str], None] = print
    logprobs_fn: Callable[[QueryTable], torch.Tensor] | None = field(default=None, repr=False)
    #: Every metric name an epoch of the phases still to run can report (set by the
    #: trainer before ``on_train_start`` from the phases' ``metric_names``, its own and
    #: validation's); see :meth:`knows_metric`.
    metric_names: set[str] = field(default_factory=set, repr=False)
    #: Some phase declares no ``metric_names``: any ``train_*`` name may be one of its.
    metrics_open: bool = False
    _decided: set[str] = field(default_factory=set, repr=False)

    def log(self, message: str) -> None:
        """Print one line of the run's log (plugins use this rather than print)."""
        self.logger(message)

    def eval_logprobs(self, table: QueryTable | None = None) -> torch.Tensor:
        """The current policy's eval-mode sequence log-probs [Q, G] of every candidate of
        ``table`` (default: ``train``; padded entries 0), without gradients.

        One pass over the table, in the trainer's evaluation batches: what a plugin that
        moves the reference during a phase needs (``reference-sync``).
        """
        if self.logprobs_fn is None:
            raise RuntimeError("eval_logprobs needs a trainer (state.logprobs_fn is unset)")
        return self.logprobs_fn(self.train if table is None else table)

    def state_dict(self) -> dict[str, Any]:
        """Where the run stands and what it has recorded, for resume snapshots: the
        position (``phase``, ``epoch``, ``step``, ``global_step``, ``step_in_epoch``), the
        ``history``, the last and the starting ``metrics``, the reference log-probs and a
        plugin's stop request."""
        stop = self.stop_request
        return {
            "phase": self.phase,
            "epoch": self.epoch,
            "step": self.step,
            "global_step": self.global_step,
            "step_in_epoch": self.step_in_epoch,
            "history": list(self.history),
            "start_metrics": self.start_metrics,
            "metrics": self.metrics,
            "stop_request": None if stop is None else [stop.reason, stop.plugin],
            "ref_logprobs": self.ref_logprobs,
        }

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, except the position inside the
        phase (``phase``, ``epoch``, ``step``, ``step_in_epoch``), which the trainer sets
        when it re-enters the snapshot's phase and epoch."""
        self.history = list(saved["history"])
        self.start_metrics = dict(saved.get("start_metrics") or {})
        self.metrics = dict(saved["metrics"])
        self.global_step = saved["global_step"]
        self.ref_logprobs = saved["ref_logprobs"]
        if saved.get("stop_request") is not None:
            reason, plugin = saved["stop_request"]
            self.stop_request = StopRequest(reason, plugin)

    def knows_metric(self, name: str) -> bool:
        """Whether an epoch of this run can report the metric ``name`` (what a plugin that
        watches a metric, like ``early-stopping``, checks before the first epoch)."""
        return name in self.metric_names or (self.metrics_open and name.startswith("train_"))

    def phase_epochs(self, phase: str | None = None) -> int:
        """Number of epochs of ``phase`` (default: the current one; 0 if it is not run)."""
        name = phase or self.phase
        for p in self.phases:
            if p.name == name:
                return p.epochs(self)
        return 0

    def request_stop(self, reason: str) -> None:
        """End the run cleanly after the current epoch (its checkpoint, snapshot and
        ``on_epoch_end`` included; then ``on_phase_end`` and ``on_train_end``).

        The log names the plugin that asked (the one whose hook is running) and the
        reason. The first request wins.
        """
        if self.stop_request is None:
            plugin = self.plugins.current_plugin if self.plugins is not None else None
            self.stop_request = StopRequest(reason, plugin)

    def decide(self, hook: str, **kwargs: Any) -> Decision | None:
        """Ask a single-answer hook (``state`` is passed for you); None when nobody answers.

        Returns the :class:`~lever_trainer.plugins.Decision`: ``.value`` is the answer,
        ``.plugin`` the plugin that gave it (name it when the answer is unusable).
        Phases use this for the decisions inside a step (which candidates a step keeps,
        the advantages, ...). The first answer of each hook in each phase is logged
        with the plugin that gave it.
        """
        assert self.plugins is not None
        decision = self.plugins.call_single(hook, state=self, **kwargs)
        if decision is None:
            return None
        key = f"{self.phase}:{hook}"
        if key not in self._decided:
            self._decided.add(key)
            self.log(f"{self.phase}: {hook} [{decision.plugin}, {decision.origin}]")
        return decision

    def require(self, hook: str, example: str, **kwargs: Any) -> Decision:
        """:meth:`decide` for a decision a phase cannot do without: nobody answering is
        a user error naming the hook, the phase (``kwargs["phase"]``) and ``example``, a
        plugin that would answer (``--plugin EXAMPLE``)."""
        decision = self.decide(hook, **kwargs)
        if decision is None:
            raise LeverError(
                f"no active plugin answers hook {hook} for phase {kwargs.get('phase')!r}; "
                f"enable one (e.g. --plugin {example})"
            )
        return decision

"""The core loop: run -> phase -> epoch -> step. It names no phase and no variant.

Read it top to bottom: :meth:`Trainer.fit` runs the active phases in order;
:meth:`Trainer.run_phase` lets the plugins choose what trains, builds the phase's
optimiser and reference, then runs its epochs; :meth:`Trainer.run_epoch` visits the
rows the ``train_rows`` hook chose; :meth:`Trainer.step` asks the phase for a loss and
takes one optimiser step. Every decision is a hook call or a method of the phase
object a plugin contributed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import __version__, snapshot
from .checkpoint import checkpoint_name
from .coreoptions import VAL_RATIO
from .data import Batch, Embeddings, QueryTable, iter_batches
from .errors import Interrupted, JudgeStopped, LeverError, PluginError, StoreError
from .evaluation import (
    ALL_JUDGED_METRICS,
    ALL_VALIDATION_METRICS,
    Evaluator,
    format_metrics,
)
from .judge import Judge
from .judge_driver import JudgeCost
from .metrics import JUDGE_COST_METRICS, TRAINER_METRICS, clearly_better
from .phase import Phase
from .plugins import Decision, PluginSet, implementers
from .policy import Policy
from .retention import BEST_NAME, START, CheckpointKeeper
from .state import RewardChoice, TrainConfig, TrainState

SNAPSHOT_NAME = snapshot.SNAPSHOT_NAME
#: The metric that picks ``best.safetensors`` when ``--best-metric`` is not given:
#: the judged accuracy of the free selection with a judge, else the logged reward@1.
DEFAULT_BEST_METRIC = "policy_reward@1"
DEFAULT_JUDGED_BEST_METRIC = "judge_correct@greedy"
#: The validation split is called too small to tell candidates apart when an epoch is
#: better on average but within the noise, and that noise (the paired 95 % half-width)
#: is above this share of the best value's magnitude (1 point at an accuracy of 1.0).
NOISE_WARN_RELATIVE = 0.01


class StopRequested(Exception):
    """Raised after a stop was requested (a signal) and the snapshot was written."""

    def __init__(self, reason: str, state: TrainState) -> None:
        super().__init__(reason)
        self.reason = reason
        self.phase, self.epoch, self.step = state.phase, state.epoch, state.step_in_epoch


def suggest(hook: str) -> str:
    """`` (installed: --plugin A, --plugin B)``: the installed plugins that implement
    ``hook``, for a message saying that no active one does (empty when none is)."""
    names = implementers(hook)
    return f" (installed: {', '.join(f'--plugin {n}' for n in names)})" if names else ""


def collect_phases(plugins: PluginSet) -> list[Phase]:
    """The phases the active plugins contribute, lowest ``order`` first."""
    phases: dict[str, tuple[str, Phase]] = {}
    for plugin, answer in plugins.call_all("phases"):
        for phase in answer or ():
            if not isinstance(phase, Phase) or not phase.name:
                raise PluginError(
                    f"plugin {plugin}: hook phases must return Phase objects with a name, "
                    f"got {phase!r}"
                )
            if phase.name in phases:
                raise PluginError(
                    f"plugins {phases[phase.name][0]} and {plugin} both contribute phase "
                    f"{phase.name!r}; disable one of them (--no-plugin)"
                )
            phases[phase.name] = (plugin, phase)
    return sorted((p for _, p in phases.values()), key=lambda p: (p.order, p.name))


def remaining_phases(
    phases: list[Phase], state: TrainState, resume: dict[str, Any] | None
) -> list[Phase]:
    """The phases a run still has to run: those with epochs, from the snapshot's phase on
    when resuming, without a phase whose last epoch the snapshot closed.

    ``state`` needs only ``options`` and ``config`` (phases read their epochs from
    options), so this is also asked before the data is loaded.
    """
    with_epochs = [p for p in phases if p.epochs(state) > 0]
    if resume is None or resume["phase"] is None:
        return with_epochs
    names = [p.name for p in phases]
    if resume["phase"] not in names:
        have = ", ".join(p.name for p in with_epochs) or "none"
        raise LeverError(
            f"--resume: the snapshot stopped in phase {resume['phase']!r}, which this "
            f"run does not have (phases with epochs: {have})"
        )
    at = names.index(resume["phase"])
    current = phases[at]
    finished = resume["epoch_closed"] and resume["epoch"] >= current.epochs(state)
    later = [p for p in phases[at + 1 :] if p.epochs(state) > 0]
    return later if finished else [current, *later]


class CheckedReward:
    """A ``RewardChoice.compute`` wrapped so that what it returns is checked: a float tensor
    shaped like the batch's candidates [B, G]; failures name the plugin that chose it."""

    def __init__(self, compute: Callable[[Batch], torch.Tensor], plugin: str) -> None:
        self.compute = compute
        self.plugin = plugin

    def __call__(self, batch: Batch) -> torch.Tensor:
        try:
            rewards = self.compute(batch)
        except LeverError:
            raise
        except Exception as exc:
            raise PluginError(
                f"plugin {self.plugin}: the reward chosen by its select_reward failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        expected = tuple(batch.cand_mask.shape)
        if not isinstance(rewards, torch.Tensor):
            raise PluginError(
                f"plugin {self.plugin}: the reward chosen by its select_reward returned "
                f"{type(rewards).__name__}, expected a float tensor of shape {list(expected)}"
            )
        if tuple(rewards.shape) != expected or not rewards.is_floating_point():
            raise PluginError(
                f"plugin {self.plugin}: the reward chosen by its select_reward returned a "
                f"tensor of shape {list(rewards.shape)} {rewards.dtype}, expected a float "
                f"tensor of shape {list(expected)} (one reward per candidate)"
            )
        return rewards


class Trainer:
    """Runs a whole training job; see the module docstring for the order of events."""

    def __init__(
        self,
        config: TrainConfig,
        model: Policy,
        train: QueryTable,
        val: QueryTable,
        emb: Embeddings,
        plugins: PluginSet,
        output_dir: Path,
        options: dict[str, Any] | None = None,
        run_metadata: dict[str, Any] | None = None,
        log: Callable[[str], None] | None = None,
        judge: Judge | None = None,
    ) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.model = model.to(self.device)
        self.emb = emb
        self.plugins = plugins
        self.output_dir = output_dir
        self.run_metadata = dict(run_metadata or {})
        self.phases = collect_phases(plugins)
        self.state = TrainState(
            config=config,
            model=self.model,
            train=train,
            val=val,
            output_dir=output_dir,
            options={**plugins.option_defaults(), **(options or {})},
            plugins=plugins,
            phases=self.phases,
            judge=judge,
            emb=emb,
        )
        if log is not None:
            self.state.logger = log
        self.state.logprobs_fn = self.compute_logprobs
        for phase in self.phases:
            phase.init(self.state)
        self.evaluator = Evaluator(self.model, emb, self.device, config.batch_size, judge)
        best_metric, best_mode = self.selection_metric()
        self.keeper = CheckpointKeeper(
            output_dir,
            config.keep_last,
            best_metric,
            best_mode,
            paired=config.best_rule == "paired",
        )
        self.init_progress()
        if judge is not None:
            self.attach_judge(judge)
        #: The judge's cost when the current epoch began (its metrics are the difference).
        self.judge_mark: JudgeCost | None = None

    def init_progress(self) -> None:
        """The run's bookkeeping before its first step: rewards, generator, reference,
        optimiser, stop and snapshot state (a resume restores them from its snapshot)."""
        self.rewards: dict[str, Decision] = {}
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.start_logprobs: torch.Tensor | None = None
        #: The starting weights: ``best.safetensors`` when no epoch beats them on
        #: validation, and the source of ``start_logprobs`` for a run extended into a
        #: phase that needs them (``--resume DIR --grpo-epochs N``, see
        #: ``choose_reference``).
        self.start_weights: dict[str, torch.Tensor] | None = None
        #: Set while a step's optimiser update is applied but its bookkeeping is not done:
        #: a snapshot taken then would not be the state after any completed step.
        self.step_torn = False
        self.notes: set[str] = set()
        self.optimizer: torch.optim.Optimizer | None = None
        self.params: list[torch.nn.Parameter] = []
        self.bad_steps = 0
        #: Set (to the signal's name) by a signal handler: stop after the current step.
        self.stop_requested: str | None = None
        self.epoch_progress: dict[str, Any] = {}
        self.step_rng: dict[str, Any] = snapshot.capture_rng(self.generator)
        #: Plugins whose ``on_step_end`` did not run for the last step (one failed).
        self.pending_step_end: list[str] = []
        #: Whether OUTPUT_DIR holds a snapshot of this run (written, or resumed from).
        self.has_snapshot = False

    def attach_judge(self, judge: Judge) -> None:
        """Tie the judge to this run: a stop signal ends a wait for its answer, a spent
        call budget stops the run resumably, and a long round logs its progress."""
        # a stop signal ends a wait for the judge at once (not after its answer)
        judge.stop_reason = lambda: self.stop_requested
        # a spent --judge-max-calls stops the run like a signal: resumable
        judge.stop_on_budget = True
        # a long round's progress in a log file (a terminal gets a bar)
        judge.log = lambda message: self.state.log(message)

    # -- the whole job -----------------------------------------------------------
    def fit(self, resume: dict[str, Any] | None = None) -> TrainState:
        """Run every phase that has epochs; returns the final state.

        ``resume`` is a snapshot (:mod:`lever_trainer.snapshot`): the run continues from
        the step after it, with every state as it was.
        """
        state = self.state
        to_run = self.phases_to_run(resume)
        self.check_settings(to_run)
        state.metric_names, state.metrics_open = self.declared_metrics(to_run)
        if not self.rewards:
            self.resolve_rewards()
        self.plugins.call_all("on_train_start", state=state)
        if resume is None:
            self.record_start(to_run)
        else:
            self.load_state_dict(resume)
            state.log(
                f"resumed from phase {resume['phase']} epoch {resume['epoch']} "
                f"step {resume['step_in_epoch']}"
            )
        self.has_snapshot = resume is not None
        for phase in to_run:
            if state.stop_request is not None:
                break
            same_phase = resume is not None and phase.name == resume["phase"]
            self.run_phase_keeping_progress(phase, resume if same_phase else None)
        if state.stop_request is not None:
            who = state.stop_request.plugin or "a plugin"
            state.log(f"stopped early by {who}: {state.stop_request.reason}")
        verdict = self.finish_best()
        self.plugins.call_all("on_train_end", state=state)
        if verdict:
            state.log(verdict)
        return state

    def record_start(self, to_run: Sequence[Phase]) -> None:
        """A fresh run's starting point: the reference log-probs (when a phase needs
        them), the starting weights and, with a validation set, the starting metrics."""
        state = self.state
        # the starting model's log-probs: docs/algorithm.md#reference-log-probs
        if any(p.needs_reference for p in to_run):
            self.start_logprobs = self.compute_logprobs(state.train)
        self.start_weights = {
            k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()
        }
        if not len(state.val):
            return
        if state.judge is None:
            state.log(
                "validation ranks the logged candidates only (policy_*@1); give "
                "--judge NAME to judge the policy's own free selection"
            )
        try:
            start = self.evaluator.validation(state.val)
        except JudgeStopped as stop:
            raise LeverError(self.stopped_early(stop)) from None
        state.start_metrics = start.metrics
        self.keeper.consider_start(start.metrics, start.per_query)
        state.log("start: " + format_metrics(state.start_metrics))
        self.plugins.call_all("on_start_validation", state=state, metrics=state.start_metrics)

    def run_phase_keeping_progress(self, phase: Phase, resume: dict[str, Any] | None) -> None:
        """Run one phase; when it fails or the judge stops it, keep the last completed
        step's progress and re-raise in the form the caller reports."""
        try:
            try:
                self.run_phase(phase, resume)
            except (SystemExit, KeyboardInterrupt) as exc:
                if isinstance(exc, Interrupted):
                    raise
                # a phase's code that exits (or fakes an interrupt) has failed
                raise PluginError(
                    f"phase {phase.name} failed: {type(exc).__name__}: {exc}"
                ) from exc
        except (PluginError, StoreError) as exc:
            # A plugin, the judge or its store failed inside the phase: keep the last
            # completed step (unless the failure came between a step's update and its
            # bookkeeping, or before the epoch's data was made, or from the snapshot
            # itself: then the newest snapshot on disk stays, and is the one to use).
            self.keep_progress()
            exc.snapshot = self.has_snapshot  # type: ignore[union-attr]
            raise
        except JudgeStopped as stop:
            self.keep_progress()
            if not self.has_snapshot:
                raise LeverError(self.stopped_early(stop)) from None
            raise StopRequested(stop.reason, self.state) from None

    @staticmethod
    def stopped_early(stop: JudgeStopped) -> str:
        """The line for a stop while the judge was asked, before any snapshot."""
        return (
            f"stopped by {stop.reason} while waiting for the judge, before this run wrote "
            "its first snapshot: nothing to resume; start it again"
        )

    def keep_progress(self) -> None:
        """After a failure inside an epoch: snapshot the last completed step, when the
        epoch's progress is whole (see :meth:`fit`)."""
        if self.epoch_progress and not self.step_torn:
            try:
                self.save_snapshot(epoch_closed=False)
            except LeverError:
                pass

    def selection_metric(self) -> tuple[str | None, str]:
        """The metric and mode (``--best-mode``) that choose ``best.safetensors``:
        ``--best-metric`` when given; else, with a validation split, the judged accuracy
        (with a judge) or ``policy_reward@1``; else none."""
        mode = self.config.best_mode
        if self.config.best_metric is not None:
            return self.config.best_metric, mode
        if not len(self.state.val):
            return None, mode
        judged = self.state.judge is not None
        return (DEFAULT_JUDGED_BEST_METRIC if judged else DEFAULT_BEST_METRIC), mode

    def finish_best(self) -> str | None:
        """At the end of a run: the line that says whether training beat the starting
        policy on validation; when it did not, ``best.safetensors`` is the starting
        policy (written here, with the run's metadata, as ``phase: start, epoch: 0``)."""
        keeper, state = self.keeper, self.state
        metric = keeper.best_metric
        if metric is None or keeper.start_value is None or not state.history:
            return None
        state.best = {"label": keeper.best_label, "metric": metric, "value": keeper.best_value}
        if keeper.start_is_best:
            if self.start_weights is None:
                return (
                    f"training did not beat the starting policy on validation ({metric}); "
                    f"its weights are not in this run's snapshot (written by an older "
                    f"lever-train), so {BEST_NAME} was not written"
                )
            keeper.write_start(
                self.start_weights,
                self.checkpoint_metadata(START, 0, state.start_metrics, phase_states=False),
            )
            closest = keeper.closest
            if closest is None:
                detail = f"{metric} {keeper.start_value:.4f} at the start, no epoch measured it"
            elif not closest.n:  # --best-rule value: no paired comparison
                detail = (
                    f"{metric} {keeper.start_value:.4f} -> {closest.value:.4f} at best "
                    f"({closest.label})"
                )
            else:
                noise = f"{closest.half_width:.4f}" if math.isfinite(closest.half_width) else "?"
                detail = (
                    f"{metric} {keeper.start_value:.4f} -> {closest.value:.4f} at best "
                    f"({closest.label}; paired difference {closest.difference:+.4f} +- "
                    f"{noise}, 95 %, {closest.n} queries)"
                )
            return (
                f"training did not beat the starting policy on validation: {detail}; "
                f"{BEST_NAME} is the starting policy"
            )
        if keeper.best_per_query is None or keeper.start_per_query is None:
            return f"{BEST_NAME}: {keeper.best_label} by {metric} {keeper.best_value:.4f}"
        _, diff, half, n = clearly_better(
            keeper.best_per_query, keeper.start_per_query, keeper.larger_is_better
        )
        return (
            f"training beat the starting policy on validation: {metric} "
            f"{keeper.start_value:.4f} -> {keeper.best_value:.4f} (paired difference "
            f"{diff:+.4f} +- {half:.4f}, 95 %, {n} queries); {BEST_NAME} is "
            f"{keeper.best_label}"
        )

    def phases_to_run(self, resume: dict[str, Any] | None) -> list[Phase]:
        """The phases with epochs, from the snapshot's phase on when resuming (see
        :func:`remaining_phases`)."""
        return remaining_phases(self.phases, self.state, resume)

    def declared_metrics(self, phases: Sequence[Phase] | None = None) -> tuple[set[str], bool]:
        """``(names, open)``: every metric an epoch of ``phases`` (default: all the run's)
        can report, from the phases' declarations (``Phase.metric_names``), the trainer's
        own (:data:`TRAINER_METRICS`) and validation's; ``open`` when a phase declares
        none, so that any ``train_*`` name may be one of its."""
        names = set(TRAINER_METRICS)
        if self.state.judge is not None:
            names |= set(JUDGE_COST_METRICS)
        if len(self.state.val):
            names |= set(ALL_VALIDATION_METRICS)
            if self.state.judge is not None:
                names |= set(ALL_JUDGED_METRICS)
        undeclared = False
        for phase in self.phases if phases is None else phases:
            if phase.metric_names is None:
                undeclared = True
            else:
                names |= set(phase.metric_names)
        return names, undeclared

    def check_settings(self, to_run: list[Phase]) -> None:
        """Settings that can only be checked against the phases and the data, checked
        before anything is written: ``--best-metric`` must name a metric the run has."""
        name = self.config.best_metric
        if name is None:
            return
        validation = set(ALL_VALIDATION_METRICS)
        if self.state.judge is not None:
            validation |= set(ALL_JUDGED_METRICS)
        if name in validation:
            if not len(self.state.val):
                raise LeverError(
                    f"--best-metric {name}: a validation metric, but this run has no "
                    "validation queries (raise --val-ratio, or name a training metric)"
                )
            return
        known, undeclared = self.declared_metrics(to_run or self.phases)
        if name in known or (undeclared and name.startswith("train_")):
            return
        raise LeverError(
            f"--best-metric: no metric named {name!r} (known: {', '.join(sorted(known))})"
        )

    def check_declared(self, phase: Phase, names: Iterable[str], where: str) -> None:
        """A phase that declares its metrics reports no other (``names``: what its
        ``where`` gave, as epoch metric names)."""
        if phase.metric_names is None:
            return
        extra = sorted(set(names) - set(phase.metric_names))
        if extra:
            raise PluginError(
                f"phase {phase.name}: {where} reports {', '.join(extra)}, which its "
                "metric_names does not declare"
            )

    def resolve_rewards(self) -> dict[str, Decision]:
        """Ask ``select_reward`` for every phase that will run and needs one; log the answers."""
        decisions = {}
        for phase in self.phases_to_run(None):
            if not phase.needs_reward:
                continue
            decision = self.plugins.call_single("select_reward", state=self.state, phase=phase.name)
            if decision is None:
                raise LeverError(
                    f"no active plugin answers hook select_reward for phase {phase.name!r}; "
                    f"enable one{suggest('select_reward')}, see `lever-train plugins`"
                )
            answer = decision.value
            if not isinstance(answer, RewardChoice) or not callable(answer.compute):
                raise PluginError(
                    f"plugin {decision.plugin}: hook select_reward returned "
                    f"{type(answer).__name__} {answer!r:.60} for phase {phase.name!r}, "
                    "expected a lever_trainer.api.RewardChoice"
                )
            choice = RewardChoice(
                answer.name, answer.source, CheckedReward(answer.compute, decision.plugin)
            )
            self.state.log(
                f"{phase.name.upper()} reward: {choice.name} ({choice.source}) [{decision.label}]"
            )
            decisions[phase.name] = decision
            self.state.rewards[phase.name] = choice
        self.rewards = decisions
        return decisions

    # -- one phase ---------------------------------------------------------------
    def run_phase(self, phase: Phase, resume: dict[str, Any] | None = None) -> None:
        """Choose trainable parameters, build the optimiser and reference, run the epochs."""
        state = self.state
        state.phase, state.current_phase, state.epoch, state.step = phase.name, phase, 0, 0
        state.epochs = phase.epochs(state)
        state.steps_per_epoch = math.ceil(len(state.train) / self.config.batch_size)
        self.epoch_progress = {}
        self.params = self.trainable_params()
        self.optimizer = phase.make_optimizer(state, self.params)
        first_epoch, progress = 1, None
        if resume is not None:
            try:
                self.optimizer.load_state_dict(resume["optimizer"])
            except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as exc:
                raise LeverError(
                    f"{self.output_dir / SNAPSHOT_NAME}: its optimiser state does not fit "
                    f"phase {phase.name} ({type(exc).__name__}: {exc})"
                ) from None
            state.step = resume["step"]
            first_epoch = resume["epoch"] + int(resume["epoch_closed"])
            progress = None if resume["epoch_closed"] else resume
        else:
            self.choose_reference(phase)
        phase.start(state, resumed=resume is not None)
        self.plugins.call_all("on_phase_start", state=state)
        for epoch in range(first_epoch, state.epochs + 1):
            self.run_epoch(phase, epoch, progress)
            progress = None
            if state.stop_request is not None:
                break
        self.plugins.call_all("on_phase_end", state=state)

    def trainable_params(self) -> list[torch.nn.Parameter]:
        """Every parameter trainable, then ``configure_trainable_params`` freezes."""
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.plugins.call_all("configure_trainable_params", state=self.state, model=self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise LeverError(f"phase {self.state.phase}: the active plugins froze every parameter")
        return params

    def choose_reference(self, phase: Phase) -> None:
        """The reference log-probs of a phase that needs them (``reference_logprobs`` hook)."""
        state = self.state
        if not phase.needs_reference:
            state.ref_logprobs = None
            return
        decision = self.plugins.call_single(
            "reference_logprobs",
            state=state,
            phase=phase.name,
            compute=lambda: self.compute_logprobs(state.train),
        )
        if decision is None:
            if self.start_logprobs is None:
                self.start_logprobs = self.starting_logprobs()
            state.ref_logprobs = self.start_logprobs
            return
        ref = decision.value
        expected = tuple(state.train.rewards_raw.shape)
        if not isinstance(ref, torch.Tensor) or tuple(ref.shape) != expected:
            shape = tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__
            raise LeverError(
                f"plugin {decision.plugin}: hook reference_logprobs returned {shape}, "
                f"expected a tensor of shape {expected}"
            )
        state.ref_logprobs = ref.detach().to(torch.float32).cpu()
        state.log(f"{phase.name.upper()} reference log-probs: [{decision.label}]")

    # -- one epoch ---------------------------------------------------------------
    def run_epoch(self, phase: Phase, epoch: int, progress: dict[str, Any] | None) -> None:
        """Visit the epoch's rows batch by batch, then validate, save and snapshot."""
        state, bs = self.state, self.config.batch_size
        state.epoch, state.step_in_epoch = epoch, 0
        started = time.perf_counter()
        self.model.train(self.train_mode(phase))
        # Until the epoch's data is made, the progress on record is the previous epoch's:
        # a failure in between (a judge that fails mid-round) must not snapshot it as
        # this epoch's. The newest snapshot on disk (the previous epoch's end) stays.
        self.epoch_progress = {}
        if state.judge is not None:
            self.judge_mark = state.judge.cost.copy()
        data = phase.epoch_data(state, epoch, resumed=progress is not None)
        table = state.train if data is None else data.table
        if progress is not None:  # resuming inside this epoch
            self.epoch_progress = {
                "epoch_order": progress["epoch_order"],
                "epoch_sums": dict(progress["epoch_sums"]),
                "epoch_counted": progress["epoch_counted"],
                "epoch_skipped": progress["epoch_skipped"],
            }
            state.step_in_epoch = progress["step_in_epoch"]
            snapshot.restore_rng(progress)
            self.step_rng = snapshot.capture_rng(self.generator)
            pending = [n for n in progress.get("pending_step_end") or [] if n in self.plugins.names]
            if pending:  # the last step, for the plugins that failed to see it
                state.last_step = dict(progress.get("pending_last_step") or {})
                self.plugins.call_all("on_step_end", only=pending, state=state)
        else:
            if data is None:
                order = self.epoch_rows(phase, epoch)
            else:
                passes = [
                    torch.randperm(len(table), generator=self.generator)
                    for _ in range(max(data.passes, 1))
                ]
                order = torch.cat(passes)
            self.epoch_progress = {
                "epoch_order": order,
                "epoch_sums": {},
                "epoch_counted": 0,
                "epoch_skipped": 0,
            }
            # the random states a snapshot of this epoch starts from (the order and the
            # epoch's data drew from them); then each step records its own, once
            self.step_rng = snapshot.capture_rng(self.generator)
        order = self.epoch_progress["epoch_order"]
        state.steps_per_epoch = math.ceil(len(order) / bs)
        rows = order[state.step_in_epoch * bs :]
        ref = None if data is None else data.ref_logprobs
        for batch in iter_batches(table, self.emb, bs, rows, ref):
            if data is None and phase.needs_reference and state.ref_logprobs is not None:
                # read per step: a plugin may move the reference during the phase
                batch.ref_logprobs = state.ref_logprobs[batch.rows, : batch.sequences.shape[1]]
            self.step(phase, batch)
        self.end_epoch(phase, started)

    def train_mode(self, phase: Phase) -> bool:
        """The ``train_mode`` answer for the phase's epochs (default: training mode)."""
        decision = self.state.decide("train_mode", phase=phase.name)
        return True if decision is None else bool(decision.value)

    def epoch_rows(self, phase: Phase, epoch: int) -> torch.Tensor:
        """The rows the epoch visits: the ``train_rows`` hook's answer, else all, shuffled."""
        n = len(self.state.train)
        decision = self.plugins.call_single(
            "train_rows", state=self.state, phase=phase.name, epoch=epoch, generator=self.generator
        )
        if decision is None:
            return torch.randperm(n, generator=self.generator)
        rows = decision.value
        if (
            not isinstance(rows, torch.Tensor)
            or rows.dim() != 1
            or rows.dtype not in (torch.int64, torch.int32)
            or len(rows) == 0
            or int(rows.min()) < 0
            or int(rows.max()) >= n
        ):
            raise LeverError(
                f"plugin {decision.plugin}: hook train_rows must return a non-empty 1-D "
                f"integer tensor of rows in [0, {n}), got {rows!r}"
            )
        return rows.to(torch.long)

    def step(self, phase: Phase, batch: Batch) -> None:
        """One optimiser step on ``batch`` (skipped when its loss or gradient is not finite)."""
        state, progress = self.state, self.epoch_progress
        assert self.optimizer is not None
        batch = batch.to(self.device)
        out = phase.loss(state, batch)
        self.optimizer.zero_grad(set_to_none=True)
        grad_norm = self.backward(out["loss"], batch)
        if grad_norm is not None:
            lr = self.set_learning_rate(phase)
            self.step_torn = True
            self.optimizer.step()
            self.check_weights(phase)
            self.check_declared(phase, (f"train_{k}" for k in out if k != "loss"), "loss")
            values = {k: float(v.detach()) for k, v in out.items()}
            values["grad_norm"] = grad_norm
            values["lr"] = lr
            state.last_step = values
            phase.after_step(state, values)
            self.step_torn = False
            sums = progress["epoch_sums"]
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v * len(batch)
            progress["epoch_counted"] += len(batch)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            progress["epoch_skipped"] += 1
            state.last_step = {}  # no optimiser step: no values
        state.step += 1
        state.global_step += 1
        state.step_in_epoch += 1
        # the random states after this step, taken once: what a snapshot of it holds
        self.step_rng = snapshot.capture_rng(self.generator)
        try:
            self.plugins.call_all("on_step_end", state=state)
        except PluginError:
            # The step is done, but the failing plugin and those after it have not seen
            # it (a tracker that lost its server): the snapshot names them, and the
            # resumed run gives them this step before the next one.
            self.pending_step_end = list(self.plugins.unfinished)
            raise
        if self.stop_requested is not None:
            self.save_snapshot(epoch_closed=False)
            raise StopRequested(self.stop_requested, state)

    def set_learning_rate(self, phase: Phase) -> float:
        """Apply the ``learning_rate`` answer for the step about to be taken; returns the
        rate of the first parameter group."""
        assert self.optimizer is not None
        groups = self.optimizer.param_groups
        base = phase.learning_rate(self.state)
        decision = self.state.decide("learning_rate", phase=phase.name, base_lr=base)
        if decision is not None:
            lr = float(decision.value)
            if not math.isfinite(lr) or lr < 0:
                raise PluginError(
                    f"plugin {decision.plugin}: hook learning_rate returned {lr!r}, "
                    "expected a finite number >= 0"
                )
            for group in groups:
                initial = group.setdefault("initial_lr", group["lr"])
                group["lr"] = initial * lr / base if base > 0 else lr
        return float(groups[0]["lr"])

    def backward(self, loss: torch.Tensor, batch: Batch) -> float | None:
        """Backpropagate and clip; the gradient norm, or None (step to be skipped) on a
        non-finite loss or gradient.

        After ``max_bad_steps`` such steps in a row the run stops, naming the phase,
        epoch, step and the batch's query ids; the last epoch checkpoint stays as it is.
        """
        norm: float | None = None
        finite_loss = bool(torch.isfinite(loss))
        if finite_loss:
            torch.autograd.backward(loss)
            total = torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
            norm = float(total) if bool(torch.isfinite(total)) else None
        self.bad_steps = 0 if norm is not None else self.bad_steps + 1
        if self.bad_steps >= self.config.max_bad_steps:
            state = self.state
            ids = ", ".join(str(q) for q in batch.query_ids.tolist())
            what = "loss" if not finite_loss else "gradient"
            raise LeverError(
                f"phase {state.phase} epoch {state.epoch} step {state.step_in_epoch + 1}: "
                f"{self.bad_steps} consecutive steps with a non-finite loss or gradient "
                f"(this one: {what}; query ids {ids}); stopped without writing a checkpoint "
                f"(--max-bad-steps {self.config.max_bad_steps})"
            )
        return norm

    def check_weights(self, phase: Phase) -> None:
        """After an optimiser step: every updated weight is finite, else the run stops
        (nothing of this epoch is written; the newest checkpoint and snapshot stay).

        Cheap on the common path: the sum of every updated weight (a NaN or infinity
        propagates into it) and a single synchronisation per step; only when that sum is
        not finite are the weights checked one by one (a sum can overflow on weights that
        are merely huge, which go on: validation catches their outputs)."""
        with torch.no_grad():
            total = torch.stack([p.sum() for p in self.params]).sum()
        if bool(torch.isfinite(total)):
            return
        finite = torch.stack([torch.isfinite(p.detach()).all() for p in self.params])
        if bool(finite.all()):
            return
        state = self.state
        names = {id(p): n for n, p in self.model.named_parameters()}
        flags = finite.tolist()
        bad = [names.get(id(p), "?") for p, ok in zip(self.params, flags, strict=True) if not ok]
        raise LeverError(
            f"phase {state.phase} epoch {state.epoch} step {state.step_in_epoch + 1}: the "
            f"optimiser step made {len(bad)} weights non-finite ({', '.join(bad[:3])})"
            f"{self.lr_hint(phase)}; stopped without writing this epoch's checkpoint"
            f"{self.kept()}"
        )

    def kept(self) -> str:
        """``; the newest checkpoint (...) and snapshot are ...`` after a stop."""
        if not self.keeper.saved:
            return " (no epoch had completed)"
        return (
            f"; the newest checkpoint ({self.keeper.saved[-1].name}) and the snapshot in "
            f"{self.output_dir} are from before it"
        )

    def lr_hint(self, phase: Phase) -> str:
        """``; is the learning rate too high (--rce-lr 1e+30)?`` for a phase with one."""
        if not phase.lr_option:
            return ""
        declared = self.plugins.options().get(phase.lr_option)
        flag = declared[1].name if declared is not None else phase.lr_option
        try:
            rate = f" {phase.learning_rate(self.state):g}"
        except (KeyError, TypeError, ValueError):
            rate = ""
        return f"; is the learning rate too high ({flag}{rate})?"

    def end_epoch(self, phase: Phase, started: float) -> None:
        """Epoch metrics, validation, checkpoint, ``on_epoch_end``, snapshot."""
        state, progress = self.state, self.epoch_progress
        counted, skipped = progress["epoch_counted"], progress["epoch_skipped"]
        metrics: dict[str, float] = {
            f"train_{k}": v / max(counted, 1) for k, v in progress["epoch_sums"].items()
        }
        if skipped:
            metrics["skipped_steps"] = skipped
            state.log(
                f"warning: {phase.name} epoch {state.epoch}: skipped {skipped} steps with a "
                "non-finite loss or gradient"
            )
        extra = phase.epoch_metrics(state)
        self.check_declared(phase, extra, "epoch_metrics")
        metrics.update(extra)
        validation = self.evaluator.validation(state.val)
        metrics.update(validation.metrics)
        val_loss = metrics.get("val_loss")
        if val_loss is not None and not math.isfinite(val_loss):
            # finite weights can still be absurd (1e30): the policy's outputs tell
            raise LeverError(
                f"phase {phase.name} epoch {state.epoch}: the policy's validation loss is "
                f"{val_loss}: its outputs are not finite{self.lr_hint(phase)}; stopped "
                f"without writing this epoch's checkpoint{self.kept()}"
            )
        metrics["epoch_seconds"] = time.perf_counter() - started
        if state.judge is not None and self.judge_mark is not None:
            metrics.update(state.judge.cost.since(self.judge_mark).metrics())
        state.metrics = metrics
        state.history.append({"phase": phase.name, "epoch": state.epoch, **metrics})
        self.save_epoch_checkpoint(validation.per_query)
        self.report_selection()
        self.plugins.call_all("on_epoch_end", state=state, metrics=metrics)
        self.step_rng = snapshot.capture_rng(self.generator)
        self.save_snapshot(epoch_closed=True)

    # -- checkpoints and snapshots -------------------------------------------------
    def report_selection(self) -> None:
        """After an epoch competed for ``best.safetensors``: a line when it became the
        best, and once per run a warning when the validation split is too small to tell
        it from the best (better on average, within a noise above NOISE_WARN_RELATIVE)."""
        keeper, state = self.keeper, self.state
        last, metric = keeper.last, keeper.best_metric
        if last is None or metric is None:
            return
        if last.replaced and last.n:
            state.log(f"{BEST_NAME}: {last.label} ({last.describe(metric)})")
            return
        noisy = (
            last.within_noise
            and math.isfinite(last.half_width)
            and last.half_width > NOISE_WARN_RELATIVE * max(abs(last.against_value), 1e-12)
        ) or (last.n == 1 and last.difference > 0)
        if noisy and not keeper.warned_noise:
            keeper.warned_noise = True
            ratio = VAL_RATIO.of(state.options)
            now = f" (now {ratio})" if ratio is not None else ""
            state.log(
                f"warning: the validation split ({last.n} queries) is too small to tell "
                f"{last.label} from {last.against}: {last.describe(metric)} is within the "
                f"noise, so {BEST_NAME} stays {last.against}; a larger --val-ratio{now} "
                "narrows the noise"
            )

    def save_epoch_checkpoint(self, per_query: dict[str, torch.Tensor] | None = None) -> Path:
        """Write ``{phase}_epoch{n}.safetensors`` with the run's metadata (``per_query``:
        the epoch's per-query validation values, for choosing the best checkpoint)."""
        state = self.state
        assert state.phase is not None
        metadata = self.checkpoint_metadata(state.phase, state.epoch, state.metrics)
        best = self.keeper.best_metric
        if best is not None and best not in state.metrics:
            note = f"--best-metric {best} is not measured in phase {state.phase}"
            if note not in self.notes:
                self.notes.add(note)
                state.log(f"note: {note}; its epochs do not compete for best.safetensors")
        return self.keeper.save(
            checkpoint_name(state.phase, state.epoch, state.epochs),
            self.model.state_dict(),
            metadata,
            state.metrics,
            has_validation=len(state.val) > 0,
            per_query=per_query,
            label=f"{state.phase} epoch {state.epoch}",
        )

    def checkpoint_metadata(
        self, phase: str, epoch: int, metrics: dict[str, float], phase_states: bool = True
    ) -> dict[str, Any]:
        """A checkpoint's metadata: phase, epoch, metrics, the policy, the settings, the
        plugins and the run's own metadata (``phase_states``: with the phases' scalar
        states, e.g. GRPO's kl_beta)."""
        state = self.state
        scalars: dict[str, Any] = {}
        for p in self.phases if phase_states else ():
            scalars.update(
                {k: v for k, v in p.state_dict().items() if isinstance(v, int | float | str)}
            )
        return {
            "lever_trainer_version": __version__,
            "phase": phase,
            "epoch": epoch,
            **scalars,
            "metrics": metrics,
            "policy": {
                "name": self.model.policy_name,
                "input_dim": self.model.input_dim,
                "options": self.model.policy_options(),
            },
            "model": {"input_dim": self.model.input_dim, **self.model.policy_options()},
            "train_config": self.config.to_dict(),
            "options": dict(state.options),
            "plugins": self.plugins.versions(),
            **self.run_metadata,
        }

    def state_dict(self, epoch_closed: bool) -> dict[str, Any]:
        """Everything needed to continue after the last completed step (what a resume
        snapshot holds, see :mod:`lever_trainer.snapshot`).

        ``epoch_closed``: the epoch's validation, checkpoint and hooks are done. When they
        are not, the epoch's entry in the history (added before its hooks ran, if a hook
        failed) is left out: the resumed run closes the epoch and records it once.
        """
        state = self.state
        position = state.state_dict()
        history = position["history"]
        if (
            not epoch_closed
            and history
            and ((history[-1].get("phase"), history[-1].get("epoch")) == (state.phase, state.epoch))
        ):
            history.pop()
        pending = self.pending_step_end and not epoch_closed
        return {
            "epoch_closed": epoch_closed,
            **position,
            "bad_steps": self.bad_steps,
            "keeper": self.keeper.state_dict(),
            "start_logprobs": self.start_logprobs,
            # the starting weights: best.safetensors while no epoch has beaten them, and
            # the reference log-probs of a later extension into a phase that needs them
            "start_model": self.start_weights
            if self.start_logprobs is None or self.keeper.start_is_best
            else None,
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {},
            "phases": {phase.name: phase.state_dict() for phase in self.phases},
            "plugins": self.plugins.state_dict(state),
            **self.epoch_progress,
            **self.step_rng,
            # the plugins that have not seen the last step (one failed in on_step_end)
            **(
                {
                    "pending_step_end": list(self.pending_step_end),
                    "pending_last_step": state.last_step,
                }
                if pending
                else {}
            ),
        }

    def load_state_dict(self, snap: dict[str, Any]) -> None:
        """Put the run-wide state of a snapshot back (the phase's optimiser, position and
        epoch progress are restored when that phase starts, see :meth:`run_phase`).

        Only the phases that had started (the snapshot's phase and those before it) get
        their saved state back; a later phase starts from its options, which a resumed
        run may have changed (``--resume DIR --grpo-epochs 2 --kl-beta 0.05``).
        """
        state = self.state
        where = self.output_dir / SNAPSHOT_NAME
        try:
            self.model.load_state_dict(snap["model"])
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise LeverError(
                f"{where}: its weights do not fit the run's policy ({first})"
            ) from None
        state.load_state_dict(snap)
        self.bad_steps = snap["bad_steps"]
        self.keeper.load_state_dict(snap["keeper"])
        self.start_logprobs = snap["start_logprobs"]
        self.start_weights = snap.get("start_model")
        saved_phases = snap.get("phases", {})
        names = [p.name for p in self.phases]
        started = names[: names.index(snap["phase"]) + 1] if snap["phase"] in names else names
        for phase in self.phases:
            if phase.name in saved_phases and phase.name in started:
                try:
                    phase.load_state_dict(saved_phases[phase.name])
                except LeverError:
                    raise
                except Exception as exc:
                    raise PluginError(
                        f"phase {phase.name}: cannot restore its state from {where} "
                        f"({type(exc).__name__}: {exc})"
                    ) from exc
        self.plugins.load_state_dict(snap.get("plugins", {}), state)
        try:
            snapshot.restore_rng(snap, self.generator)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise LeverError(f"{where}: unusable random state ({exc})") from None
        self.step_rng = snapshot.capture_rng(self.generator)

    def save_snapshot(self, epoch_closed: bool) -> Path:
        """Write the resume snapshot to ``OUTPUT_DIR/resume.pt``, atomically."""
        path = self.output_dir / SNAPSHOT_NAME
        snapshot.write(path, self.state_dict(epoch_closed))
        self.has_snapshot = True
        return path

    def compute_logprobs(self, table: QueryTable) -> torch.Tensor:
        """Eval-mode sequence log-probs [Q, G] of every candidate of ``table`` (pads 0)."""
        return self.evaluator.logprobs(table)

    def starting_logprobs(self) -> torch.Tensor:
        """The starting model's log-probs of the training candidates, computed late: from
        the starting weights a run kept because no phase needed them at its start."""
        if self.start_weights is None:
            raise LeverError(
                "the starting model's log-probs (the default GRPO reference) are not in "
                "this run's snapshot, which was written by an older lever-train; extend it "
                f"with a plugin that answers reference_logprobs{suggest('reference_logprobs')} "
                "or start a new run from its checkpoint"
            )
        current = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.start_weights)
        try:
            logprobs = self.compute_logprobs(self.state.train)
        finally:
            self.model.load_state_dict(current)
        self.state.log("reference log-probs: computed from the run's starting weights")
        return logprobs

    def validate(self) -> dict[str, float]:
        """The validation metrics of the current policy."""
        return self.evaluator.validate(self.state.val)

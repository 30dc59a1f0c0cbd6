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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import __version__, snapshot
from .checkpoint import checkpoint_name
from .data import Batch, Embeddings, QueryTable, iter_batches
from .errors import LeverError, PluginError
from .evaluation import Evaluator, format_metrics
from .phase import Phase
from .plugins import Decision, PluginSet
from .policy import Policy
from .retention import CheckpointKeeper
from .state import RewardChoice, TrainConfig, TrainState

SNAPSHOT_NAME = snapshot.SNAPSHOT_NAME


class StopRequested(Exception):
    """Raised after a stop was requested (a signal) and the snapshot was written."""

    def __init__(self, reason: str, state: TrainState) -> None:
        super().__init__(reason)
        self.reason = reason
        self.phase, self.epoch, self.step = state.phase, state.epoch, state.step_in_epoch


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
        )
        if log is not None:
            self.state.logger = log
        for phase in self.phases:
            phase.init(self.state)
        self.evaluator = Evaluator(self.model, emb, self.device, config.batch_size)
        self.keeper = CheckpointKeeper(
            output_dir, config.keep_last, config.best_metric, config.best_mode
        )
        self.rewards: dict[str, Decision] = {}
        self.generator = torch.Generator().manual_seed(config.seed)
        self.start_logprobs: torch.Tensor | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.params: list[torch.nn.Parameter] = []
        self.bad_steps = 0
        #: Set (to the signal's name) by a signal handler: stop after the current step.
        self.stop_requested: str | None = None
        self.epoch_progress: dict[str, Any] = {}
        self.step_rng: dict[str, Any] = snapshot.capture_rng(self.generator)

    # -- the whole job -----------------------------------------------------------
    def fit(self, resume: dict[str, Any] | None = None) -> TrainState:
        """Run every phase that has epochs; returns the final state.

        ``resume`` is a snapshot (:mod:`lever_trainer.snapshot`): the run continues from
        the step after it, with every state as it was.
        """
        state = self.state
        to_run = self.phases_to_run(resume)
        if not self.rewards:
            self.resolve_rewards()
        self.plugins.call_all("on_train_start", state=state)
        if resume is None:
            # the starting model's log-probs: the default reference (SPEC section 6)
            if any(p.needs_reference for p in to_run):
                self.start_logprobs = self.compute_logprobs(state.train)
            if len(state.val):
                state.start_metrics = self.evaluator.validate(state.val)
                state.log("start: " + format_metrics(state.start_metrics))
                self.plugins.call_all(
                    "on_start_validation", state=state, metrics=state.start_metrics
                )
        else:
            snapshot.restore(self, resume)
            state.log(
                f"resumed from phase {resume['phase']} epoch {resume['epoch']} "
                f"step {resume['step_in_epoch']}"
            )
        for phase in to_run:
            if state.stop_request is not None:
                break
            same_phase = resume is not None and phase.name == resume["phase"]
            try:
                self.run_phase(phase, resume if same_phase else None)
            except PluginError as exc:
                # A plugin failed inside the phase: keep the last completed step.
                if self.epoch_progress:
                    self.save_snapshot(epoch_closed=False)
                    exc.snapshot = True  # type: ignore[attr-defined]
                raise
        if state.stop_request is not None:
            who = state.stop_request.plugin or "a plugin"
            state.log(f"stopped early by {who}: {state.stop_request.reason}")
        self.plugins.call_all("on_train_end", state=state)
        return state

    def phases_to_run(self, resume: dict[str, Any] | None) -> list[Phase]:
        """The phases with epochs, from the snapshot's phase on when resuming."""
        phases = [p for p in self.phases if p.epochs(self.state) > 0]
        if resume is None or resume["phase"] is None:
            return phases
        names = [p.name for p in phases]
        if resume["phase"] not in names:
            raise LeverError(
                f"--resume: the snapshot stopped in phase {resume['phase']!r}, which this "
                f"run does not have (phases with epochs: {', '.join(names) or 'none'})"
            )
        return phases[names.index(resume["phase"]) :]

    def resolve_rewards(self) -> dict[str, Decision]:
        """Ask ``select_reward`` for every phase that will run and needs one; log the answers."""
        decisions = {}
        for phase in self.phases_to_run(None):
            if not phase.needs_reward:
                continue
            decision = self.plugins.call_single("select_reward", state=self.state, phase=phase.name)
            if decision is None or not isinstance(decision.value, RewardChoice):
                raise LeverError(
                    f"no active plugin answers hook select_reward for phase {phase.name!r}; "
                    "enable one (e.g. --plugin raw-reward), see `lever-train plugins`"
                )
            choice: RewardChoice = decision.value
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
            self.optimizer.load_state_dict(resume["optimizer"])
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
        self.model.train()
        if progress is not None:  # resuming inside this epoch
            self.epoch_progress = {
                "epoch_order": progress["epoch_order"],
                "epoch_sums": dict(progress["epoch_sums"]),
                "epoch_counted": progress["epoch_counted"],
                "epoch_skipped": progress["epoch_skipped"],
            }
            state.step_in_epoch = progress["step_in_epoch"]
            snapshot.restore_rng(progress)
        else:
            self.epoch_progress = {
                "epoch_order": self.epoch_rows(phase, epoch),
                "epoch_sums": {},
                "epoch_counted": 0,
                "epoch_skipped": 0,
            }
        order = self.epoch_progress["epoch_order"]
        state.steps_per_epoch = math.ceil(len(order) / bs)
        rows = order[state.step_in_epoch * bs :]
        ref = state.ref_logprobs if phase.needs_reference else None
        for batch in iter_batches(state.train, self.emb, bs, rows, ref):
            self.step(phase, batch)
        self.end_epoch(phase, started)

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
        self.step_rng = snapshot.capture_rng(self.generator)
        batch = batch.to(self.device)
        out = phase.loss(state, batch)
        self.optimizer.zero_grad(set_to_none=True)
        grad_norm = self.backward(out["loss"], batch)
        if grad_norm is not None:
            self.optimizer.step()
            values = {k: float(v.detach()) for k, v in out.items()}
            values["grad_norm"] = grad_norm
            state.last_step = values
            phase.after_step(state, values)
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
        self.step_rng = snapshot.capture_rng(self.generator)
        self.plugins.call_all("on_step_end", state=state)
        if self.stop_requested is not None:
            self.save_snapshot(epoch_closed=False)
            raise StopRequested(self.stop_requested, state)

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
        metrics.update(phase.epoch_metrics(state))
        metrics.update(self.evaluator.validate(state.val))
        metrics["epoch_seconds"] = time.perf_counter() - started
        state.metrics = metrics
        state.history.append({"phase": phase.name, "epoch": state.epoch, **metrics})
        self.save_epoch_checkpoint()
        self.plugins.call_all("on_epoch_end", state=state, metrics=metrics)
        self.step_rng = snapshot.capture_rng(self.generator)
        self.save_snapshot(epoch_closed=True)

    # -- checkpoints and snapshots -------------------------------------------------
    def save_epoch_checkpoint(self) -> Path:
        """Write ``{phase}_epoch{n}.safetensors`` with the run's metadata."""
        state = self.state
        assert state.phase is not None
        phase_states: dict[str, Any] = {}
        for p in self.phases:
            phase_states.update(p.state_dict())
        metadata = {
            "lever_trainer_version": __version__,
            "phase": state.phase,
            "epoch": state.epoch,
            **phase_states,
            "metrics": state.metrics,
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
        return self.keeper.save(
            checkpoint_name(state.phase, state.epoch, state.epochs),
            self.model.state_dict(),
            metadata,
            state.metrics,
            has_validation=len(state.val) > 0,
        )

    def save_snapshot(self, epoch_closed: bool) -> Path:
        """Write the resume snapshot to ``OUTPUT_DIR/resume.pt``, atomically."""
        path = self.output_dir / SNAPSHOT_NAME
        snapshot.write(path, snapshot.take(self, epoch_closed))
        return path

    def compute_logprobs(self, table: QueryTable) -> torch.Tensor:
        """Eval-mode sequence log-probs [Q, G] of every candidate of ``table`` (pads 0)."""
        return self.evaluator.logprobs(table)

    def validate(self) -> dict[str, float]:
        """The validation metrics of the current policy."""
        return self.evaluator.validate(self.state.val)

"""The core loop: reference log-probs, then the RCE and GRPO phases.

Read it top to bottom: :meth:`Trainer.fit` runs the phases; :meth:`Trainer.run_phase`
builds the phase's optimiser after the plugins have chosen what trains, then loops
over epochs and batches; :meth:`Trainer.rce_step` and :meth:`Trainer.grpo_step` turn a
batch into a loss with the pure functions of :mod:`lever_trainer.losses`. Every
experimental choice is a hook call, never an ``if`` on a flag.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint import atomic_write_bytes, checkpoint_name, save_checkpoint
from .data import Batch, Embeddings, QueryTable, iter_batches
from .errors import LeverError, PluginError
from .losses import (
    group_advantages,
    grpo_loss,
    rce_loss,
    rce_temperature,
    sequence_logprobs,
    top_k_mask,
)
from .metrics import selection_metrics
from .model import PointerPolicy
from .plugins import Decision, PluginSet
from .state import PHASES, RewardChoice, TrainConfig, TrainState

#: File name of the resume snapshot in the output directory, and its format version.
SNAPSHOT_NAME = "resume.pt"
SNAPSHOT_FORMAT = 1


class StopRequested(Exception):
    """Raised after a stop was requested (a signal) and the snapshot was written."""

    def __init__(self, reason: str, state: TrainState) -> None:
        super().__init__(reason)
        self.reason = reason
        self.phase, self.epoch, self.step = state.phase, state.epoch, state.step_in_epoch


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """The random states a step consumes: torch's global RNG (dropout), the shuffle
    generator, and Python's in case a plugin draws from it."""
    import random

    out: dict[str, Any] = {
        "rng_torch": torch.get_rng_state(),
        "rng_shuffle": generator.get_state(),
        "rng_python": random.getstate(),
    }
    if torch.cuda.is_available():
        out["rng_cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(snap: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Set the random states recorded by :func:`capture_rng`."""
    import random

    torch.set_rng_state(snap["rng_torch"])
    if generator is not None:
        generator.set_state(snap["rng_shuffle"])
    version, internal, gauss = snap["rng_python"]
    random.setstate((version, tuple(internal), gauss))
    if "rng_cuda" in snap and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(snap["rng_cuda"])


#: RCE temperature of the validation loss (SPEC section 7).
VAL_TAU = 1.0
#: Smallest batch for gradient-free passes (reference log-probs, validation): without
#: activations to keep, larger batches use the matmul units better.
MIN_EVAL_BATCH = 128


def policy_logprobs(model: PointerPolicy, batch: Batch) -> torch.Tensor:
    """Teacher-forced sequence log-probs [B, G] of every candidate in ``batch``.

    The query and pool are encoded once; all G sequences decode against that encoding.
    """
    z, keys = model.encode(batch.query_emb, batch.cand_emb, batch.pool_mask)
    logits, _ = model.decode(z, keys, batch.pool_mask, batch.sequences)
    return sequence_logprobs(logits, batch.sequences)


def gather_groups(
    batch: Batch, keep: torch.Tensor, rewards: torch.Tensor
) -> tuple[Batch, torch.Tensor]:
    """Compact a batch to the candidates in ``keep`` [B, G]; returns it and their rewards."""
    width = max(int(keep.sum(-1).max()), 1)
    # Kept entries first, in their original order (stable sort on the keep flag).
    idx = torch.sort(keep.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :width]
    s = batch.sequences.shape[-1]
    ref = batch.ref_logprobs
    compact = Batch(
        rows=batch.rows,
        query_ids=batch.query_ids,
        query_emb=batch.query_emb,
        cand_emb=batch.cand_emb,
        pool_mask=batch.pool_mask,
        sequences=batch.sequences.gather(1, idx.unsqueeze(-1).expand(-1, -1, s)),
        cand_mask=keep.gather(1, idx),
        rewards_raw=batch.rewards_raw.gather(1, idx),
        rewards_norm=batch.rewards_norm.gather(1, idx),
        correct=batch.correct.gather(1, idx),
        ref_logprobs=None if ref is None else ref.gather(1, idx),
    )
    return compact, rewards.gather(1, idx)


class Trainer:
    """Runs a whole training job; see the module docstring for the order of events."""

    def __init__(
        self,
        config: TrainConfig,
        model: PointerPolicy,
        train: QueryTable,
        val: QueryTable,
        emb: Embeddings,
        plugins: PluginSet,
        output_dir: Path,
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
        self.state = TrainState(
            config=config,
            model=self.model,
            train=train,
            val=val,
            output_dir=output_dir,
            kl_beta=config.kl_beta,
        )
        if log is not None:
            self.state.logger = log
        self.ref_logprobs: torch.Tensor | None = None
        self.rewards: dict[str, Decision] = {}
        self.generator = torch.Generator().manual_seed(config.seed)
        self.eval_batch_size = max(config.batch_size, MIN_EVAL_BATCH)
        self.bad_steps = 0
        self.saved: list[Path] = []
        self.best_value: float | None = None
        self.stop_requested: str | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.epoch_progress: dict[str, Any] = {}
        self.step_rng: dict[str, Any] = capture_rng(self.generator)

    # -- the whole job -----------------------------------------------------------
    def fit(self, resume: dict[str, Any] | None = None) -> TrainState:
        """Run every phase that has epochs; returns the final state.

        ``resume`` is a snapshot written by :meth:`save_snapshot`: the run continues
        from the step after it, with every state (weights, optimiser, RNG, order of
        the current epoch, reference log-probs) as it was.
        """
        state = self.state
        if not self.rewards:
            self.resolve_rewards()
        self.plugins.call_all("on_train_start", state=state)
        if resume is None:
            self.ref_logprobs = self.compute_logprobs(state.train)
            if len(state.val):
                start = self.validate()
                state.log("start: " + format_metrics(start))
        else:
            self.restore_snapshot(resume)
            state.log(
                f"resumed from phase {resume['phase']} epoch {resume['epoch']} "
                f"step {resume['step_in_epoch']}"
            )
        for phase in PHASES:
            if state.phase_epochs(phase) == 0:
                continue
            if resume is not None and PHASES.index(phase) < PHASES.index(resume["phase"]):
                continue
            same_phase = resume is not None and phase == resume["phase"]
            try:
                self.run_phase(phase, resume if same_phase else None)
            except PluginError as exc:
                # A plugin failed inside the phase: keep the last completed step.
                if self.epoch_progress:
                    self.save_snapshot(epoch_closed=False)
                    exc.snapshot = True  # type: ignore[attr-defined]
                raise
        self.plugins.call_all("on_train_end", state=state)
        return state

    def resolve_rewards(self) -> dict[str, Decision]:
        """Ask ``select_reward`` for every phase that will run, log and keep the answers."""
        decisions = {}
        for phase in PHASES:
            if self.state.phase_epochs(phase) == 0:
                continue
            decision = self.plugins.call_single("select_reward", state=self.state, phase=phase)
            if decision is None or not isinstance(decision.value, RewardChoice):
                raise LeverError(
                    f"no active plugin answers hook select_reward for phase {phase!r}; enable "
                    "one (e.g. --plugin raw-reward), see `lever-train plugins`"
                )
            choice: RewardChoice = decision.value
            self.state.log(
                f"{phase.upper()} reward: {choice.name} ({choice.source}) [{decision.label}]"
            )
            decisions[phase] = decision
        self.rewards = decisions
        return decisions

    # -- one phase ---------------------------------------------------------------
    def run_phase(self, phase: str, resume: dict[str, Any] | None = None) -> None:
        """Choose trainable parameters, build the optimiser, run the phase's epochs."""
        state, cfg, model = self.state, self.config, self.model
        state.phase, state.epoch, state.step = phase, 0, 0
        self.epoch_progress = {}
        for p in model.parameters():
            p.requires_grad_(True)
        self.plugins.call_all("configure_trainable_params", state=state, model=model)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise LeverError(f"phase {phase}: the active plugins froze every parameter")
        lr = cfg.rce_lr if phase == "rce" else cfg.grpo_lr
        self.optimizer = optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
        epochs = state.phase_epochs()
        state.steps_per_epoch = math.ceil(len(state.train) / cfg.batch_size)
        total_steps = epochs * state.steps_per_epoch
        choice: RewardChoice = self.rewards[phase].value
        first_epoch, progress = 1, None
        if resume is not None:
            optimizer.load_state_dict(resume["optimizer"])
            state.step = resume["step"]
            first_epoch = resume["epoch"]
            if resume["epoch_closed"]:
                first_epoch += 1
            else:
                progress = resume
        elif phase == "grpo":
            self.choose_reference()
        self.plugins.call_all("on_phase_start", state=state)
        for epoch in range(first_epoch, epochs + 1):
            state.epoch, state.step_in_epoch = epoch, 0
            started = time.perf_counter()
            model.train()
            if progress is not None:
                order, sums = progress["epoch_order"], dict(progress["epoch_sums"])
                counted, skipped = progress["epoch_counted"], progress["epoch_skipped"]
                state.step_in_epoch = progress["step_in_epoch"]
                restore_rng(progress)
                progress = None
            else:
                order = torch.randperm(len(state.train), generator=self.generator)
                sums, counted, skipped = {}, 0, 0
            self.epoch_progress = {
                "epoch_order": order,
                "epoch_sums": sums,
                "epoch_counted": counted,
                "epoch_skipped": skipped,
            }
            rows = order[state.step_in_epoch * cfg.batch_size :]
            for batch in iter_batches(
                state.train, self.emb, cfg.batch_size, rows, self.ref_logprobs
            ):
                self.step_rng = capture_rng(self.generator)
                batch = batch.to(self.device)
                if phase == "rce":
                    tau = rce_temperature(
                        state.step, total_steps, cfg.rce_tau_start, cfg.rce_tau_end
                    )
                    out = self.rce_step(batch, choice, tau)
                else:
                    out = self.grpo_step(batch, choice)
                optimizer.zero_grad(set_to_none=True)
                if self.finite_step(out["loss"], params, batch):
                    optimizer.step()
                    state.last_step = {k: float(v.detach()) for k, v in out.items()}
                    if phase == "grpo":
                        self.update_kl_beta(state.last_step["kl"])
                    for k, v in state.last_step.items():
                        sums[k] = sums.get(k, 0.0) + v * len(batch)
                    counted += len(batch)
                else:
                    optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                state.step += 1
                state.step_in_epoch += 1
                self.epoch_progress.update(epoch_counted=counted, epoch_skipped=skipped)
                self.step_rng = capture_rng(self.generator)
                self.plugins.call_all("on_step_end", state=state)
                if self.stop_requested is not None:
                    self.save_snapshot(epoch_closed=False)
                    raise StopRequested(self.stop_requested, state)
            metrics: dict[str, float] = {f"train_{k}": v / max(counted, 1) for k, v in sums.items()}
            if skipped:
                metrics["skipped_steps"] = skipped
                state.log(
                    f"warning: {phase} epoch {epoch}: skipped {skipped} steps with a "
                    "non-finite loss or gradient"
                )
            if phase == "grpo":
                metrics["kl_beta"] = state.kl_beta
            metrics.update(self.validate())
            metrics["epoch_seconds"] = time.perf_counter() - started
            state.metrics = metrics
            state.history.append({"phase": phase, "epoch": epoch, **metrics})
            self.save_epoch_checkpoint()
            self.plugins.call_all("on_epoch_end", state=state, metrics=metrics)
            self.step_rng = capture_rng(self.generator)
            self.save_snapshot(epoch_closed=True)
        self.plugins.call_all("on_phase_end", state=state)

    # -- snapshots for exact resume ----------------------------------------------
    def snapshot(self, epoch_closed: bool) -> dict[str, Any]:
        """Everything needed to continue after the last completed step, bit for bit.

        ``epoch_closed``: the epoch's validation, checkpoint and hooks are done.
        """
        state = self.state
        return {
            "format": SNAPSHOT_FORMAT,
            "epoch_closed": epoch_closed,
            "phase": state.phase,
            "epoch": state.epoch,
            "step": state.step,
            "step_in_epoch": state.step_in_epoch,
            "kl_beta": state.kl_beta,
            "bad_steps": self.bad_steps,
            "history": state.history,
            "metrics": state.metrics,
            "best_value": self.best_value,
            "saved": [str(p) for p in self.saved],
            "ref_logprobs": self.ref_logprobs,
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {},
            "plugins": {
                name: value
                for name, value in self.plugins.call_all("plugin_state_dict", state=state)
                if value is not None
            },
            **self.epoch_progress,
            **self.step_rng,
        }

    def save_snapshot(self, epoch_closed: bool) -> Path:
        """Write :meth:`snapshot` to ``OUTPUT_DIR/resume.pt``, atomically."""
        path = self.output_dir / SNAPSHOT_NAME
        buffer = io.BytesIO()
        torch.save(self.snapshot(epoch_closed), buffer)
        try:
            atomic_write_bytes(path, buffer.getvalue())
        except OSError as exc:
            raise LeverError(
                f"{path}: cannot write the resume snapshot ({exc.strerror or exc})"
            ) from None
        return path

    def restore_snapshot(self, snap: dict[str, Any]) -> None:
        """Put the weights, KL weight, history and reference log-probs of ``snap`` back."""
        state = self.state
        self.model.load_state_dict(snap["model"])
        state.kl_beta = snap["kl_beta"]
        state.history = list(snap["history"])
        state.metrics = dict(snap["metrics"])
        self.bad_steps = snap["bad_steps"]
        self.best_value = snap["best_value"]
        self.saved = [Path(p) for p in snap["saved"]]
        self.ref_logprobs = snap["ref_logprobs"]
        for name, saved in snap.get("plugins", {}).items():
            if name not in self.plugins.names:
                state.log(
                    f"warning: the snapshot holds a state of plugin {name}, which is "
                    "not active in this run"
                )
                continue
            self.plugins.call_plugin(name, "load_plugin_state", state=state, saved=saved)
        restore_rng(snap, self.generator)

    def finite_step(
        self, loss: torch.Tensor, params: list[torch.nn.Parameter], batch: Batch
    ) -> bool:
        """Backpropagate and clip; False (step to be skipped) on a non-finite loss or gradient.

        After ``max_bad_steps`` such steps in a row the run stops, naming the phase,
        epoch, step and the batch's query ids; the last epoch checkpoint stays as it is.
        """
        ok = bool(torch.isfinite(loss))
        if ok:
            torch.autograd.backward(loss)
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
            ok = bool(torch.isfinite(norm))
        self.bad_steps = 0 if ok else self.bad_steps + 1
        if self.bad_steps >= self.config.max_bad_steps:
            state = self.state
            ids = ", ".join(str(q) for q in batch.query_ids.tolist())
            what = "loss" if not bool(torch.isfinite(loss)) else "gradient"
            raise LeverError(
                f"phase {state.phase} epoch {state.epoch} step {state.step_in_epoch + 1}: "
                f"{self.bad_steps} consecutive steps with a non-finite loss or gradient "
                f"(this one: {what}; query ids {ids}); stopped without writing a checkpoint "
                f"(--max-bad-steps {self.config.max_bad_steps})"
            )
        return ok

    def choose_reference(self) -> None:
        """Let ``grpo_reference_logprobs`` replace the starting model's log-probs for GRPO."""
        decision = self.plugins.call_single(
            "grpo_reference_logprobs",
            state=self.state,
            compute=lambda: self.compute_logprobs(self.state.train),
        )
        if decision is None:
            return
        ref = decision.value
        expected = tuple(self.state.train.rewards_raw.shape)
        if not isinstance(ref, torch.Tensor) or tuple(ref.shape) != expected:
            shape = tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__
            raise LeverError(
                f"plugin {decision.plugin}: hook grpo_reference_logprobs returned {shape}, "
                f"expected a tensor of shape {expected}"
            )
        self.ref_logprobs = ref.detach().to(torch.float32).cpu()
        self.state.log(f"GRPO reference log-probs: [plugin {decision.plugin}]")

    def rce_step(self, batch: Batch, choice: RewardChoice, tau: float) -> dict[str, torch.Tensor]:
        """RCE loss of one batch at temperature ``tau`` (SPEC section 5)."""
        logprobs = policy_logprobs(self.model, batch)
        rewards = choice.compute(batch)
        return {"loss": rce_loss(logprobs, rewards, batch.cand_mask, tau), "tau": torch.tensor(tau)}

    def grpo_top_k(self) -> int:
        """Curriculum: how many candidates per query the current GRPO epoch keeps."""
        cfg = self.config
        return cfg.early_top_k if self.state.epoch - 1 < cfg.early_epochs else cfg.late_top_k

    def grpo_step(self, batch: Batch, choice: RewardChoice) -> dict[str, torch.Tensor]:
        """GRPO loss of one batch against the reference log-probs (SPEC section 6)."""
        rewards = choice.compute(batch)
        keep = top_k_mask(rewards, batch.cand_mask, self.grpo_top_k())
        kept, kept_rewards = gather_groups(batch, keep, rewards)
        advantages = group_advantages(kept_rewards, kept.cand_mask, self.config.advantage_clip)
        new_logprobs = policy_logprobs(self.model, kept)
        assert kept.ref_logprobs is not None
        return grpo_loss(
            new_logprobs,
            kept.ref_logprobs,
            advantages,
            kept.cand_mask,
            self.config.clip_epsilon,
            self.state.kl_beta,
        )

    def update_kl_beta(self, kl: float) -> None:
        """Let the ``adapt_kl_beta`` hook move the KL weight; no answer keeps it."""
        decision = self.plugins.call_single(
            "adapt_kl_beta", state=self.state, kl=kl, beta=self.state.kl_beta
        )
        if decision is not None:
            self.state.kl_beta = float(decision.value)

    # -- evaluation --------------------------------------------------------------
    @torch.no_grad()
    def compute_logprobs(self, table: QueryTable) -> torch.Tensor:
        """Eval-mode sequence log-probs [Q, G] of every candidate of ``table`` (pads 0)."""
        was_training = self.model.training
        self.model.eval()
        out = torch.zeros(table.rewards_raw.shape)
        for batch in iter_batches(table, self.emb, self.eval_batch_size):
            lp = policy_logprobs(self.model, batch.to(self.device)).cpu()
            out[batch.rows, : lp.shape[1]] = lp.masked_fill(~batch.cand_mask, 0.0)
        self.model.train(was_training)
        return out

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation RCE loss (raw rewards, tau = 1, eval mode) and selection metrics."""
        table = self.state.val
        if len(table) == 0:
            return {}
        was_training = self.model.training
        self.model.eval()
        loss_sum = 0.0
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for batch in iter_batches(table, self.emb, self.eval_batch_size):
            b = batch.to(self.device)
            lp = policy_logprobs(self.model, b)
            loss_sum += float(rce_loss(lp, b.rewards_raw, b.cand_mask, VAL_TAU)) * len(b)
            for name, (values, defined) in selection_metrics(
                lp, b.rewards_raw, b.correct, b.cand_mask
            ).items():
                sums[name] = sums.get(name, 0.0) + float(values[defined].sum())
                counts[name] = counts.get(name, 0) + int(defined.sum())
        self.model.train(was_training)
        metrics = {"val_loss": loss_sum / len(table)}
        for name, total in sums.items():
            if counts[name]:
                metrics[name] = total / counts[name]
        return metrics

    # -- checkpoints -------------------------------------------------------------
    def save_epoch_checkpoint(self) -> Path:
        """Write ``{phase}_epoch{n}.safetensors`` with the run's metadata."""
        state = self.state
        assert state.phase is not None
        path = self.output_dir / checkpoint_name(state.phase, state.epoch)
        metadata = {
            "lever_trainer_version": __version__,
            "phase": state.phase,
            "epoch": state.epoch,
            "kl_beta": state.kl_beta,
            "metrics": state.metrics,
            "model": self.model.config.to_dict(),
            "train_config": self.config.to_dict(),
            "plugins": self.plugins.versions(),
            **self.run_metadata,
        }
        save_checkpoint(path, self.model.state_dict(), metadata)
        self.retain(path)
        self.save_best(metadata)
        return path

    def retain(self, newest: Path) -> None:
        """``keep_last``: remove older epoch checkpoints, only once ``newest`` is complete."""
        if newest in self.saved:
            self.saved.remove(newest)
        self.saved.append(newest)
        keep = self.config.keep_last
        if keep is None:
            return
        while len(self.saved) > keep:
            self.saved.pop(0).unlink(missing_ok=True)

    def save_best(self, metadata: dict[str, Any]) -> None:
        """``best_metric``: keep the best epoch so far as ``best.safetensors``."""
        name = self.config.best_metric
        if name is None:
            return
        value = self.state.metrics.get(name)
        if value is None:
            if len(self.state.val):
                raise LeverError(
                    f"--best-metric: no metric named {name!r} "
                    f"(known: {', '.join(sorted(self.state.metrics))})"
                )
            return
        better = self.best_value is None or (
            value > self.best_value if self.config.best_mode == "max" else value < self.best_value
        )
        if better:
            self.best_value = value
            meta = {**metadata, "best_metric": name, "best_value": value}
            save_checkpoint(self.output_dir / "best.safetensors", self.model.state_dict(), meta)


def format_metrics(metrics: dict[str, float]) -> str:
    """One-line rendering of an epoch's metrics, in a stable order."""
    order = [
        "train_loss",
        "val_loss",
        "policy_reward@1",
        "random_reward",
        "oracle_reward",
        "normalized_gain",
        "policy_correct@1",
        "spearman",
        "train_kl",
        "kl_beta",
    ]
    parts = [f"{k} {metrics[k]:.4f}" for k in order if k in metrics]
    return "  ".join(parts)

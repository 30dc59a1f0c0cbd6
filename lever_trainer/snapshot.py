"""Resume snapshots: everything needed to continue a run bit for bit, in one place.

:func:`take` gathers a trainer's state (weights, optimiser, position, the epoch's query
order and running sums, RNG states, reference log-probs, every phase's and plugin's
state, the checkpoint keeper's), :func:`write` stores it atomically as ``resume.pt``,
:func:`read` loads it back safely and :func:`restore` puts it into a new trainer.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import LeverError
from .fileio import atomic_write_bytes
from .state import StopRequest

if TYPE_CHECKING:
    from .trainer import Trainer

#: File name of the resume snapshot in the output directory, and its format version.
SNAPSHOT_NAME = "resume.pt"
SNAPSHOT_FORMAT = 2


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """The random states a step consumes: torch's global RNG (dropout), the shuffle
    generator, and Python's in case a plugin draws from it."""
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
    torch.set_rng_state(snap["rng_torch"])
    if generator is not None:
        generator.set_state(snap["rng_shuffle"])
    version, internal, gauss = snap["rng_python"]
    random.setstate((version, tuple(internal), gauss))
    if "rng_cuda" in snap and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(snap["rng_cuda"])


def take(trainer: Trainer, epoch_closed: bool) -> dict[str, Any]:
    """Everything needed to continue after the last completed step.

    ``epoch_closed``: the epoch's validation, checkpoint and hooks are done.
    """
    state = trainer.state
    return {
        "format": SNAPSHOT_FORMAT,
        "epoch_closed": epoch_closed,
        "phase": state.phase,
        "epoch": state.epoch,
        "step": state.step,
        "global_step": state.global_step,
        "step_in_epoch": state.step_in_epoch,
        "bad_steps": trainer.bad_steps,
        "history": state.history,
        "start_metrics": state.start_metrics,
        "metrics": state.metrics,
        "stop_request": None
        if state.stop_request is None
        else [state.stop_request.reason, state.stop_request.plugin],
        "keeper": trainer.keeper.state_dict(),
        "start_logprobs": trainer.start_logprobs,
        "ref_logprobs": state.ref_logprobs,
        "model": {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()},
        "optimizer": trainer.optimizer.state_dict() if trainer.optimizer is not None else {},
        "phases": {p.name: p.state_dict() for p in trainer.phases},
        "plugins": {
            name: value
            for name, value in trainer.plugins.call_all("plugin_state_dict", state=state)
            if value is not None
        },
        **trainer.epoch_progress,
        **trainer.step_rng,
    }


def write(path: Path, snap: dict[str, Any]) -> None:
    """Store ``snap`` at ``path`` atomically."""
    buffer = io.BytesIO()
    torch.save(snap, buffer)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as exc:
        raise LeverError(
            f"{path}: cannot write the resume snapshot ({exc.strerror or exc})"
        ) from None


def read(path: Path) -> dict[str, Any]:
    """Load a snapshot written by :func:`write` (``weights_only``), checking its format."""
    try:
        snap = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LeverError(f"{path}: unreadable snapshot ({exc})") from None
    if not isinstance(snap, dict) or snap.get("format") != SNAPSHOT_FORMAT:
        found = snap.get("format") if isinstance(snap, dict) else type(snap).__name__
        raise LeverError(
            f"{path}: snapshot format {found!r}, this lever-train reads format {SNAPSHOT_FORMAT}"
        )
    return snap


def restore(trainer: Trainer, snap: dict[str, Any]) -> None:
    """Put the run-wide state of ``snap`` back into ``trainer`` (the phase's optimiser and
    epoch position are restored when that phase starts, see ``Trainer.run_phase``)."""
    state = trainer.state
    trainer.model.load_state_dict(snap["model"])
    state.history = list(snap["history"])
    state.start_metrics = dict(snap.get("start_metrics") or {})
    state.metrics = dict(snap["metrics"])
    state.global_step = snap["global_step"]
    trainer.bad_steps = snap["bad_steps"]
    trainer.keeper.load_state_dict(snap["keeper"])
    trainer.start_logprobs = snap["start_logprobs"]
    state.ref_logprobs = snap["ref_logprobs"]
    if snap.get("stop_request") is not None:
        reason, plugin = snap["stop_request"]
        state.stop_request = StopRequest(reason, plugin)
    saved_phases = snap.get("phases", {})
    for phase in trainer.phases:
        if phase.name in saved_phases:
            phase.load_state_dict(saved_phases[phase.name])
    for name, saved in snap.get("plugins", {}).items():
        if name not in trainer.plugins.names:
            state.log(
                f"warning: the snapshot holds a state of plugin {name}, which is "
                "not active in this run"
            )
            continue
        trainer.plugins.call_plugin(name, "load_plugin_state", state=state, saved=saved)
    restore_rng(snap, trainer.generator)


__all__ = [
    "SNAPSHOT_FORMAT",
    "SNAPSHOT_NAME",
    "capture_rng",
    "read",
    "restore",
    "restore_rng",
    "take",
    "write",
]

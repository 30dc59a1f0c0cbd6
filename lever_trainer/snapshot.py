"""Resume snapshots: everything needed to continue a run bit for bit, in one file.

The trainer says what its state is (``Trainer.state_dict()``: weights, optimiser,
position, the epoch's query order and running sums, random states, reference log-probs,
and the state of every phase, plugin and of the checkpoint keeper, each from its own
``state_dict``) and takes it back (``Trainer.load_state_dict()``). This module stores
that as ``resume.pt``, atomically (:func:`write`), loads it back safely and checks every
entry (:func:`read`), and checks that it belongs to the run (:func:`check_fits`).
"""

from __future__ import annotations

import io
import random
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import non_finite_count
from .errors import LeverError, PluginError
from .fileio import atomic_write_bytes

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


#: Leaf values a snapshot holds and ``torch.load(weights_only=True)`` reloads.
_SAFE_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)
_MAX_DEPTH = 64


def safe_value(value: Any, where: str = "", depth: int = 0) -> Any:
    """``value`` as a snapshot may hold it, or ValueError naming the offending part.

    Allowed: tensors, None, bools, numbers, strings, bytes, dtypes, devices, and lists,
    tuples and dicts of those (dict keys: None, bools, numbers, strings). A numpy scalar
    becomes the Python number of the same value (``np.float32(0.5)`` -> ``0.5``); every
    other object (a numpy array, a function, a class instance) is refused, since the
    safe loader would refuse the snapshot.
    """
    if depth > _MAX_DEPTH:
        raise ValueError(f"{where or 'the value'} is nested more than {_MAX_DEPTH} levels deep")
    if isinstance(value, torch.Tensor) or type(value) in _SAFE_LEAVES:
        return value
    if type(value) is torch.Size:
        return value
    numpy = _numpy_scalar(value)
    if numpy is not None:
        return numpy
    if type(value) in (list, tuple):
        items = [safe_value(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
        return items if type(value) is list else tuple(items)
    if type(value) in (dict, OrderedDict):
        out = {}
        for k, v in value.items():
            key = _numpy_scalar(k) if _numpy_scalar(k) is not None else k
            if type(key) not in (type(None), bool, int, float, str):
                raise ValueError(f"{where} has a key {k!r:.60} of type {type(k).__name__}")
            out[key] = safe_value(v, f"{where}[{k!r}]", depth + 1)
        return out
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    raise ValueError(f"{where or 'the value'} is a {kind} ({value!r:.60})")


def _numpy_scalar(value: Any) -> Any:
    """The Python value of a numpy scalar (None for anything else)."""
    if type(value).__module__ != "numpy":
        return None
    import numpy as np

    if isinstance(value, np.bool_ | np.integer | np.floating | np.complexfloating):
        return value.item()
    return None


def checked(snap: dict[str, Any]) -> dict[str, Any]:
    """``snap`` with its phases' and plugins' states each checked with :func:`safe_value`
    (a state the safe loader would refuse is a :class:`PluginError` naming its owner)."""
    phases = {}
    for name, value in snap.get("phases", {}).items():
        try:
            phases[name] = safe_value(value, "state_dict()")
        except ValueError as exc:
            raise PluginError(
                f"phase {name}: {exc}, which a resume snapshot cannot hold (allowed: "
                "tensors, numbers, strings, None, and lists, tuples and dicts of them)"
            ) from None
    plugins = {}
    for name, value in snap.get("plugins", {}).items():
        try:
            plugins[name] = safe_value(value, "the answer")
        except ValueError as exc:
            raise PluginError(
                f"plugin {name}: hook plugin_state_dict: {exc}, which a resume snapshot "
                "cannot hold (allowed: tensors, numbers, strings, None, and lists, tuples "
                "and dicts of them)"
            ) from None
    return {**snap, "phases": phases, "plugins": plugins}


def write(path: Path, snap: dict[str, Any]) -> None:
    """Store ``snap`` (a ``Trainer.state_dict()``) at ``path`` atomically, with the
    format number, after checking that the safe loader will read it back
    (:func:`checked`)."""
    buffer = io.BytesIO()
    torch.save({"format": SNAPSHOT_FORMAT, **checked(snap)}, buffer)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as exc:
        raise LeverError(
            f"{path}: cannot write the resume snapshot ({exc.strerror or exc})"
        ) from None


def read(path: Path) -> dict[str, Any]:
    """Load a snapshot written by :func:`write` (``weights_only``), checking its format
    number and the type of every entry (:func:`check`)."""
    try:
        snap = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LeverError(f"{path}: unreadable snapshot ({first})") from None
    if not isinstance(snap, dict) or snap.get("format") != SNAPSHOT_FORMAT:
        found = snap.get("format") if isinstance(snap, dict) else type(snap).__name__
        raise LeverError(
            f"{path}: snapshot format {found!r}, this lever-train reads format {SNAPSHOT_FORMAT}"
        )
    check(snap, path)
    return snap


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_rng(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1


def _is_python_rng(value: Any) -> bool:
    if not isinstance(value, list | tuple) or len(value) != 3:
        return False
    version, internal, gauss = value
    return (
        isinstance(version, int)
        and isinstance(internal, list | tuple)
        and len(internal) == 625
        and all(isinstance(x, int) and not isinstance(x, bool) for x in internal)
        and (gauss is None or isinstance(gauss, float))
    )


def _is_tensor_or_none(value: Any) -> bool:
    return value is None or isinstance(value, torch.Tensor)


def _is_number_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


#: The fields of a recorded comparison (``retention.Comparison``) and their checks.
_COMPARISON_FIELDS: dict[str, Any] = {
    "label": lambda v: isinstance(v, str),
    "value": _is_number_or_none,
    "against": lambda v: isinstance(v, str),
    "against_value": _is_number_or_none,
    "difference": _is_number_or_none,
    "half_width": _is_number_or_none,
    "n": _is_int,
    "replaced": lambda v: isinstance(v, bool),
}


def _is_per_query(value: Any) -> bool:
    return value is None or (
        isinstance(value, torch.Tensor) and value.dim() == 1 and value.is_floating_point()
    )


def _is_keeper_state(v: Any) -> bool:
    """The keeper's state (``CheckpointKeeper.state_dict``); the entries after
    ``best_value`` are optional (older snapshots lack them)."""
    closest = v.get("closest") if isinstance(v, dict) else None
    return (
        isinstance(v, dict)
        and isinstance(v.get("saved"), list)
        and all(isinstance(p, str) for p in v["saved"])
        and _is_number_or_none(v.get("best_value"))
        and (v.get("best_label") is None or isinstance(v.get("best_label"), str))
        and _is_per_query(v.get("best_per_query"))
        and _is_per_query(v.get("start_per_query"))
        and _is_number_or_none(v.get("start_value"))
        and isinstance(v.get("warned_noise", False), bool)
        and (
            closest is None
            or (
                isinstance(closest, dict)
                and set(closest) == set(_COMPARISON_FIELDS)
                and all(ok(closest[k]) for k, ok in _COMPARISON_FIELDS.items())
            )
        )
    )


#: What every snapshot holds, and the check of each entry's value.
_ENTRIES: dict[str, tuple[str, Any]] = {
    "epoch_closed": ("a bool", lambda v: isinstance(v, bool)),
    "phase": ("a phase name", lambda v: isinstance(v, str)),
    "epoch": ("an epoch number", _is_int),
    "step": ("a step count", _is_int),
    "global_step": ("a step count", _is_int),
    "step_in_epoch": ("a step count", _is_int),
    "bad_steps": ("a step count", _is_int),
    "history": (
        "a list of epoch records",
        lambda v: isinstance(v, list) and all(isinstance(h, dict) for h in v),
    ),
    "metrics": ("a dict of metrics", lambda v: isinstance(v, dict)),
    "stop_request": (
        "None or [reason, plugin]",
        lambda v: (
            v is None
            or (
                isinstance(v, list | tuple)
                and len(v) == 2
                and isinstance(v[0], str)
                and (v[1] is None or isinstance(v[1], str))
            )
        ),
    ),
    "keeper": ("the checkpoint keeper's state", lambda v: _is_keeper_state(v)),
    "start_logprobs": ("a tensor or None", _is_tensor_or_none),
    "ref_logprobs": ("a tensor or None", _is_tensor_or_none),
    "model": (
        "a dict of tensors",
        lambda v: isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values()),
    ),
    "optimizer": ("an optimiser state dict", lambda v: isinstance(v, dict)),
    "phases": (
        "a dict of phase states",
        lambda v: isinstance(v, dict) and all(isinstance(x, dict) for x in v.values()),
    ),
    "plugins": ("a dict of plugin states", lambda v: isinstance(v, dict)),
    "rng_torch": ("a random generator state", _is_rng),
    "rng_shuffle": ("a random generator state", _is_rng),
    "rng_python": ("Python's random state", _is_python_rng),
}
#: What a snapshot taken inside an epoch also holds.
_EPOCH_ENTRIES: dict[str, tuple[str, Any]] = {
    "epoch_order": (
        "a 1-D integer tensor",
        lambda v: (
            isinstance(v, torch.Tensor) and v.dim() == 1 and v.dtype in (torch.int64, torch.int32)
        ),
    ),
    "epoch_sums": (
        "a dict of sums",
        lambda v: (
            isinstance(v, dict)
            and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v.values())
        ),
    ),
    "epoch_counted": ("a count", _is_int),
    "epoch_skipped": ("a count", _is_int),
}


def check(snap: dict[str, Any], path: Path) -> None:
    """Every entry a snapshot needs, with a value of the right type; a tampered or
    truncated snapshot is a :class:`LeverError` naming the entry."""
    entries = dict(_ENTRIES)
    if snap.get("epoch_closed") is False:
        entries.update(_EPOCH_ENTRIES)
    for key, (what, ok) in entries.items():
        if key not in snap:
            raise LeverError(f"{path}: not a complete snapshot: entry {key!r} is missing")
        if not ok(snap[key]):
            value = snap[key]
            raise LeverError(
                f"{path}: entry {key!r} should be {what}, found {type(value).__name__} "
                f"{value!r:.60}"
            )
    pending = snap.get("pending_step_end")
    if pending is not None and not (
        isinstance(pending, list) and all(isinstance(n, str) for n in pending)
    ):
        raise LeverError(f"{path}: entry 'pending_step_end' should be a list of plugin names")
    if not isinstance(snap.get("pending_last_step", {}), dict):
        raise LeverError(f"{path}: entry 'pending_last_step' should be a dict of step values")
    if snap.get("start_model") is not None and not _ENTRIES["model"][1](snap["start_model"]):
        raise LeverError(f"{path}: entry 'start_model' should be a dict of tensors")


def check_fits(trainer: Trainer, snap: dict[str, Any], path: Path) -> None:
    """The snapshot belongs to this run: its weights fit the policy, its log-probs and
    epoch order fit the training data. Checked before anything is written."""
    own = trainer.model.state_dict()
    saved = snap["model"]
    if set(saved) != set(own):
        odd = sorted(set(saved) ^ set(own))
        raise LeverError(
            f"{path}: its weights do not fit the run's policy {trainer.model.policy_name} "
            f"(e.g. {odd[0]!r} is in one and not the other)"
        )
    for key, value in saved.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise LeverError(
                f"{path}: weight {key!r} has shape {list(value.shape)}, the run's policy "
                f"expects {list(own[key].shape)}"
            )
        if non_finite_count(value):
            raise LeverError(f"{path}: weight {key!r} holds non-finite values")
    groups = tuple(trainer.state.train.rewards_raw.shape)
    for key in ("start_logprobs", "ref_logprobs"):
        value = snap[key]
        if value is not None and tuple(value.shape) != groups:
            raise LeverError(
                f"{path}: entry {key!r} has shape {list(value.shape)}, the run's training "
                f"data needs {list(groups)}"
            )
    if not snap["epoch_closed"]:
        order = snap["epoch_order"]
        n = len(trainer.state.train)
        if len(order) and (int(order.min()) < 0 or int(order.max()) >= n):
            raise LeverError(
                f"{path}: entry 'epoch_order' holds rows outside the {n} training queries"
            )
        if snap["step_in_epoch"] * trainer.config.batch_size > len(order) + (
            trainer.config.batch_size - 1
        ):
            raise LeverError(
                f"{path}: entry 'step_in_epoch' ({snap['step_in_epoch']}) is past the end "
                f"of the epoch ({len(order)} rows)"
            )


__all__ = [
    "SNAPSHOT_FORMAT",
    "SNAPSHOT_NAME",
    "capture_rng",
    "check",
    "check_fits",
    "checked",
    "read",
    "restore_rng",
    "safe_value",
    "write",
]

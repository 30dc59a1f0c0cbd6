"""Saving checkpoints and importing starting checkpoints (SPEC section 8).

Checkpoints are safetensors files: the policy's weights plus a string metadata
header (format version, phase, epoch, KL weight, metrics, model hyper-parameters,
active plugins, data fingerprint). Every write goes to a temporary file in the same
directory, is fsynced, then renamed over the target, so a reader sees either the old
or the new complete file.

Starting checkpoints may also be a ``torch.save`` dict with ``model_state_dict``, a
PyTorch Lightning ``.ckpt`` (``state_dict`` with ``lever_lm.``/``pointer_selector.``
prefixes and the older ``cross_attn.*``/``attn_norm.*`` names), or a bare state dict.
Pickles are opened with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import LeverError

FORMAT_VERSION = "1"
_PREFIXES = ("lever_lm.", "pointer_selector.", "module.")
_RENAMES = (
    (re.compile(r"^cross_attn\."), "cross_attn_layers.0."),
    (re.compile(r"^attn_norm\."), "attn_norms.0."),
)


def checkpoint_name(phase: str, epoch: int) -> str:
    """File name of a phase's epoch checkpoint, e.g. ``rce_epoch1.safetensors``."""
    return f"{phase}_epoch{epoch}.safetensors"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same dir, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _encode_metadata_value(value: Any) -> str:
    """JSON text of ``value``; a string stays as it is unless it would decode as JSON.

    :func:`read_metadata` JSON-decodes every value, so a string such as ``"1"`` or
    ``"true"`` must be stored quoted to come back as the same string.
    """
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError:
            return value
    return json.dumps(value, sort_keys=True)


def save_checkpoint(
    path: Path, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
) -> None:
    """Save weights and metadata (values JSON-encoded) as a safetensors file, atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    header = {"format_version": FORMAT_VERSION}  # JSON text "1": read back as the integer 1
    header.update({k: _encode_metadata_value(v) for k, v in metadata.items()})
    try:
        atomic_write_bytes(path, save(tensors, metadata=header))
    except OSError as exc:
        raise LeverError(f"{path}: cannot write checkpoint ({exc.strerror or exc})") from None


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata header of one of this project's checkpoints, JSON values decoded."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        raw = fh.metadata() or {}
    out: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


@dataclass
class ImportReport:
    """What loading a starting checkpoint did."""

    path: str
    loaded: int = 0
    ignored: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """Summary lines for the run's log."""
        out = [f"loaded starting checkpoint {self.path}: {self.loaded} tensors"]
        if self.ignored:
            out.append(
                f"  ignored {len(self.ignored)} keys the policy does not have "
                f"(e.g. {self.ignored[0]})"
            )
        if self.missing:
            out.append(
                f"  warning: {len(self.missing)} policy keys missing, left at their "
                f"initial values: {', '.join(self.missing)}"
            )
        return out


def normalize_key(key: str) -> str:
    """Map a foreign checkpoint key to this project's parameter name."""
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                changed = True
    for pattern, repl in _RENAMES:
        key = pattern.sub(repl, key)
    return key


def _torch_load(path: Path, trust: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as exc:
        text = str(exc)
        if not trust and ("Weights only load failed" in text or "weights_only" in text):
            raise LeverError(
                f"{path}: refused by the safe loader (weights_only=True): it holds "
                "pickled objects beyond tensors; if you trust its source, pass "
                "--trust-checkpoint for a full (unsafe) load"
            ) from None
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise LeverError(f"{path}: cannot read checkpoint ({first})") from None


def read_state_dict(path: str | os.PathLike[str], trust: bool = False) -> dict[str, torch.Tensor]:
    """Read a starting checkpoint in any supported format into ``{our key: tensor}``."""
    p = Path(path)
    if not p.is_file():
        raise LeverError(f"{p}: file not found")
    if p.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            raw: Any = load_file(str(p))
        except Exception as exc:
            raise LeverError(f"{p}: cannot read safetensors checkpoint ({exc})") from None
    else:
        raw = _torch_load(p, trust)
        if isinstance(raw, Mapping):
            for key in ("model_state_dict", "state_dict", "model"):
                if isinstance(raw.get(key), Mapping):
                    raw = raw[key]
                    break
    if not isinstance(raw, Mapping):
        raise LeverError(f"{p}: expected a state dict of tensors, found {type(raw).__name__}")
    out: dict[str, torch.Tensor] = {}
    for k, v in raw.items():
        if isinstance(v, torch.Tensor):
            out[normalize_key(str(k))] = v
    if not out:
        raise LeverError(f"{p}: holds no tensors")
    return out


def infer_policy_shape(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Hidden width and number of cross-attention layers implied by a state dict."""
    shape: dict[str, int] = {}
    if "query_proj.weight" in state_dict:
        shape["hidden_dim"] = int(state_dict["query_proj.weight"].shape[0])
    layers = [
        int(m.group(1)) for k in state_dict if (m := re.match(r"cross_attn_layers\.(\d+)\.", k))
    ]
    if layers:
        shape["num_layers"] = max(layers) + 1
    return shape


def _check_input_dim(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: str, dim_hint: str
) -> None:
    """Refuse a checkpoint trained on another embedding width d.

    When d equals the hidden width the input projection is the identity and has no
    weight, so a different d does not show up as a shape mismatch of a shared key:
    the checkpoint's ``input_proj.weight`` would be silently ignored, or the model's
    left at its random initialisation.
    """
    own = model.state_dict()
    model_d = getattr(getattr(model, "config", None), "input_dim", None)
    if model_d is None:
        return
    if "input_proj.weight" in state_dict and "input_proj.weight" not in own:
        key = "input_proj.weight"
    elif (
        "input_proj.weight" in own
        and "input_proj.weight" not in state_dict
        and "query_proj.weight" in state_dict
    ):
        key = "query_proj.weight"  # identity input projection: d == hidden width
    else:
        return
    ckpt_d = int(state_dict[key].shape[-1])
    if ckpt_d != model_d:
        raise LeverError(
            f"{path}: parameter {key!r} has shape {list(state_dict[key].shape)}, so the "
            f"checkpoint was trained on embedding width d={ckpt_d}, but the model is "
            f"built for d={model_d}{dim_hint}"
        )


def load_into_model(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: str, dim_hint: str = ""
) -> ImportReport:
    """Copy matching tensors into ``model``; shape mismatches are errors naming the key."""
    own = model.state_dict()
    report = ImportReport(path)
    for key, value in state_dict.items():
        if key not in own:
            report.ignored.append(key)
            continue
        if tuple(value.shape) != tuple(own[key].shape):
            raise LeverError(
                f"{path}: parameter {key!r} has shape {list(value.shape)} in the "
                f"checkpoint but the model expects {list(own[key].shape)}{dim_hint}"
            )
        if not value.is_floating_point():
            raise LeverError(f"{path}: parameter {key!r} has dtype {value.dtype}, expected float")
    _check_input_dim(model, state_dict, path, dim_hint)
    filtered = {k: v.to(own[k].dtype) for k, v in state_dict.items() if k in own}
    report.missing = sorted(set(own) - set(filtered))
    report.loaded = len(filtered)
    if not filtered:
        raise LeverError(
            f"{path}: none of its {len(state_dict)} keys belongs to the policy "
            f"(e.g. {next(iter(state_dict))!r})"
        )
    model.load_state_dict(filtered, strict=False)
    return report

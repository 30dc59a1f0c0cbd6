"""Saving checkpoints and importing starting checkpoints (docs/algorithm.md#checkpoints).

Checkpoints are safetensors files: the policy's weights plus a string metadata
header (format version, phase, epoch, KL weight, metrics, model hyper-parameters,
active plugins, data fingerprint). Every write goes to a temporary file in the same
directory, is fsynced, then renamed over the target, so a reader sees either the old
or the new complete file.

Starting checkpoints may also be a ``torch.save`` dict with ``model_state_dict``, a
PyTorch Lightning ``.ckpt`` (``state_dict`` with ``lever_lm.``/``pointer_selector.``
prefixes and the older ``cross_attn.*``/``attn_norm.*`` names), or a bare state dict.
Pickles are opened with ``weights_only=True``. :func:`convert_checkpoint` turns any
of them into this project's safetensors (``lever-train convert-checkpoint``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import LeverError
from .fileio import atomic_write_bytes

if TYPE_CHECKING:
    from .policy import TrunkConfig

FORMAT_VERSION = "1"
#: Most cross-attention layers a policy may have (``--num-layers`` has the same bound): a
#: checkpoint key naming a higher layer is junk, never a reason to build that many.
MAX_LAYERS = 64
#: The trunk's layer lists; their indices give a foreign checkpoint's depth.
_LAYER_KEY = re.compile(r"^(cross_attn_layers|attn_norms)\.(\d+)\.(.+)$")
_PREFIXES = ("lever_lm.", "pointer_selector.", "module.")
_RENAMES = (
    (re.compile(r"^cross_attn\."), "cross_attn_layers.0."),
    (re.compile(r"^attn_norm\."), "attn_norms.0."),
)


def checkpoint_name(phase: str, epoch: int, epochs: int = 0) -> str:
    """File name of a phase's epoch checkpoint, e.g. ``rce_epoch01.safetensors``.

    The epoch is zero-padded to two digits, or to the width of ``epochs`` (the phase's
    epoch count) when that is wider, so that names sort in epoch order."""
    width = max(2, len(str(epochs)))
    return f"{phase}_epoch{epoch:0{width}d}.safetensors"


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


def non_finite_count(value: torch.Tensor) -> int:
    """How many entries of a floating-point tensor are NaN or infinite (0 for any other
    dtype)."""
    if not value.is_floating_point():
        return 0
    return int((~torch.isfinite(value)).sum())


def save_checkpoint(
    path: Path, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
) -> None:
    """Save weights and metadata (values JSON-encoded) as a safetensors file, atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    for key, value in tensors.items():
        bad = non_finite_count(value)
        if bad:
            raise LeverError(
                f"{path}: not written: parameter {key!r} holds non-finite values "
                f"({bad} of {value.numel()})"
            )
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


def header_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint's metadata from its header alone (the weights are not read): what
    reading the whole checkpoint gives as metadata, and empty for a pickle checkpoint, a
    header that is not ours or a file that cannot be read (loading its weights says why)."""
    if not Path(path).is_file() or is_pickle_checkpoint(path):
        return {}
    try:
        return read_metadata(path)
    except Exception:  # not our header, or unreadable
        return {}


@dataclass
class ImportReport:
    """What loading a starting checkpoint did.

    ``ignored``: keys the policy does not have (an encoder's, say); ``unexpected``: the
    ignored keys that sit inside one of the policy's own modules (``cross_attn_layers.39.x``
    in a one-layer policy, ``query_proj.bias``), a sign that the file is not this model;
    ``missing``: the policy's keys the file lacks; ``initialised``: how the missing ones
    were set (shown in the log).
    """

    path: str
    loaded: int = 0
    ignored: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    initialised: str = "left at their initial values"

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
                f"  warning: {len(self.missing)} policy keys missing, {self.initialised}: "
                f"{', '.join(self.missing)}"
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


def is_pickle_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether :func:`read_state_dict` opens ``path`` with ``torch.load`` (a pickle)."""
    return Path(path).suffix.lower() != ".safetensors"


def read_state_dict_with_format(
    path: str | os.PathLike[str], trust: bool = False
) -> tuple[dict[str, torch.Tensor], str]:
    """:func:`read_state_dict`, plus a description of the container that held the weights."""
    p = Path(path)
    if not p.is_file():
        raise LeverError(f"{p}: " + ("not a file" if p.exists() else "file not found"))
    if not is_pickle_checkpoint(p):
        from safetensors.torch import load_file

        try:
            raw: Any = load_file(str(p))
        except Exception as exc:
            raise LeverError(f"{p}: cannot read safetensors checkpoint ({exc})") from None
        source_format = "safetensors"
    else:
        raw = _torch_load(p, trust)
        source_format = "torch.save state dict"
        if isinstance(raw, Mapping):
            for key in ("model_state_dict", "state_dict", "model"):
                if isinstance(raw.get(key), Mapping):
                    raw = raw[key]
                    source_format = f"torch.save dict, weights under {key!r}"
                    break
    if not isinstance(raw, Mapping):
        raise LeverError(f"{p}: expected a state dict of tensors, found {type(raw).__name__}")
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for k, v in raw.items():
        if isinstance(v, torch.Tensor):
            key = normalize_key(str(k))
            if key in out and not (
                out[key].shape == v.shape and out[key].dtype == v.dtype and torch.equal(out[key], v)
            ):
                raise LeverError(
                    f"{p}: keys {origin[key]!r} and {str(k)!r} both name parameter {key!r} "
                    "and hold different values; which one is the policy's is ambiguous"
                )
            out[key] = v
            origin.setdefault(key, str(k))
    if not out:
        raise LeverError(f"{p}: holds no tensors")
    return out, source_format


def read_state_dict(path: str | os.PathLike[str], trust: bool = False) -> dict[str, torch.Tensor]:
    """Read a starting checkpoint in any supported format into ``{our key: tensor}``."""
    return read_state_dict_with_format(path, trust)[0]


def infer_policy_shape(
    state_dict: Mapping[str, torch.Tensor], path: str = "checkpoint"
) -> dict[str, int]:
    """Hidden width and number of cross-attention layers implied by a state dict.

    The layer count comes from consistent keys only: the indices of
    ``cross_attn_layers.{i}.*`` and ``attn_norms.{i}.*`` must be 0..L-1 with no gap,
    the same L for both lists, every layer with the same parameter names, and
    L <= :data:`MAX_LAYERS`. Anything else is a :class:`LeverError` naming the key.
    """
    shape: dict[str, int] = {}
    if "query_proj.weight" in state_dict:
        weight = state_dict["query_proj.weight"]
        if weight.dim() != 2:
            raise LeverError(
                f"{path}: parameter 'query_proj.weight' has shape {list(weight.shape)}, "
                "expected [hidden, hidden]"
            )
        shape["hidden_dim"] = int(weight.shape[0])
    families: dict[str, dict[int, set[str]]] = {}
    for key in state_dict:
        m = _LAYER_KEY.match(key)
        if m is None:
            continue
        family, digits, rest = m.groups()
        if len(digits) > 3 or int(digits) >= MAX_LAYERS:
            raise LeverError(
                f"{path}: key {key!r} names layer {digits[:12]}{'...' if len(digits) > 12 else ''}"
                f", beyond the {MAX_LAYERS} layers a policy may have"
            )
        families.setdefault(family, {}).setdefault(int(digits), set()).add(rest)
    counts = {}
    for family, layers in families.items():
        count = max(layers) + 1
        gaps = sorted(set(range(count)) - set(layers))
        if gaps:
            raise LeverError(
                f"{path}: {family} has layers {sorted(layers)[:8]} but no layer {gaps[0]}; "
                "layer keys must be numbered 0..L-1"
            )
        names = layers[0]
        for index, rest in sorted(layers.items()):
            if rest != names:
                odd = sorted(rest ^ names)[0]
                raise LeverError(
                    f"{path}: {family}.{index} has parameters {sorted(rest)} but "
                    f"{family}.0 has {sorted(names)} (e.g. {family}.{index}.{odd} or "
                    f"{family}.0.{odd}); the layers are not consistent"
                )
        counts[family] = count
    if len(set(counts.values())) > 1:
        shown = ", ".join(f"{f}: {n}" for f, n in sorted(counts.items()))
        raise LeverError(f"{path}: the layer lists disagree on the number of layers ({shown})")
    if counts:
        shape["num_layers"] = next(iter(counts.values()))
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
    model_d = getattr(model, "input_dim", None)
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


def own_namespace(model: torch.nn.Module, keys: Iterable[str] | None = None) -> set[str]:
    """The first components of ``model``'s parameter and buffer names (its top modules);
    ``keys``: the keys of ``model.state_dict()``, when the caller has them already."""
    names = set(model.state_dict() if keys is None else keys)
    names |= {n for n, _ in model.named_children()}
    return {n.split(".")[0] for n in names}


def load_into_model(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    path: str,
    dim_hint: str = "",
    allow_unexpected: bool = False,
) -> ImportReport:
    """Copy matching tensors into ``model``; shape mismatches are errors naming the key.

    A key the model lacks is ignored (and counted) when it belongs to something else (an
    encoder's weights in a Lightning checkpoint); one inside the model's own modules
    (``report.unexpected``) is an error unless ``allow_unexpected``: the file does not
    hold this model. ``input_proj.weight`` of a model whose input projection is the
    identity is left to the caller (see :func:`_check_input_dim`). Non-finite weights
    are an error. Missing keys are listed in ``report.missing``; callers decide whether
    that is acceptable.
    """
    own = model.state_dict()
    report = ImportReport(path)
    namespace = own_namespace(model, own)
    for key, value in state_dict.items():
        if key not in own:
            report.ignored.append(key)
            if key.split(".")[0] in namespace and key != "input_proj.weight":
                report.unexpected.append(key)
            continue
        if tuple(value.shape) != tuple(own[key].shape):
            raise LeverError(
                f"{path}: parameter {key!r} has shape {list(value.shape)} in the "
                f"checkpoint but the model expects {list(own[key].shape)}{dim_hint}"
            )
        if not value.is_floating_point():
            raise LeverError(f"{path}: parameter {key!r} has dtype {value.dtype}, expected float")
        bad = non_finite_count(value)
        if bad:
            raise LeverError(
                f"{path}: parameter {key!r} holds non-finite values "
                f"({bad} of {value.numel()}); the checkpoint is not a usable model"
            )
    if report.unexpected and not allow_unexpected:
        shown = ", ".join(report.unexpected[:4]) + (" ..." if len(report.unexpected) > 4 else "")
        raise LeverError(
            f"{path}: {len(report.unexpected)} keys inside the policy's own modules are not "
            f"parameters of this policy ({shown}); the checkpoint holds another model "
            "(another depth or architecture)"
        )
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


# ----------------------------------------------------------------- conversion
@dataclass
class ConversionReport:
    """What :func:`convert_checkpoint` read, kept, dropped and wrote."""

    src: str
    dst: str
    source_format: str
    config: dict[str, Any]
    input_dim_from: str
    kept: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """Summary lines for the command's output."""
        c = self.config
        out = [
            f"read {self.src} ({self.source_format})",
            f"  policy: input_dim {c['input_dim']} ({self.input_dim_from}), "
            f"hidden_dim {c['hidden_dim']}, num_layers {c['num_layers']}, "
            f"num_heads {c['num_heads']}",
            f"  loaded {len(self.kept)} policy tensors",
        ]
        if self.ignored:
            shown = ", ".join(self.ignored[:5]) + (" ..." if len(self.ignored) > 5 else "")
            out.append(f"  ignored {len(self.ignored)} keys the policy does not have: {shown}")
        if self.missing:
            out.append(
                f"  missing {len(self.missing)} policy keys (not in the file; a run "
                f"starting from it initialises them): {', '.join(self.missing)}"
            )
        out.append(f"wrote {self.dst}")
        return out


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _source_num_heads(path: Path) -> int | None:
    """``num_heads`` recorded in one of this project's checkpoints, if any."""
    if is_pickle_checkpoint(path):
        return None
    try:
        model = read_metadata(path).get("model")
    except Exception:
        return None
    heads = model.get("num_heads") if isinstance(model, dict) else None
    return heads if isinstance(heads, int) and not isinstance(heads, bool) and heads > 0 else None


def _check_conversion_target(dst: Path, overwrite: bool) -> None:
    """Refuse a conversion target that is not a ``*.safetensors`` name, is a directory,
    or already exists (unless ``overwrite``)."""
    if dst.suffix.lower() != ".safetensors":
        raise LeverError(
            f"{dst}: the converted checkpoint must be named *.safetensors "
            "(the suffix decides how --sft-ckpt reads a file)"
        )
    if dst.is_dir():
        raise LeverError(f"{dst}: is a directory")
    if dst.exists() and not overwrite:
        raise LeverError(f"{dst}: already exists; pass --overwrite to replace it")


def _converted_input_dim(
    proj: torch.Tensor | None, hidden: int, src: Path, input_dim: int | None
) -> tuple[int, str]:
    """The embedding width ``d`` of a source checkpoint, from its ``input_proj.weight``
    (``proj``, which must be ``[hidden, d]``) or ``hidden`` when it has none (an identity
    projection), and where it came from (for the report); ``input_dim`` (``--input-dim``),
    when given, must agree with it."""
    if proj is None:
        ckpt_d, d_from = hidden, "no input_proj.weight: identity projection, d = hidden dim"
        why = (
            "which has no 'input_proj.weight' (an identity input projection), so d equals "
            f"its hidden dim {hidden}"
        )
    elif proj.dim() != 2 or int(proj.shape[0]) != hidden:
        raise LeverError(
            f"{src}: parameter 'input_proj.weight' has shape {list(proj.shape)}, "
            f"expected [{hidden}, d] (hidden dim {hidden} from 'query_proj.weight')"
        )
    else:
        ckpt_d, d_from = int(proj.shape[1]), "from input_proj.weight"
        why = f"whose 'input_proj.weight' has shape {list(proj.shape)}, so d={ckpt_d}"
    if input_dim is not None and input_dim != ckpt_d:
        raise LeverError(f"--input-dim {input_dim} disagrees with {src}, {why}")
    return ckpt_d, d_from


def _read_conversion_source(
    src: Path, trust: bool, warn: Callable[[str], None] | None
) -> tuple[dict[str, torch.Tensor], str, dict[str, int]]:
    """The state dict of the checkpoint to convert, its format and its policy shape
    (:func:`infer_policy_shape`); a file without a pointer policy in it is refused, and
    ``trust`` on a pickle file is warned about before the file is opened."""
    if trust and warn is not None and src.is_file() and is_pickle_checkpoint(src):
        warn(
            f"warning: --trust-checkpoint: opening {src} with a full (unsafe) pickle "
            "load (weights_only=False), which can run code stored in the file"
        )
    state_dict, source_format = read_state_dict_with_format(src, trust)
    shape = infer_policy_shape(state_dict, str(src))
    if "hidden_dim" not in shape:
        raise LeverError(
            f"{src}: none of its {len(state_dict)} tensors is 'query_proj.weight' "
            f"(e.g. {next(iter(state_dict))!r}), so it holds no pointer policy to convert"
        )
    return state_dict, source_format, shape


def _conversion_trunk(
    shape: dict[str, int], input_dim: int, num_heads: int | None, src: Path
) -> TrunkConfig:
    """The trunk a converted checkpoint is loaded into: its inferred shape, and
    ``num_heads`` (else the source's recorded head count, else 1), which must divide
    the hidden width."""
    from .policy import TrunkConfig

    hidden = shape["hidden_dim"]
    if num_heads is None:
        num_heads = _source_num_heads(src) or 1
    if hidden % num_heads:
        raise LeverError(f"--num-heads {num_heads} does not divide the hidden dim {hidden}")
    return TrunkConfig(
        input_dim=input_dim,
        hidden_dim=hidden,
        num_layers=shape.get("num_layers", 1),
        num_heads=num_heads,
    )


def _conversion_metadata(
    model: torch.nn.Module,
    config: TrunkConfig,
    src: Path,
    source_format: str,
    report: ImportReport,
) -> dict[str, Any]:
    """The metadata written with a converted checkpoint: ``policy`` (name, input width
    and options of the policy the weights were checked against), ``model`` (the
    :class:`PolicyConfig` dict), ``converted_from``, ``source_format``,
    ``source_sha256``, ``ignored_keys`` (a count), ``missing_keys`` (a list) and
    ``lever_trainer_version``."""
    from . import __version__

    policy_options = getattr(model, "policy_options", None)
    options = policy_options() if callable(policy_options) else config.options()
    return {
        "policy": {
            "name": getattr(model, "policy_name", ""),
            "input_dim": config.input_dim,
            "options": options,
        },
        "model": {"input_dim": config.input_dim, **options},
        "converted_from": os.path.abspath(src),
        "source_format": source_format,
        "source_sha256": _sha256_of(src),
        "ignored_keys": len(report.ignored),
        "missing_keys": report.missing,
        "lever_trainer_version": __version__,
    }


def convert_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    input_dim: int | None = None,
    num_heads: int | None = None,
    trust: bool = False,
    overwrite: bool = False,
    warn: Callable[[str], None] | None = None,
    build: Callable[[int, dict[str, Any]], torch.nn.Module] | None = None,
) -> ConversionReport:
    """Convert a starting checkpoint in any supported format into this project's safetensors.

    The policy's shape comes from the weights: hidden width and layer count from
    :func:`infer_policy_shape`, the embedding width ``d`` from ``input_proj.weight``
    (``[hidden, d]``), or ``d = hidden`` when there is none (identity projection).
    ``input_dim`` must agree with that. The weights are checked by loading them into
    a policy of that shape; only the policy's own keys are written, unchanged (same
    values and dtype), with the metadata of :func:`_conversion_metadata`. An existing
    ``dst`` is refused unless ``overwrite``; nothing is written on any error.

    ``build(input_dim, options)`` builds the policy the weights are checked against
    (the run assembly passes the default policy's ``build_policy``); its
    ``policy_name`` and ``policy_options()`` are recorded as ``policy``.
    """
    if build is None:
        raise ValueError("convert_checkpoint needs a policy builder")
    src_p, dst_p = Path(src), Path(dst)
    _check_conversion_target(dst_p, overwrite)
    state_dict, source_format, shape = _read_conversion_source(src_p, trust, warn)
    hidden = shape["hidden_dim"]
    proj = state_dict.get("input_proj.weight")
    ckpt_d, d_from = _converted_input_dim(proj, hidden, src_p, input_dim)
    config = _conversion_trunk(shape, ckpt_d, num_heads, src_p)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG as it was
        model = build(ckpt_d, config.options())
    report = load_into_model(model, state_dict, str(src_p), f" (d={ckpt_d}, {d_from})")
    if proj is not None and ckpt_d == hidden and not torch.equal(proj.float(), torch.eye(hidden)):
        if warn is not None:
            warn(
                f"warning: {src_p}: 'input_proj.weight' is dropped: with d equal to the "
                f"hidden dim ({hidden}) this project's input projection is the identity, "
                "so the converted policy computes something else than the source one"
            )
    own = model.state_dict()
    kept = {k: v.detach().clone() for k, v in state_dict.items() if k in own}
    metadata = _conversion_metadata(model, config, src_p, source_format, report)
    save_checkpoint(dst_p, kept, metadata)
    return ConversionReport(
        src=str(src_p),
        dst=str(dst_p),
        source_format=source_format,
        config=config.to_dict(),
        input_dim_from=d_from,
        kept=sorted(kept),
        ignored=report.ignored,
        missing=report.missing,
        metadata=metadata,
    )

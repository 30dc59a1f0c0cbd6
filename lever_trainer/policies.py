"""Building policies through the ``build_policy`` hook, fresh or from a checkpoint.

A policy is named (``--policy NAME``, default
:data:`~lever_trainer.coreoptions.DEFAULT_POLICY`) and built by the one active plugin
whose ``policies`` answer provides that name. Checkpoints record the name, the
embedding width and the policy's own options (``policy_options()``), so ``--sft-ckpt``,
``--resume``, ``select`` and ``convert-checkpoint`` rebuild the same module. Foreign
checkpoints carry no such record: their trunk shape (hidden width, layers) is read
from the weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    ImportReport,
    infer_policy_shape,
    is_pickle_checkpoint,
    load_into_model,
    read_metadata,
    read_state_dict,
)
from .coreoptions import DEFAULT_POLICY
from .errors import Interrupted, LeverError, PluginError
from .plugins import PluginSet
from .policy import Policy

#: The policy of a checkpoint that records none (foreign formats, older metadata): the
#: reference implementation's.
FOREIGN_POLICY = "pointer"


def policy_registry(plugins: PluginSet) -> dict[str, tuple[str, Callable[..., Any]]]:
    """``{policy name: (plugin, build)}``: the merged ``policies`` answers of the active
    plugins; two plugins providing one name is an error naming both."""
    found: dict[str, tuple[str, Callable[..., Any]]] = {}
    for plugin, answer in plugins.call_all("policies"):
        if answer is None:
            continue
        if not isinstance(answer, Mapping):
            raise PluginError(
                f"plugin {plugin}: hook policies must return a mapping of name -> builder, "
                f"got {type(answer).__name__}"
            )
        for name, build in answer.items():
            other = found.get(name)
            if other is not None:
                raise PluginError(
                    f"plugins {other[0]} and {plugin} both provide policy {name!r}; "
                    "disable one of them (--no-plugin)"
                )
            found[str(name)] = (plugin, build)
    return found


def known_policies(plugins: PluginSet) -> list[str]:
    """Policy names the active plugins provide."""
    return sorted({n for info in plugins.active for n in info.policies})


def build_policy(
    plugins: PluginSet, name: str, input_dim: int, options: Mapping[str, Any]
) -> Policy:
    """The policy ``name`` for width ``input_dim``, built by the plugin that provides it
    (its ``policies`` answer; for a plugin written before that hook, ``build_policy``)."""
    entry = policy_registry(plugins).get(name)
    if entry is not None:
        plugin = entry[0]
        try:
            policy = entry[1](input_dim, dict(options))
        except (LeverError, Interrupted):
            raise
        except Exception as exc:
            raise PluginError(
                f"plugin {plugin} failed building policy {name!r}: {type(exc).__name__}: {exc}"
            ) from exc
    else:
        decision = plugins.call_single(
            "build_policy", name=name, input_dim=input_dim, options=dict(options)
        )
        if decision is None:
            known = ", ".join(known_policies(plugins)) or "none"
            raise LeverError(
                f"--policy: no active plugin builds policy {name!r} (available: {known}; "
                "see `lever-train plugins`)"
            )
        plugin, policy = decision.plugin, decision.value
    if not isinstance(policy, Policy):
        raise PluginError(
            f"plugin {plugin}: policy {name!r} was built as {type(policy).__name__}, "
            "expected a lever_trainer.api.Policy"
        )
    return policy


def recorded_policy(metadata: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """``(name, options)`` recorded in one of this project's checkpoints, if any."""
    spec = metadata.get("policy")
    if isinstance(spec, Mapping) and isinstance(spec.get("name"), str):
        options = spec.get("options")
        return spec["name"], dict(options) if isinstance(options, Mapping) else {}
    model = metadata.get("model")  # checkpoints written before policies were plugins
    if isinstance(model, Mapping):
        return FOREIGN_POLICY, {k: v for k, v in model.items() if k != "input_dim"}
    return None


def read_checkpoint(
    path: str | os.PathLike[str], trust: bool, warn: Callable[[str], None] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights (our names) and metadata (empty for foreign formats) of a checkpoint."""
    if trust and warn is not None and Path(path).is_file() and is_pickle_checkpoint(path):
        warn(
            f"warning: --trust-checkpoint: loading {path} with a full (unsafe) pickle "
            "load; only do this for files from a source you trust"
        )
    state_dict = read_state_dict(path, trust)
    metadata: dict[str, Any] = {}
    if not is_pickle_checkpoint(path):
        try:
            metadata = read_metadata(path)
        except Exception:  # weights readable, header not ours: a foreign safetensors file
            metadata = {}
    return state_dict, metadata


def _check_identity_projection(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: str
) -> None:
    """A square ``input_proj.weight`` for a model whose input projection is the identity
    (d equals the width) is accepted only when it is the identity matrix: any other
    matrix would be dropped, and the model would compute something else."""
    weight = state_dict.get("input_proj.weight")
    if weight is None or "input_proj.weight" in model.state_dict():
        return
    if weight.dim() == 2 and weight.shape[0] == weight.shape[1]:
        if torch.equal(weight.float(), torch.eye(weight.shape[0])):
            return
        raise LeverError(
            f"{path}: holds an input projection 'input_proj.weight' {list(weight.shape)} that "
            "is not the identity, but with the embedding width equal to the hidden width "
            "this project's policy has none; the checkpoint would compute something else"
        )


def _source_keys(
    plugins: PluginSet, name: str, input_dim: int, options: Mapping[str, Any]
) -> set[str] | None:
    """The parameter names of policy ``name`` built at ``options`` (None if no active
    plugin builds it); the caller's random state is left untouched."""
    try:
        with torch.random.fork_rng(devices=[]):
            return set(build_policy(plugins, name, input_dim, options).state_dict())
    except (LeverError, ValueError, TypeError):
        return None


def missing_error(path: str, report: ImportReport, total: int, flag: str | None) -> LeverError:
    """The error for a checkpoint that lacks some of the policy's weights."""
    shown = ", ".join(report.missing[:6]) + (" ..." if len(report.missing) > 6 else "")
    hint = (
        f"; pass {flag} to start those from the seeded initialisation"
        if flag
        else "; it is not a complete model"
    )
    return LeverError(
        f"{path}: {len(report.missing)} of the policy's {total} weights are missing ({shown}){hint}"
    )


def _merge_checkpoint_options(
    merged: dict[str, Any],
    given: Mapping[str, str],
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any],
    sft_ckpt: str,
) -> tuple[str, dict[str, Any]]:
    """Fill ``merged`` (the run's option values) with a starting checkpoint's recorded
    options, or for a foreign file the trunk shape of its weights, where the user set
    none (``given``); an explicit value that disagrees is an error. Returns the policy
    the checkpoint holds and its options."""
    recorded = recorded_policy(metadata)
    from_ckpt: dict[str, Any] = dict(infer_policy_shape(state_dict, sft_ckpt))
    source = (
        (recorded[0], {**from_ckpt, **recorded[1]})
        if recorded is not None
        else (FOREIGN_POLICY, dict(from_ckpt))
    )
    if recorded is not None:
        from_ckpt.update(recorded[1])
    for key, value in from_ckpt.items():
        flag = given.get(key)
        if flag is not None and merged.get(key) != value:
            raise LeverError(
                f"{flag} {merged.get(key)} disagrees with --sft-ckpt {sft_ckpt}, "
                f"which has {key.replace('_', ' ')} {value}"
            )
        if flag is None:
            merged[key] = value
    return source


def _load_start_weights(
    plugins: PluginSet,
    policy: Policy,
    name: str,
    input_dim: int,
    state_dict: dict[str, torch.Tensor],
    sft_ckpt: str,
    source: tuple[str, dict[str, Any]],
    partial: bool,
    seed: int | None,
) -> list[str]:
    """Load a starting checkpoint's weights into ``policy`` (of plugin policy ``name``;
    the checkpoint holds ``source``, a policy name and its options) and return the
    lines that report it. Weights the source policy has but the file lacks are an
    error unless ``partial``; the rest start from the (seeded) initialisation."""
    _check_identity_projection(policy, state_dict, sft_ckpt)
    report = load_into_model(
        policy,
        state_dict,
        sft_ckpt,
        f" (embedding width d={input_dim} from --img-emb)",
        allow_unexpected=partial,
    )
    total = len(policy.state_dict())
    if source[0] == name:
        unexplained = list(report.missing)
    else:
        # another policy's checkpoint: what that policy has must all be there
        source_keys = _source_keys(plugins, source[0], input_dim, source[1])
        unexplained = [k for k in report.missing if source_keys is None or k in source_keys]
    if unexplained and not partial:
        report.missing = unexplained
        raise missing_error(sft_ckpt, report, total, "--partial-load")
    seeded = f"initialised from --seed {seed}" if seed is not None else "initialised"
    report.initialised = (
        f"{seeded} (policy {name}; the checkpoint holds policy {source[0]})"
        if source[0] != name
        else f"{seeded} (--partial-load)"
    )
    lines = report.lines()
    if report.unexpected:
        lines.append(
            f"  warning: --partial-load: ignored {len(report.unexpected)} keys inside the "
            f"policy's modules that it does not have: {', '.join(report.unexpected)}"
        )
    return lines


def start_policy(
    plugins: PluginSet,
    name: str,
    input_dim: int,
    options: Mapping[str, Any],
    given: Mapping[str, str],
    sft_ckpt: str | None = None,
    trust: bool = False,
    warn: Callable[[str], None] | None = None,
    partial: bool = False,
    seed: int | None = None,
) -> tuple[Policy, list[str]]:
    """The policy a run starts from: built fresh, or loaded from ``sft_ckpt``.

    ``options`` are the run's option values; ``given`` maps the policy options the user
    set explicitly to their flag (``{"hidden_dim": "--hidden-dim"}``). A starting
    checkpoint's recorded options (or, for a foreign file, the trunk shape of its
    weights) fill the options the user did not set; an explicit value that disagrees
    is an error.

    The checkpoint must hold every weight of the policy it records (a foreign file: the
    default policy), else it is an error unless ``partial`` (``--partial-load``). It may
    come from another policy (a ``pointer`` checkpoint into ``pointer-gru``, as upstream
    starts its variants): the shared weights load, and the modules the source policy
    does not have start from the initialisation, which the caller seeds (``seed`` is
    named in the log). Keys inside the policy's own modules that it does not have are an
    error unless ``partial``.
    """
    merged = dict(options)
    if not sft_ckpt:
        return build_policy(plugins, name, input_dim, merged), []
    state_dict, metadata = read_checkpoint(sft_ckpt, trust, warn)
    source = _merge_checkpoint_options(merged, given, state_dict, metadata, sft_ckpt)
    policy = build_policy(plugins, name, input_dim, merged)
    lines = _load_start_weights(
        plugins, policy, name, input_dim, state_dict, sft_ckpt, source, partial, seed
    )
    return policy, lines


def policy_from_checkpoint(
    plugins: PluginSet,
    path: str | os.PathLike[str],
    input_dim: int,
    trust: bool = False,
    warn: Callable[[str], None] | None = None,
) -> tuple[Policy, list[str]]:
    """Rebuild the exact policy a checkpoint was trained as, with its weights (select,
    evaluate). Foreign checkpoints rebuild the default policy at their trunk shape."""
    state_dict, metadata = read_checkpoint(path, trust, warn)
    recorded = recorded_policy(metadata)
    shape = infer_policy_shape(state_dict, str(path))
    if recorded is None:
        name, options = FOREIGN_POLICY, dict(shape)
    else:
        name, options = recorded
    with torch.random.fork_rng(devices=[]):  # a complete checkpoint overwrites every init
        policy = build_policy(plugins, name, input_dim, options)
    _check_identity_projection(policy, state_dict, str(path))
    report = load_into_model(policy, state_dict, str(path), f" (embedding width d={input_dim})")
    if report.missing:
        raise missing_error(str(path), report, len(policy.state_dict()), None)
    return policy, report.lines()


__all__ = [
    "DEFAULT_POLICY",
    "FOREIGN_POLICY",
    "build_policy",
    "known_policies",
    "missing_error",
    "policy_from_checkpoint",
    "policy_registry",
    "recorded_policy",
    "start_policy",
]

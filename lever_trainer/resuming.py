"""``--resume`` with other options: which are applied, which are refused, and whether the
run has anything left to do.

A resumed run keeps the options it started with (``run_config.json``). An option given
with ``--resume`` that differs from the recorded value is

* **applied** when that is sound: more (or fewer, but not fewer than reached) epochs of
  the phase the run is in, any epochs of a phase it has not started (extending a
  finished run, or a GRPO phase it ran with 0 epochs), the options of a phase that has
  not started, and settings that do not change what is computed (``--device``,
  ``--keep-last``, ``--max-bad-steps``, ``--deterministic``, ``--no-cache``,
  ``--cache-dir``);
* **refused** with a line naming the option and why (the data, the policy, the
  plugins, the seed, batch size and optimiser settings, the options of a phase that
  has started, ...).

Nothing is dropped silently; an option given with its recorded value is accepted.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from .errors import LeverError
from .options import DATA_COMMANDS
from .phase import Phase
from .plugins import ALIAS_PREFIX, PluginSet
from .state import TrainConfig, TrainState
from .trainer import remaining_phases

#: Core options a resumed run applies as given: they change where or how fast the run
#: computes, or what it keeps, not what it computes.
APPLIED = {
    "device": "runs on the new device",
    "keep_last": "applies to the checkpoints written from now on",
    "max_bad_steps": "applies from now on",
    "deterministic": "applies from now on",
    "no_cache": "only decides whether the prepared cache is used",
    "cache_dir": "only decides where the prepared cache lives",
    "judge_timeout": "applies to the judge's calls from now on",
    "judge_batch_size": "applies to the judge's calls from now on",
    "judge_concurrency": "applies to the judge's calls from now on",
    "judge_retries": "applies to the judge's calls from now on",
    "judge_max_rps": "applies to the judge's calls from now on",
    "judge_max_calls": "a budget of the resumed process's own",
}
#: Core options a resumed run keeps as recorded, by the reason why.
_FIXED_GROUPS: dict[str, tuple[str, ...]] = {
    "the run's data is fixed (a resumed run reads the same data; its fingerprint is checked)": (
        "beam_data",
        "img_emb",
        "cand_emb",
        "emb_key",
        "max_pool",
        "keep_fallback",
        "require_positive",
        "gen_methods",
        "reward_mode",
        "hard_weight",
        "soft_weight",
        "rel_weight",
        "normalize",
        "val_ratio",
        "val_split",
        "split_seed",
    ),
    "the policy is fixed (its weights and shape are in the snapshot)": (
        "policy",
        "hidden_dim",
        "num_layers",
        "num_heads",
        "dropout",
        "attn_dropout",
        "temperature",
        "sft_ckpt",
        "trust_checkpoint",
        "partial_load",
    ),
    "the run's plugins are fixed": (
        "plugins_on",
        "plugins_off",
    ),
    "it would change how the remaining steps are computed; start a new run from one "
    "of this run's checkpoints (--sft-ckpt) to change it": (
        "seed",
        "batch_size",
        "weight_decay",
        "grad_clip",
    ),
    "the best checkpoint so far was chosen by the run's own --best-metric and --best-mode": (
        "best_metric",
        "best_mode",
        "best_rule",
    ),
    "a resumed run writes into its own directory": ("output_dir",),
    "it would remove the run being resumed": ("overwrite",),
}
FIXED = {dest: reason for reason, dests in _FIXED_GROUPS.items() for dest in dests}
#: The core options that hold file or folder paths: recorded absolute in
#: ``run_config.json``, and equal on ``--resume`` when they name the same file.
PATH_OPTIONS = (
    "beam_data",
    "img_emb",
    "cand_emb",
    "sft_ckpt",
    "output_dir",
    "cache_dir",
    "resume",
)


def path_options(plugins: PluginSet) -> set[str]:
    """The dests whose values are paths: the core ones and the active plugins' options
    of type ``path``."""
    return set(PATH_OPTIONS) | {
        dest for dest, (_, option) in plugins.options().items() if option.type == "path"
    }


@dataclass
class ResumePlan:
    """The options a resumed run uses, what changed, and what is left to run."""

    options: dict[str, Any]
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    extended: bool = False
    complete: str | None = None


def same_value(
    dest: str, old: Any, new: Any, paths: Collection[str] = frozenset(PATH_OPTIONS)
) -> bool:
    """Whether a given value equals the recorded one (``paths``, the dests that hold
    paths: the same file)."""
    if isinstance(old, list | tuple) and isinstance(new, list | tuple):
        # repeatable options (``--plugin``): the same set, whatever the order
        return sorted(map(str, old)) == sorted(map(str, new))
    if dest in paths and isinstance(old, str) and isinstance(new, str):
        return os.path.realpath(old) == os.path.realpath(new)
    if isinstance(old, bool) or isinstance(new, bool):
        return old is new or (old in (None, False) and new in (None, False))
    return bool(old == new)


def phase_plugins(plugins: PluginSet) -> dict[str, str]:
    """``{phase name: plugin}`` of the phases the active plugins contribute."""
    owners: dict[str, str] = {}
    for plugin, answer in plugins.call_all("phases"):
        for phase in answer or ():
            if isinstance(phase, Phase) and phase.name:
                owners.setdefault(phase.name, plugin)
    return owners


def options_state(
    options: Mapping[str, Any], plugins: PluginSet, phases: Sequence[Phase]
) -> TrainState:
    """A :class:`TrainState` with only ``options`` and ``config``: enough for a phase to
    say its epochs before the data is loaded."""
    none = cast(Any, None)
    return TrainState(
        config=TrainConfig(),
        model=none,
        train=none,
        val=none,
        output_dir=Path("."),
        options={**plugins.option_defaults(), **options},
        plugins=plugins,
        phases=list(phases),
    )


def plan_resume(
    recorded: Mapping[str, Any],
    now: Mapping[str, Any],
    given: Mapping[str, str],
    plugins: PluginSet,
    phases: Sequence[Phase],
    snap: Mapping[str, Any],
    run_dir: Path,
) -> ResumePlan:
    """Merge the options given with ``--resume`` into the recorded ones.

    ``recorded``: the run's options (``run_config.json``); ``now``: this command's
    parsed options; ``given``: ``{dest: flag}`` of those set on the command line;
    ``phases``: the run's phases in order; ``snap``: the snapshot. Raises
    :class:`LeverError` for the first option that cannot change, naming it and why.
    """
    options = dict(recorded)
    plan = ResumePlan(options)
    names = [p.name for p in phases]
    if snap["phase"] not in names:
        raise LeverError(
            f"--resume: the snapshot stopped in phase {snap['phase']!r}, which this run does "
            f"not have (its phases: {', '.join(names) or 'none'})"
        )
    at = names.index(snap["phase"]) if snap["phase"] in names else len(names)
    started = set(names[: at + 1])
    epoch_options = {p.epochs_option: p for p in phases if p.epochs_option}
    owners = phase_plugins(plugins)
    plugin_options = plugins.options()
    paths = path_options(plugins)
    if now.get("overwrite") and "overwrite" in given:
        raise LeverError(f"--resume: cannot use {given['overwrite']}: {FIXED['overwrite']}")
    for dest, flag in given.items():
        if dest == "resume" or dest not in now:
            continue
        old, new = recorded.get(dest), now[dest]
        if same_value(dest, old, new, paths):
            continue
        shown = f"{flag} {new}" if not isinstance(new, bool) else flag
        if dest in epoch_options:
            phase = epoch_options[dest]
            _check_epochs(phase, names, at, snap, flag, old, new)
            plan.extended = plan.extended or new > (old or 0)
        elif dest in APPLIED:
            pass
        elif dest in FIXED or dest.startswith(ALIAS_PREFIX):  # a plugin's alias flag
            raise LeverError(
                f"--resume: cannot change {shown}: {FIXED.get(dest, FIXED['plugins_on'])}"
            )
        elif dest in plugin_options:
            plugin, option = plugin_options[dest]
            own_phases = [name for name, owner in owners.items() if owner == plugin]
            if set(option.commands) & (set(DATA_COMMANDS) - {"train"}):
                raise LeverError(
                    f"--resume: cannot change {shown}: {FIXED['beam_data']} (an option of "
                    f"plugin {plugin} that shapes the data)"
                )
            info = next((p for p in plugins.active if p.name == plugin), None)
            if info is not None and info.policies:
                raise LeverError(
                    f"--resume: cannot change {shown}: {FIXED['policy']} (an option of "
                    f"plugin {plugin}, which builds policies)"
                )
            if not own_phases:
                raise LeverError(
                    f"--resume: cannot change {shown}: an option of plugin {plugin}, which "
                    "shapes how the run trains, stays as the run started it"
                )
            begun = [n for n in own_phases if n in started]
            if begun:
                raise LeverError(
                    f"--resume: cannot change {shown}: phase {begun[0]} has started; its "
                    "options stay as the run started it"
                )
        else:
            raise LeverError(f"--resume: cannot change {shown} when resuming a run")
        options[dest] = new
        plan.changed[dest] = (old, new)
        plan.lines.append(f"resume: {flag} {_show(old)} -> {_show(new)}")
    state = options_state(options, plugins, phases)
    stop = snap.get("stop_request")
    if stop is not None and plan.extended:
        who = f"plugin {stop[1]}" if stop[1] else "a plugin"
        plan.lines.append(
            f"resume: the run was stopped early by {who} ({stop[0]}); it continues because "
            "more epochs were given"
        )
    elif stop is not None:
        who = f"plugin {stop[1]}" if stop[1] else "a plugin"
        plan.complete = (
            f"the run in {run_dir} was stopped early by {who} ({stop[0]}); nothing to "
            "resume (give more epochs to continue it anyway)"
        )
        return plan
    try:
        left = remaining_phases(list(phases), state, dict(snap))
    except (AttributeError, TypeError):  # a phase that needs the data to say its epochs
        return plan
    if not left:
        done = ", ".join(f"{p.name} {p.epochs(state)}" for p in phases)
        flags = _epoch_flags(plugins, phases)
        hint = f" {flags[0][1]} N" if flags else ""
        plan.complete = (
            f"the run in {run_dir} is complete (epochs: {done}); nothing to resume "
            f"(to train more: lever-train --resume {run_dir}{hint})"
        )
    return plan


def _epoch_flags(plugins: PluginSet, phases: Sequence[Phase]) -> list[tuple[str, str]]:
    """``(dest, flag)`` of the phases' epoch options, last phase first."""
    options = plugins.options()
    out = []
    for phase in reversed(phases):
        if phase.epochs_option in options:
            out.append((phase.epochs_option, options[phase.epochs_option][1].name))
    return out


def _check_epochs(
    phase: Phase,
    names: list[str],
    at: int,
    snap: Mapping[str, Any],
    flag: str,
    old: Any,
    new: Any,
) -> None:
    """A phase's epochs may change while it has not ended: never below the epoch the
    run has reached in it, and never once the run has moved past it."""
    index = names.index(phase.name)
    if index < at:
        raise LeverError(
            f"--resume: cannot change {flag} {old} -> {new}: phase {phase.name} is over "
            f"(the run went on to phase {snap['phase']})"
        )
    if index == at and new < snap["epoch"]:
        raise LeverError(
            f"--resume: cannot set {flag} {new}: the run has reached epoch {snap['epoch']} "
            f"of phase {phase.name}"
        )


def _show(value: Any) -> str:
    return "unset" if value is None else str(value)


__all__ = ["APPLIED", "FIXED", "ResumePlan", "options_state", "phase_plugins", "plan_resume"]

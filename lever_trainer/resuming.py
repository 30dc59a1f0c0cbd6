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

Nothing is dropped silently; an option given with its recorded value is accepted. Each
core option's rule and reason are its record's ``resume`` and ``resume_reason`` in the
option table (:mod:`lever_trainer.coreoptions`); a plugin's option may declare its own
(``resume="apply"`` or ``"fixed"``), and otherwise follows the rules above.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from .coreoptions import DATA_FIXED, POLICY_FIXED, TRAIN, options_of, path_dests, resume_rules
from .errors import LeverError
from .options import DATA_COMMANDS, Option
from .phase import Phase
from .plugins import ALIAS_PREFIX, PluginSet
from .state import TrainConfig, TrainState
from .trainer import remaining_phases

#: What ``--resume`` does with each core option, from the option table: applied as
#: given (it changes where or how fast the run computes, or what it keeps, not what it
#: computes) or kept as recorded, each with the reason said to the user.
_RULES = resume_rules(TRAIN)
APPLIED = {dest: o.resume_reason for dest, o in _RULES.items() if o.resume == "apply"}
FIXED = {dest: o.resume_reason for dest, o in _RULES.items() if o.resume == "fixed"}
#: The core options that hold file or folder paths: recorded absolute in
#: ``run_config.json``, and equal on ``--resume`` when they name the same file.
PATH_OPTIONS = tuple(sorted(path_dests(options_of(TRAIN))))


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
    at = names.index(snap["phase"])
    rules = _Rules(plugins, phases, set(names[: at + 1]))
    if now.get("overwrite") and "overwrite" in given:
        raise LeverError(f"--resume: cannot use {given['overwrite']}: {FIXED['overwrite']}")
    for dest, flag in given.items():
        if dest == "resume" or dest not in now:
            continue
        old, new = recorded.get(dest), now[dest]
        if same_value(dest, old, new, rules.paths):
            continue
        shown = f"{flag} {new}" if not isinstance(new, bool) else flag
        if dest in rules.epoch_options:
            _check_epochs(rules.epoch_options[dest], names, at, snap, flag, old, new)
            plan.extended = plan.extended or new > (old or 0)
        else:
            rules.check(dest, shown)
        options[dest] = new
        plan.changed[dest] = (old, new)
        plan.lines.append(f"resume: {flag} {_show(old)} -> {_show(new)}")
    _finish(plan, plugins, phases, snap, run_dir)
    return plan


class _Rules:
    """Whether a changed option other than a phase's epochs may change on ``--resume``."""

    def __init__(self, plugins: PluginSet, phases: Sequence[Phase], started: set[str]) -> None:
        self.plugins, self.started = plugins, started
        self.epoch_options = {p.epochs_option: p for p in phases if p.epochs_option}
        self.owners = phase_plugins(plugins)
        self.plugin_options = plugins.options()
        self.paths = path_options(plugins)

    def check(self, dest: str, shown: str) -> None:
        """Raise a :class:`LeverError` naming ``shown`` and why, when ``dest`` may not change."""
        if dest in APPLIED:
            return
        if dest in FIXED or dest.startswith(ALIAS_PREFIX):  # a plugin's alias flag
            reason = FIXED.get(dest, FIXED["plugins_on"])
            why = f": {reason}" if reason else " when resuming a run"
            raise LeverError(f"--resume: cannot change {shown}{why}")
        if dest not in self.plugin_options:
            raise LeverError(f"--resume: cannot change {shown} when resuming a run")
        plugin, option = self.plugin_options[dest]
        problem = self.plugin_rule(plugin, option)
        if problem is not None:
            raise LeverError(f"--resume: cannot change {shown}: {problem}")

    def plugin_rule(self, plugin: str, option: Option) -> str | None:
        """Why a plugin's option may not change (None when it may)."""
        info = next((p for p in self.plugins.active if p.name == plugin), None)
        own_phases = [name for name, owner in self.owners.items() if owner == plugin]
        builds = info is not None and bool(info.policies)
        return plugin_option_rule(plugin, option, builds, own_phases, self.started)


def plugin_option_rule(
    plugin: str,
    option: Option,
    builds_policies: bool,
    own_phases: Sequence[str],
    started: Collection[str],
) -> str | None:
    """Why ``--resume`` refuses a new value of ``plugin``'s ``option`` (None: applied).

    The option's own ``resume`` rule first; else options that shape the data or the
    policy never change, and a phase's change until that phase (``own_phases``, the
    plugin's) has started; a plugin with no phase shapes how the run trains: kept."""
    if option.resume == "apply":
        return None
    if option.resume == "fixed":
        return option.resume_reason or "it stays as the run started it"
    if set(option.commands) & (set(DATA_COMMANDS) - {"train"}):
        return f"{DATA_FIXED} (an option of plugin {plugin} that shapes the data)"
    if builds_policies:
        return f"{POLICY_FIXED} (an option of plugin {plugin}, which builds policies)"
    if not own_phases:
        return (
            f"an option of plugin {plugin}, which shapes how the run trains, stays as "
            "the run started it"
        )
    begun = [n for n in own_phases if n in started]
    if begun:
        return f"phase {begun[0]} has started; its options stay as the run started it"
    return None


def _finish(
    plan: ResumePlan,
    plugins: PluginSet,
    phases: Sequence[Phase],
    snap: Mapping[str, Any],
    run_dir: Path,
) -> None:
    """Whether the resumed run has anything left to do (``plan.complete`` says when not)."""
    options = plan.options
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
        return
    try:
        left = remaining_phases(list(phases), state, dict(snap))
    except (AttributeError, TypeError):  # a phase that needs the data to say its epochs
        return
    if not left:
        done = ", ".join(f"{p.name} {p.epochs(state)}" for p in phases)
        flags = _epoch_flags(plugins, phases)
        hint = f" {flags[0][1]} N" if flags else ""
        plan.complete = (
            f"the run in {run_dir} is complete (epochs: {done}); nothing to resume "
            f"(to train more: lever-train --resume {run_dir}{hint})"
        )


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


__all__ = [
    "APPLIED",
    "FIXED",
    "ResumePlan",
    "options_state",
    "phase_plugins",
    "plan_resume",
    "plugin_option_rule",
]

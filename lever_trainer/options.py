"""Options that plugins add to ``lever-train train`` (the ``add_options`` hook).

A plugin returns a list of :class:`Option`; the command line shows them in
``lever-train train --help`` under the plugin's name and in ``lever-train plugins``.
Every value (default or given) reaches the plugins in ``state.options`` under the
option's ``dest``, and is recorded in ``run_config.json`` and in each checkpoint's
metadata. A plugin keeps its options as module-level constants and reads a value with
:meth:`Option.of` (``RANK_EPOCHS.of(state.options)``); looking it up by its ``dest``
string (``state.options["rank_epochs"]``) still works. This module does not import
torch or click, so declaring options stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Value types an option may take.
OPTION_TYPES = ("int", "float", "str", "bool", "choice", "path")
#: What ``--resume`` may do with an option (see :attr:`Option.resume`).
RESUME_RULES = ("", "apply", "fixed")
#: ``commands`` of an option that decides how RL data is read and scored.
DATA_COMMANDS = ("train", "prepare", "select", "evaluate")


#: ``Option.of``'s ``missing`` when not given: the option's declared default.
_DECLARED: Any = object()


@dataclass(frozen=True)
class Option:
    """One command-line option contributed by a plugin.

    ``flags``: the spellings, long form first (``("--mmr-reduction", "--mmr_reduction")``;
    a one-letter short form such as ``-o`` may follow);
    ``dest``: the key in ``state.options`` (default: the first flag without dashes,
    ``-`` -> ``_``); ``type``: one of ``int``, ``float``, ``str``, ``bool`` (an on/off
    flag, default False), ``choice`` (one of ``choices``) or ``path`` (a file or folder:
    relative to the config file when set in one, recorded absolute); ``min``/``max`` bound
    numbers (``min_open``/``max_open`` exclude the bound); ``multiple`` makes it
    repeatable (the value is a tuple). ``help`` is shown in ``--help``. ``commands``
    lists the ``lever-train`` commands that take it (default: ``train``).
    ``extra["removed"]`` (a hint such as ``"use --kl-beta"``) marks an option the plugin
    no longer takes: hidden from ``--help``, and setting it on the command line, in the
    environment or in a config file stops the run with ``FLAG was removed: HINT``.
    """

    flags: tuple[str, ...]
    type: str = "str"
    default: Any = None
    help: str = ""
    dest: str = ""
    choices: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False
    multiple: bool = False
    metavar: str | None = None
    #: The commands that take it: ``train`` only, unless it shapes how data is read and
    #: scored (reward settings), which ``prepare``, ``select`` and ``evaluate`` need too.
    commands: tuple[str, ...] = ("train",)
    extra: dict[str, Any] = field(default_factory=dict)
    #: The section of ``--help`` and of the options reference that lists it (plugin
    #: options: ``Plugin NAME``, filled in by the command line).
    group: str = ""
    #: What ``--resume`` does with a new value: ``apply`` (it changes where or how the
    #: run computes, not what), ``fixed`` (refused, saying ``resume_reason``), or ``""``
    #: (a plugin's option: applied while none of the plugin's phases has started).
    resume: str = ""
    #: Why ``--resume`` applies or refuses it, in words.
    resume_reason: str = ""
    #: For ``path`` options: ``file`` or ``dir`` when only one of them is accepted.
    path_kind: str = ""
    #: Recorded in ``run_config.json`` (``--print-config``, which only prints, is not).
    recorded: bool = True
    #: The command refuses to run without it.
    required: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.flags, str):
            object.__setattr__(self, "flags", (self.flags,))
        if not self.flags or not self.flags[0].startswith("--"):
            raise ValueError(f"option flags must start with '--': {self.flags!r}")
        if not all(f.startswith("-") for f in self.flags):
            raise ValueError(
                f"option flags must start with '-' (a short one: '-o'): {self.flags!r}"
            )
        if self.type not in OPTION_TYPES:
            raise ValueError(f"option {self.flags[0]}: type must be one of {OPTION_TYPES}")
        if self.type == "choice" and not self.choices:
            raise ValueError(f"option {self.flags[0]}: a choice option needs choices")
        if not self.dest:
            object.__setattr__(self, "dest", self.flags[0].lstrip("-").replace("-", "_"))
        if self.resume not in RESUME_RULES:
            raise ValueError(f"option {self.flags[0]}: resume must be one of {RESUME_RULES}")
        if self.path_kind not in ("", "file", "dir"):
            raise ValueError(f"option {self.flags[0]}: path_kind must be file or dir")

    @property
    def name(self) -> str:
        """The main spelling, e.g. ``--mmr-reduction``."""
        return self.flags[0]

    def of(self, options: Mapping[str, Any], missing: Any = _DECLARED) -> Any:
        """This option's value in a run's option mapping (``state.options``, or the
        mapping an environment's ``configure`` receives).

        A run's mapping holds every declared option (the value given, or the default),
        so this is the value the run uses. A mapping that lacks the option's ``dest`` (a
        partial mapping built by hand, such as in a test) gives ``missing``, which is the
        declared :attr:`default` unless given: the options recorded in a checkpoint
        written before the option existed pass the value that reproduces that
        checkpoint (``CANDIDATE_TERM.of(options, missing="off")``). A value present but
        ``None`` is returned as ``None``: it is not replaced by either.
        """
        if self.dest in options:
            return options[self.dest]
        return self.default if missing is _DECLARED else missing


def check_value(option: Option, value: Any) -> str | None:
    """Why ``value`` is not acceptable for ``option`` (None when it is)."""
    if value is None or option.multiple:
        return None
    if option.type == "choice":
        return None if value in option.choices else f"expected one of {', '.join(option.choices)}"
    if option.type in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"expected a number, got {value!r}"
        if value != value:  # NaN
            return "expected a number, got nan"
        if option.min is not None and (
            value < option.min or (option.min_open and value == option.min)
        ):
            return f"expected a value {'>' if option.min_open else '>='} {option.min}"
        if option.max is not None and (
            value > option.max or (option.max_open and value == option.max)
        ):
            return f"expected a value {'<' if option.max_open else '<='} {option.max}"
    return None


def flatten(options: Sequence[Option]) -> dict[str, Option]:
    """``{dest: option}``."""
    return {o.dest: o for o in options}


__all__ = ["DATA_COMMANDS", "OPTION_TYPES", "RESUME_RULES", "Option", "check_value", "flatten"]

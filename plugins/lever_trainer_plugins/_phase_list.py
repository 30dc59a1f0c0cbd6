"""A plugin option naming phases: ``all`` or a comma-separated list of phase names."""

from __future__ import annotations

from lever_trainer.api import LeverError, Option, TrainState


def phase_set(state: TrainState, option: Option) -> frozenset[str] | None:
    """The phases ``option`` names in this run (None for ``all``); an unknown name is a
    user error naming the option's flag and the run's phases."""
    flag = option.name
    value = str(option.of(state.options) or "all").strip()
    if value == "all":
        return None
    names = frozenset(n.strip() for n in value.split(",") if n.strip())
    known = {p.name for p in state.phases}
    unknown = sorted(names - known)
    if unknown or not names:
        raise LeverError(
            f"{flag} {value!r}: expected 'all' or phase names separated by commas "
            f"(this run's phases: {', '.join(sorted(known)) or 'none'})"
        )
    return names

"""A plugin option naming phases: ``all`` or a comma-separated list of phase names."""

from __future__ import annotations

from lever_trainer.api import LeverError, TrainState


def phase_set(state: TrainState, dest: str, flag: str) -> frozenset[str] | None:
    """The phases ``state.options[dest]`` names (None for ``all``); an unknown name is a
    user error naming ``flag`` and the run's phases."""
    value = str(state.options.get(dest) or "all").strip()
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

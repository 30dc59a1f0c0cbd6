"""The installed plugins' entry points, with their distributions, read without importing
any plugin (plugin discovery and the shell-completion cache both start here)."""

from __future__ import annotations

import importlib.metadata as md
import os
from dataclasses import dataclass

#: The entry-point group under which packages register lever_trainer plugins.
ENTRY_POINT_GROUP = "lever_trainer"
#: Set (to anything but 0) to discover no installed plugin at all.
DISABLE_AUTOLOAD_ENV = "LEVER_TRAINER_DISABLE_PLUGIN_AUTOLOAD"


@dataclass(frozen=True)
class Installed:
    """One entry point and the distribution that declares it (None when unknown)."""

    entry_point: md.EntryPoint
    distribution: str | None
    version: str | None


def autoload_disabled() -> bool:
    """True when ``LEVER_TRAINER_DISABLE_PLUGIN_AUTOLOAD`` turns discovery off."""
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip() not in ("", "0")


def installed() -> list[Installed]:
    """Every entry point of the group, in the order ``importlib.metadata`` gives them."""
    # A distribution's name and version parse its METADATA file anew on every read, and
    # one distribution (this project's) declares dozens of plugins: read each once.
    about: dict[int, tuple[str | None, str | None]] = {}
    found = []
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        if dist is None:
            name, version = None, None
        else:
            if id(dist) not in about:
                meta = dist.metadata
                about[id(dist)] = (meta["Name"], meta["Version"])
            name, version = about[id(dist)]
        found.append(Installed(ep, name, version))
    return found

"""What shell completion knows of plugin options, without importing any plugin.

Plugins declare their options in code (the ``add_options`` hook), and importing a
plugin imports torch, which takes seconds: too slow for a key press. So every command
that discovers the plugins (``lever-train plugins``, ``train``, ``train --help``, ...)
also writes their options to a small cache, ``$XDG_CACHE_HOME/lever-trainer/
plugin-options.json`` (``~/.cache`` by default), and completion reads it. The cache is
keyed on the installed entry points (names, distributions, versions and the
modification times of the plugins' source files), so installing, removing or editing a
plugin makes it stale; a stale or missing cache completes the core options only, until the
next command refreshes it.

The commands read the cache too: when it matches the installed plugins, ``lever-train
train`` builds its plugin flags from it, so a mistyped option value, an unknown plugin
or a missing file is reported before any plugin (or torch) is imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import entrypoints
from .options import Option

CACHE_FILE = "plugin-options.json"


@dataclass(frozen=True)
class Declared:
    """What one installed plugin adds to the command line: its options and the alias
    flags that mean ``--plugin NAME`` / ``--no-plugin NAME``."""

    plugin: str
    options: tuple[Option, ...]
    enable_flags: tuple[str, ...] = ()
    disable_flags: tuple[str, ...] = ()
    #: Why naming this plugin with ``--plugin`` is refused (it is broken); None if not.
    refusal: str | None = None
    #: What the plugin chooses (two plugins asked for by name that choose the same
    #: thing are refused).
    chooses: str = ""

    @property
    def name(self) -> str:
        """The plugin's name (as ``PluginInfo.name``)."""
        return self.plugin


def cache_path() -> Path:
    """``$XDG_CACHE_HOME/lever-trainer/plugin-options.json`` (``~/.cache`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lever-trainer" / CACHE_FILE


def fingerprint() -> str:
    """A digest of the installed plugins: entry points, distributions, versions and the
    newest modification time among each plugin's source files (its module, and the other
    modules of its package, which it may take options from), found without importing
    it; and this core's version and option module, which the cached records follow."""
    if entrypoints.autoload_disabled():
        return "autoload-disabled"
    from . import __version__

    stamps: dict[str, str] = {}
    parts = [f"lever_trainer {__version__} {_stamp(Path(__file__).with_name('options.py'))}"]
    for item in sorted(
        entrypoints.installed(), key=lambda i: (i.entry_point.name, i.entry_point.value)
    ):
        ep = item.entry_point
        name, version = item.distribution or "", item.version or ""
        parts.append(f"{ep.name}={ep.value} {name} {version} {_source_stamp(ep.module, stamps)}")
    # the same distribution seen twice on sys.path (run from its source folder, say)
    # is one plugin, as discovery counts it
    return hashlib.sha256("\n".join(sorted(set(parts))).encode()).hexdigest()


def _stamp(path: Path) -> str:
    try:
        return str(os.stat(path).st_mtime_ns)
    except OSError:
        return "?"


def _source_stamp(module: str, seen: dict[str, str]) -> str:
    """The newest modification time of ``module``'s file, or of every ``.py`` file of the
    package it belongs to (``seen`` caches each folder)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return "?"
    if spec is None or not spec.origin:
        return "?"
    origin = Path(spec.origin)
    if "." not in module and origin.name != "__init__.py":
        return _stamp(origin)  # a single-module distribution: its folder is site-packages
    folder = str(origin.parent)
    if folder not in seen:
        try:
            times = [e.stat().st_mtime_ns for e in os.scandir(folder) if e.name.endswith(".py")]
        except OSError:
            times = []
        seen[folder] = str(max(times)) if times else "?"
    return seen[folder]


def _refusal(info: Any) -> str | None:
    """The error that activating the plugin ``info`` (``PluginInfo``) by name gives."""
    from .errors import LeverError
    from .plugins import select_active

    try:
        select_active([info], [info.name], [])
    except LeverError as exc:
        return str(exc)
    return None


def declared(plugins: Sequence[Any]) -> list[Declared]:
    """The :class:`Declared` of each plugin (``PluginInfo``) that adds flags, and of each
    broken one (with the error naming it gives)."""
    out = []
    for p in plugins:
        if p.broken:
            out.append(Declared(p.name, (), refusal=_refusal(p) or p.error))
        elif p.options or p.enable_flags or p.disable_flags or p.chooses:
            out.append(
                Declared(
                    p.name,
                    tuple(p.options),
                    tuple(p.enable_flags),
                    tuple(p.disable_flags),
                    chooses=p.chooses,
                )
            )
    return out


def save(plugins: Sequence[Any]) -> None:
    """Record what the discovered ``plugins`` (``PluginInfo``) add; best effort."""
    entries = [
        {
            "plugin": d.plugin,
            "options": [asdict(o) for o in d.options],
            "enable_flags": list(d.enable_flags),
            "disable_flags": list(d.disable_flags),
            "refusal": d.refusal,
            "chooses": d.chooses,
        }
        for d in declared(plugins)
    ]
    path = cache_path()
    try:
        record = {"fingerprint": fingerprint(), "plugins": entries}
        text = json.dumps(record, default=list)
        if path.is_file() and path.read_text() == text:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    except (OSError, TypeError, ValueError):
        pass  # completion then knows the core options only


def load() -> list[Declared] | None:
    """What the installed plugins add, from a cache that matches them; None when the
    cache is missing, unreadable or stale."""
    try:
        record = json.loads(cache_path().read_text())
        if record.get("fingerprint") != fingerprint():
            return None
        out = []
        for entry in record["plugins"]:
            options = []
            for fields in entry["options"]:
                for key in ("flags", "choices", "commands"):
                    fields[key] = tuple(fields[key])
                options.append(Option(**fields))
            out.append(
                Declared(
                    str(entry["plugin"]),
                    tuple(options),
                    tuple(entry.get("enable_flags") or ()),
                    tuple(entry.get("disable_flags") or ()),
                    entry.get("refusal"),
                    str(entry.get("chooses") or ""),
                )
            )
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


__all__ = ["Declared", "cache_path", "declared", "fingerprint", "load", "save"]

"""What shell completion knows of plugin options, without importing any plugin.

Plugins declare their options in code (the ``add_options`` hook), and importing a
plugin imports torch, which takes seconds: too slow for a key press. So every command
that discovers the plugins (``lever-train plugins``, ``train``, ``train --help``, ...)
also writes their options to a small cache, ``$XDG_CACHE_HOME/lever-trainer/
plugin-options.json`` (``~/.cache`` by default), and completion reads it. The cache is
keyed on the installed entry points (names, distributions, versions and the
modification times of the plugin modules), so installing, removing or editing a plugin
makes it stale; a stale or missing cache completes the core options only, until the
next command refreshes it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import entrypoints
from .options import Option

CACHE_FILE = "plugin-options.json"


def cache_path() -> Path:
    """``$XDG_CACHE_HOME/lever-trainer/plugin-options.json`` (``~/.cache`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lever-trainer" / CACHE_FILE


def fingerprint() -> str:
    """A digest of the installed plugins: entry points, distributions, versions and the
    modification time of each plugin's module file (found without importing it)."""
    if entrypoints.autoload_disabled():
        return "autoload-disabled"
    parts = []
    for item in sorted(
        entrypoints.installed(), key=lambda i: (i.entry_point.name, i.entry_point.value)
    ):
        ep = item.entry_point
        name, version = item.distribution or "", item.version or ""
        parts.append(f"{ep.name}={ep.value} {name} {version} {_mtime(ep.module)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _mtime(module: str) -> str:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return "?"
    if spec is None or not spec.origin:
        return "?"
    try:
        return str(os.stat(spec.origin).st_mtime_ns)
    except OSError:
        return "?"


def save(plugins: Sequence[Any]) -> None:
    """Record the options of the discovered ``plugins`` (``PluginInfo``); best effort."""
    entries = [
        {"plugin": p.name, "options": [asdict(o) for o in p.options]}
        for p in plugins
        if not p.broken and p.options
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


def load() -> list[tuple[str, list[Option]]]:
    """``(plugin, options)`` from a cache that matches the installed plugins, else []."""
    try:
        record = json.loads(cache_path().read_text())
        if record.get("fingerprint") != fingerprint():
            return []
        out = []
        for entry in record["plugins"]:
            options = []
            for fields in entry["options"]:
                for key in ("flags", "choices", "commands"):
                    fields[key] = tuple(fields[key])
                options.append(Option(**fields))
            out.append((str(entry["plugin"]), options))
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


__all__ = ["cache_path", "fingerprint", "load", "save"]

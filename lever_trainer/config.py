"""Configuration files and presets: option values read from TOML or JSON.

A config file maps option names to values. A name is an option's ``dest``
(``rce_lr``) or any of its flag spellings without the dashes (``rce-lr``); tables only
group keys (``[rce] rce-lr = 1e-3``), and inside a table ``[rce]`` a key ``lr`` also
means ``rce_lr``. A relative path in a config file is relative to the file. A run's
``run_config.json`` is a config too: its ``options`` block is read, less the keys
that belong to one run (its output directory, ``--resume``, ``--overwrite``).

Presets are config files shipped in ``lever_trainer/presets/NAME.toml``.

This module knows nothing of click or torch: the command line hands it the names it
accepts (:class:`OptionNames`) and applies what it returns.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import LeverError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: Keys of a run's options that describe that one run, not how to train: a run_config
#: read as a config leaves them out (give them on the command line).
RUN_ONLY_KEYS = frozenset({"output_dir", "resume", "overwrite", "config", "preset", "print_config"})
#: Keys a config file may not set (they would load another config).
FORBIDDEN_KEYS = frozenset({"config", "print_config"})


@dataclass(frozen=True)
class OptionNames:
    """The names a config may use: ``{spelling: dest}`` and which dests hold paths."""

    spellings: Mapping[str, str]
    paths: frozenset[str] = frozenset()
    multiple: frozenset[str] = frozenset()

    def resolve(self, key: str) -> str | None:
        """The dest that ``key`` names (``rce-lr``, ``--rce-lr``, ``rce_lr``), or None."""
        return self.spellings.get(key.lstrip("-"))

    def nearest(self, key: str) -> str | None:
        """The valid name closest to ``key``, for an error message."""
        near = difflib.get_close_matches(key.lstrip("-"), list(self.spellings), n=1, cutoff=0.5)
        return near[0] if near else None


@dataclass
class ConfigLayer:
    """Option values from one file: ``values`` by dest, and the dests that count as set
    by the user (``given``; a run_config's recorded defaults do not)."""

    source: str
    path: Path | None
    values: dict[str, Any] = field(default_factory=dict)
    given: set[str] = field(default_factory=set)
    preset: str | None = None
    keys: dict[str, str] = field(default_factory=dict)  # dest -> the key as written
    warnings: list[str] = field(default_factory=list)


def read_file(path: Path) -> dict[str, Any]:
    """The mapping in a TOML (``.toml``) or JSON (``.json``, or anything else) file."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise LeverError(f"--config: {path} does not exist") from None
    except IsADirectoryError:
        raise LeverError(f"--config: {path} is a directory, expected a TOML or JSON file") from None
    except OSError as exc:
        raise LeverError(f"--config: cannot read {path} ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise LeverError(f"{path}: not a UTF-8 text file (expected TOML or JSON)") from None
    if path.suffix.lower() == ".toml":
        try:
            data: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise LeverError(f"{path}: invalid TOML ({exc})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            hint = " (name a TOML file *.toml)" if path.suffix.lower() != ".json" else ""
            raise LeverError(
                f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}{hint}"
            ) from None
    if not isinstance(data, dict):
        raise LeverError(f"{path}: expected a table of option names, got {type(data).__name__}")
    return data


def is_run_config(data: Mapping[str, Any]) -> bool:
    """Whether ``data`` is a run's ``run_config.json`` (it has an ``options`` block)."""
    return isinstance(data.get("options"), dict) and (
        "lever_trainer_version" in data or "train_config" in data
    )


def _flatten(data: Mapping[str, Any], names: OptionNames, where: str) -> list[tuple[str, str, Any]]:
    """``(written key, dest, value)`` of every key; a table's keys may drop its prefix."""
    out: list[tuple[str, str, Any]] = []
    for key, value in data.items():
        dest = names.resolve(key)
        if dest is None and isinstance(value, dict):
            for inner, inner_value in value.items():
                written = f"{key}.{inner}"
                inner_dest = names.resolve(inner) or names.resolve(
                    f"{key}_{inner}".replace("-", "_")
                )
                if inner_dest is None:
                    raise _unknown(written, inner, names, where)
                out.append((written, inner_dest, inner_value))
            continue
        if dest is None:
            if key in ("preset",):
                out.append((key, "preset", value))
                continue
            raise _unknown(key, key, names, where)
        out.append((key, dest, value))
    return out


def _unknown(written: str, key: str, names: OptionNames, where: str) -> LeverError:
    near = names.nearest(key)
    hint = f" (did you mean {near!r}?)" if near else ""
    return LeverError(f"{where}: unknown option {written!r}{hint}")


def _plain(value: Any, written: str, dest: str, names: OptionNames, where: str) -> Any:
    """A value as the option takes it: scalars; lists for repeatable options."""
    if isinstance(value, float) and not math.isfinite(value):
        raise LeverError(f"{where}: {written}: {value!r} is not a finite number")
    if dest in names.multiple:
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str | int | float) for v in items):
            raise LeverError(f"{where}: {written}: expected a list of names, got {value!r}")
        return [str(v) for v in items]
    if isinstance(value, dict | list):
        raise LeverError(
            f"{where}: {written}: expected a single value, got a {type(value).__name__}"
        )
    return value


def layer_from_data(
    data: Mapping[str, Any],
    names: OptionNames,
    source: str,
    path: Path | None,
    base_dir: Path | None,
) -> ConfigLayer:
    """Check and convert one config mapping; ``base_dir`` anchors relative paths."""
    where = str(path) if path is not None else source
    layer = ConfigLayer(source=source, path=path)
    run_config = is_run_config(data)
    if run_config:
        options = {k: v for k, v in data["options"].items() if k not in RUN_ONLY_KEYS}
        given = data.get("given")
        recorded_given: dict[str, Any] = given if isinstance(given, dict) else {}
        for key, value in options.items():
            dest = names.resolve(key)
            if dest is None:
                layer.warnings.append(
                    f"warning: {where}: option {key!r} is unknown to this installation "
                    "(a plugin that is not installed?); ignored"
                )
                continue
            if value is None:
                continue  # "unset": leave the option at its default
            layer.values[dest] = _plain(value, key, dest, names, where)
            layer.keys[dest] = key
            if key in recorded_given:
                layer.given.add(dest)
    else:
        for written, dest, value in _flatten(data, names, where):
            if dest == "preset":
                if not isinstance(value, str):
                    raise LeverError(f"{where}: preset: expected a preset name, got {value!r}")
                layer.preset = value
                continue
            if dest in FORBIDDEN_KEYS:
                raise LeverError(f"{where}: {written}: a config file cannot set {written!r}")
            if dest in layer.values:
                raise LeverError(
                    f"{where}: {written!r} sets option {dest!r}, which "
                    f"{layer.keys[dest]!r} already set"
                )
            layer.values[dest] = _plain(value, written, dest, names, where)
            layer.keys[dest] = written
            layer.given.add(dest)
    if base_dir is not None:
        for dest in names.paths & set(layer.values):
            value = layer.values[dest]
            if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                layer.values[dest] = os.path.normpath(base_dir / value)
            elif isinstance(value, str):
                layer.values[dest] = str(Path(value).expanduser())
    return layer


def load_config(path: Path, names: OptionNames) -> ConfigLayer:
    """The layer of ``--config PATH``; relative paths in it are relative to its folder."""
    data = read_file(path)
    return layer_from_data(data, names, f"--config {path}", path, path.resolve().parent)


# ------------------------------------------------------------------ presets
def preset_names() -> list[str]:
    """Names of the presets shipped with lever_trainer."""
    folder = resources.files("lever_trainer") / "presets"
    return sorted(
        Path(p.name).stem for p in folder.iterdir() if p.name.endswith(".toml") and p.is_file()
    )


def preset_text(name: str) -> str:
    """The TOML text of preset ``name``; an unknown name is an error listing the known."""
    known = preset_names()
    if name not in known:
        near = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise LeverError(
            f"--preset: unknown preset {name!r}{hint}; presets: {', '.join(known) or 'none'}"
        )
    return (resources.files("lever_trainer") / "presets" / f"{name}.toml").read_text("utf-8")


def load_preset(name: str, names: OptionNames) -> ConfigLayer:
    """The layer of ``--preset NAME`` (its values do not count as given by the user)."""
    text = preset_text(name)
    data = tomllib.loads(text)
    layer = layer_from_data(data, names, f"--preset {name}", None, None)
    if layer.preset is not None:
        raise LeverError(f"preset {name}: a preset cannot name another preset")
    layer.given = set()
    return layer


# ------------------------------------------------------------------ merging
def merge_lists(
    layers: Iterable[tuple[list[str] | None, list[str] | None]],
) -> tuple[list[str], list[str]]:
    """``(on, off)`` plugin lists from layers, lowest precedence first: a later layer's
    ``plugin X`` cancels an earlier ``no-plugin X`` and the other way round."""
    on: list[str] = []
    off: list[str] = []
    for layer_on, layer_off in layers:
        for name in layer_on or ():
            if name in off:
                off.remove(name)
            if name not in on:
                on.append(name)
        for name in layer_off or ():
            if name in on:
                on.remove(name)
            if name not in off:
                off.append(name)
    return on, off


# ------------------------------------------------------------------ writing TOML
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # a TOML basic string


def to_toml(rows: Iterable[tuple[str, Any, str]]) -> str:
    """TOML lines ``key = value  # comment``; a None value becomes a comment line."""
    lines = []
    for key, value, comment in rows:
        tail = f"  # {comment}" if comment else ""
        if value is None:
            lines.append(f"# {key} = (unset){tail}")
        else:
            lines.append(f"{key} = {_toml_value(value)}{tail}")
    return "\n".join(lines) + "\n"


__all__ = [
    "FORBIDDEN_KEYS",
    "RUN_ONLY_KEYS",
    "ConfigLayer",
    "OptionNames",
    "is_run_config",
    "layer_from_data",
    "load_config",
    "load_preset",
    "merge_lists",
    "preset_names",
    "preset_text",
    "read_file",
    "to_toml",
]

"""Writing files so that a reader never sees half of one, with the permissions a plain
``open()`` would give, and JSON text that other tools can read."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import LeverError


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows.

    Linux reports it in ``/proc/self/status``; elsewhere it is read by setting and
    restoring it (``os.umask`` has no read-only form).
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same dir, fsync, rename).

    The file gets the mode a plain ``open(path, "w")`` would give it (``0o666`` less the
    umask), not the ``0o600`` of a temporary file, so colleagues sharing the machine can
    read checkpoints, selections and prepared caches when the umask lets them.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~current_umask())
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_output(path: str | os.PathLike[str], data: bytes, flag: str) -> None:
    """:func:`atomic_write_bytes` for a file the user named with ``flag``: a failure is a
    :class:`LeverError` (``--output: cannot write PATH (reason)``), ``path`` shown as given."""
    try:
        atomic_write_bytes(Path(path), data)
    except OSError as exc:
        raise LeverError(f"{flag}: cannot write {path} ({exc.strerror or exc})") from None


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, so that it is valid JSON.

    ``json.dumps`` writes NaN and Infinity as bare ``NaN``/``Infinity``, which is not
    JSON: other tools (``jq``, JavaScript, pandas' strict readers) refuse such a line.
    A metric that is not a number is written as ``null``.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def json_line(value: Any) -> str:
    """One line of strict JSON (keys sorted; non-finite floats as ``null``)."""
    return json.dumps(json_safe(value), sort_keys=True, allow_nan=False)

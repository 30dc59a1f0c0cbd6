"""A run's output directory: which files are a run's, whether the directory is taken,
and the lock that keeps two runs from writing into it at once.

A directory that holds any file a run writes (its configuration, snapshot, metrics,
checkpoints) belongs to that run: a new run is refused there unless ``--overwrite``,
which removes exactly those files (never anything else) before the new run writes.
While a run is alive it holds an exclusive lock on ``OUTPUT_DIR/.lock`` (``flock``),
with its process id, host and start time written inside; a second run is refused with
a line naming that holder. The kernel releases the lock when its process dies, so a
killed run never blocks the next one.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from .errors import LeverError

try:  # POSIX; elsewhere runs go unlocked (see RunLock)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

#: ``os.open`` flag that refuses to follow a symbolic link (0 where there is none).
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
#: The lock file inside an output directory.
LOCK_NAME = ".lock"
#: Files a run writes under fixed names: run config, resume snapshot, the metrics logs
#: (epochs, steps) and the best checkpoint. Keep in step with the modules that write
#: them (``run.RUN_CONFIG``, ``snapshot.SNAPSHOT_NAME``, ``retention.BEST_NAME``, the
#: ``metrics-jsonl`` plugin; a test checks the constants).
RUN_FILE_NAMES = frozenset(
    {"run_config.json", "resume.pt", "metrics.jsonl", "steps.jsonl", "best.safetensors"}
)
#: Epoch (or step) checkpoints: ``{phase}_epoch{n}.safetensors``, ``{phase}_step{n}...``.
CHECKPOINT_PATTERN = re.compile(r"^[\w.-]+_(epoch|step)\d+\.safetensors$")
#: What an atomic write leaves behind when its process is killed before the rename.
TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.[^.]+\.tmp$")


def is_run_file(name: str) -> bool:
    """Whether a file called ``name`` is one a run writes into its output directory."""
    return name in RUN_FILE_NAMES or CHECKPOINT_PATTERN.match(name) is not None


def run_files(path: Path, temporary: bool = False) -> list[Path]:
    """The run files in ``path`` (sorted); with ``temporary``, also the temporary files
    that a killed run's unfinished writes left behind."""
    if not path.is_dir():
        return []
    found = []
    for entry in path.iterdir():
        if not entry.is_file() or entry.is_symlink():
            continue
        if is_run_file(entry.name):
            found.append(entry)
        elif temporary and (m := TEMP_PATTERN.match(entry.name)) and is_run_file(m["name"]):
            found.append(entry)
    return sorted(found)


def describe_files(files: list[Path], limit: int = 3) -> str:
    """``a, b, c ...`` for a message."""
    names = [f.name for f in files]
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def _nearest_ancestor(start: Path, path: Path, flag: str) -> tuple[Path, bool]:
    """The nearest existing folder at or above ``start`` (where ``path`` would be
    created) and whether it can be written into; an existing ancestor that is not a
    folder is a :class:`LeverError` for ``flag``."""
    ancestor = start
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise LeverError(f"{flag}: cannot create {path}: {ancestor} is not a directory")
    return ancestor, os.access(ancestor, os.W_OK | os.X_OK)


def check_output_dir(path: Path, overwrite: bool, resume: bool = False) -> None:
    """Refuse, before anything is written, an output directory that cannot be created or
    written, that another run holds (its lock), or that holds a run's files (unless
    ``overwrite``, or ``resume``: a resumed run continues its own directory)."""
    ancestor, writable = _nearest_ancestor(path, path, "--output-dir")
    if not writable:
        raise LeverError(f"--output-dir: cannot write into {ancestor} (permission denied)")
    if path.exists() and not path.is_dir():
        raise LeverError(f"--output-dir: {path} exists and is not a directory")
    holder = lock_holder(path)
    if holder is not None:
        raise busy_error(path, holder)
    if resume or overwrite:
        return
    existing = run_files(path)
    if existing:
        raise occupied_error(path, existing)


def occupied_error(path: Path, existing: list[Path]) -> LeverError:
    """The error for a directory that holds another run's files."""
    return LeverError(
        f"--output-dir: {path} already holds a run's files ({describe_files(existing)}); "
        "pass --overwrite to remove them and start over, --resume "
        f"{path} to continue that run, or choose another directory"
    )


def clear_previous_run(path: Path) -> list[Path]:
    """Remove the files a previous run wrote in ``path`` (``--overwrite``); returns them.

    Only run files (and the temporary files of a killed run's writes) go; anything else
    in the directory stays.
    """
    removed = []
    for file in run_files(path, temporary=True):
        try:
            file.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise LeverError(f"--overwrite: cannot remove {file} ({exc.strerror or exc})") from None
        removed.append(file)
    return removed


# ------------------------------------------------------------------ the lock
def _holder_info(raw: str) -> dict[str, Any]:
    try:
        info = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return info if isinstance(info, dict) else {}


def describe_holder(info: dict[str, Any]) -> str:
    """``pid 123 on host h, started 2025-01-01 12:00:00`` (what the holder wrote)."""
    parts = []
    if info.get("pid") is not None:
        parts.append(f"pid {info['pid']}")
    if info.get("host"):
        parts.append(f"on host {info['host']}")
    text = " ".join(parts) or "another process"
    if info.get("started"):
        text += f", started {info['started']}"
    if info.get("command"):
        text += f": {info['command']}"
    return text


def busy_error(path: Path, info: dict[str, Any]) -> LeverError:
    """The error for a directory another live run holds."""
    return LeverError(
        f"--output-dir: {path} is in use by another lever-train run ({describe_holder(info)}); "
        "wait for it to finish, stop it, or choose another directory"
    )


def lock_holder(path: Path) -> dict[str, Any] | None:
    """What the live run holding ``path``'s lock wrote about itself; None when no live
    process holds it (no lock file, or one left by a process that has ended)."""
    if fcntl is None:
        return None
    lock_path = path / LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDONLY | _NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            with os.fdopen(os.dup(fd), encoding="utf-8", errors="replace") as fh:
                return _holder_info(fh.read())
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLock:
    """An exclusive lock on an output directory for the lifetime of a run.

    :meth:`acquire` creates the directory and ``.lock`` and takes ``flock(LOCK_EX)``
    without waiting; the holder's pid, host, start time and command line are written
    into the file. :meth:`release` removes the file and drops the lock; a process that
    dies drops it too (the kernel releases ``flock`` locks of closed files), so a stale
    ``.lock`` is simply taken over. Where ``fcntl`` is missing (Windows) the lock is a
    no-op.
    """

    def __init__(self, path: Path, warn: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.fd: int | None = None
        self.warn = warn

    @property
    def lock_path(self) -> Path:
        """``OUTPUT_DIR/.lock``."""
        return self.path / LOCK_NAME

    def acquire(self) -> RunLock:
        """Take the lock, or raise a :class:`LeverError` naming the run that holds it."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LeverError(
                f"--output-dir: cannot create {self.path} ({exc.strerror or exc})"
            ) from None
        if fcntl is None:  # pragma: no cover - Windows
            return self
        for _ in range(10):
            try:
                # never through a link: the holder's details would overwrite its target
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o666)
            except OSError as exc:
                if exc.errno == errno.ELOOP or self.lock_path.is_symlink():
                    raise LeverError(
                        f"--output-dir: {self.lock_path} is a symbolic link, not a run's lock "
                        "file; lever-train does not write through it: remove the link"
                    ) from None
                raise LeverError(
                    f"--output-dir: cannot create {self.lock_path} ({exc.strerror or exc})"
                ) from None
            try:
                locked = self._try_lock(fd)
            except OSError as exc:  # a file system without flock (some network mounts)
                os.close(fd)
                if self.warn is not None:
                    self.warn(
                        f"warning: cannot lock {self.lock_path} ({exc.strerror or exc}); "
                        "nothing keeps another run from writing into the same directory"
                    )
                return self
            if not locked:
                with os.fdopen(fd, encoding="utf-8", errors="replace") as fh:
                    info = _holder_info(fh.read())
                raise busy_error(self.path, info)
            # The holder before us may have removed the file after we opened it: then
            # we hold a lock on a file nobody else can see. Try again on the new one.
            try:
                same = os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self.fd = fd
            self._write_info()
            return self
        raise LeverError(f"--output-dir: could not lock {self.lock_path} (it keeps changing)")

    @staticmethod
    def _try_lock(fd: int) -> bool:
        """``flock(LOCK_EX)`` without waiting for a run; a few short retries ride out
        another process's probe (:func:`lock_holder` holds a shared lock for a moment)."""
        assert fcntl is not None
        for attempt in range(5):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                time.sleep(0.02 * (attempt + 1))
        return False

    def _write_info(self) -> None:
        assert self.fd is not None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": " ".join(["lever-train", *sys.argv[1:]])[:500],
        }
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(info) + "\n").encode(), 0)

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self.fd is None:
            return
        try:
            # only our own file: whatever replaced it (a link, another run's) stays
            if os.lstat(self.lock_path).st_ino == os.fstat(self.fd).st_ino:
                self.lock_path.unlink()
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


__all__ = [
    "CHECKPOINT_PATTERN",
    "LOCK_NAME",
    "RUN_FILE_NAMES",
    "RunLock",
    "check_output_dir",
    "clear_previous_run",
    "is_run_file",
    "lock_holder",
    "run_files",
]

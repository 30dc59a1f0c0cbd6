"""Writing files so that a reader never sees half of one, with the permissions a plain
``open()`` would give, and JSON text that other tools can read.

Files a user names (``--output``) are written by :func:`open_output`: a regular file is
replaced atomically; ``-`` is standard output; a FIFO or a character device (a pipe,
``/dev/null``, ``/dev/stdout``, a shell's ``>(...)``) is written in place as a stream,
never replaced by a file; anything else is refused before any work. No write here goes
through a symbolic link the program did not create: a link named as a regular output
file is refused, and files inside a run directory are opened with ``O_NOFOLLOW``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

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
    with _atomic_file(path) as fh:
        fh.write(data)


#: What :func:`output_kind` says about a path a user named for output.
STDOUT, STREAM, FILE = "stdout", "stream", "file"
#: Folders whose symbolic links name open descriptors (``/dev/stdout``, ``/dev/fd/3``,
#: ``/proc/self/fd/1``): written in place, whatever they point at.
_DESCRIPTOR_DIRS = ("/dev/", "/proc/")


def output_kind(path: str | os.PathLike[str], flag: str) -> str:
    """How an output named with ``flag`` is written: :data:`STDOUT` (``-``),
    :data:`STREAM` (an existing FIFO or character device, written in place) or
    :data:`FILE` (a regular file, created or replaced atomically).

    Refused with a :class:`LeverError` naming ``flag``: a directory (or a name ending in
    ``/``), a block device, a socket, a symbolic link to a regular file or to nothing (its
    target would be replaced, or the link itself), and a path whose folder cannot be
    created or written.
    """
    text = os.fspath(path)
    if text == "-":
        return STDOUT
    if not text:
        raise LeverError(f"{flag}: empty file name")
    if text.endswith(("/", os.sep)):
        raise LeverError(f"{flag}: {text} names a directory; give a file name")
    try:
        link = os.lstat(text)
    except FileNotFoundError:
        link = None
    except OSError as exc:
        raise LeverError(f"{flag}: cannot write {text} ({exc.strerror or exc})") from None
    if link is not None:
        mode = link.st_mode
        if stat.S_ISLNK(mode):
            try:
                mode = os.stat(text).st_mode
            except OSError:
                raise LeverError(
                    f"{flag}: {text} is a symbolic link to {os.readlink(text)!r}, which does "
                    "not exist; name the file to write, not a link"
                ) from None
            descriptor = os.path.abspath(text).startswith(_DESCRIPTOR_DIRS)
            if stat.S_ISREG(mode) and not descriptor:
                raise LeverError(
                    f"{flag}: {text} is a symbolic link (to {os.path.realpath(text)}); "
                    "lever-train does not write through links: name the file itself"
                )
            if descriptor and stat.S_ISREG(mode):
                return STREAM
        if stat.S_ISDIR(mode):
            raise LeverError(f"{flag}: {text} is a directory")
        if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
            return STREAM
        if not stat.S_ISREG(mode):
            what = "a block device" if stat.S_ISBLK(mode) else "a socket or other special file"
            raise LeverError(f"{flag}: {text} is {what}; give a regular file, a pipe or -")
    target = Path(text)
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise LeverError(f"{flag}: cannot create {text}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise LeverError(f"{flag}: cannot write {text}: {ancestor} is not writable")
    return FILE


class OutputFile:
    """The file :func:`open_output` yields: ``write`` bytes; a failure to write is a
    :class:`LeverError` naming the output (other errors of the caller pass untouched)."""

    def __init__(self, fh: IO[bytes], text: str, flag: str) -> None:
        self.fh, self.text, self.flag = fh, text, flag

    def error(self, exc: OSError) -> LeverError:
        """``--output: cannot write PATH (reason)``."""
        return LeverError(f"{self.flag}: cannot write {self.text} ({exc.strerror or exc})")

    def write(self, data: bytes) -> None:
        """Write all of ``data`` (an unbuffered stream may take it in parts)."""
        view = memoryview(data)
        try:
            while view:
                view = view[self.fh.write(view) or 0 :]
        except OSError as exc:
            raise self.error(exc) from None


@contextlib.contextmanager
def open_output(path: str | os.PathLike[str], flag: str) -> Iterator[OutputFile]:
    """A binary file to write the output named with ``flag`` into (see :func:`output_kind`).

    A regular file is written to a temporary file beside it and renamed over it only when
    the ``with`` block ends without an exception, so an error (or a kill) midway leaves
    the previous file as it was. Standard output and streams are written directly. A
    failure to open, write or finish the output is a :class:`LeverError`
    (``--output: cannot write PATH (reason)``); the caller's own errors pass untouched.
    """
    text = os.fspath(path)
    kind = output_kind(text, flag)
    guard = OutputFile(sys.stdout.buffer, text, flag)  # for its error() until opened
    if kind == STDOUT:
        yield guard
        try:
            sys.stdout.buffer.flush()
        except OSError as exc:
            raise guard.error(exc) from None
        return
    if kind == STREAM:
        sys.stdout.flush()  # what was printed before comes first on /dev/stdout
        try:
            # no O_CREAT, no O_TRUNC: a pipe or device is written, never made or cut
            # unbuffered: every write reaches the pipe (or fails) where it is made
            stream = os.fdopen(os.open(text, os.O_WRONLY), "wb", buffering=0)
        except OSError as exc:
            raise guard.error(exc) from None
        with stream:
            yield OutputFile(stream, text, flag)
        return
    try:
        atomic = _atomic_file(Path(text))
        temporary = atomic.__enter__()
    except OSError as exc:
        raise guard.error(exc) from None
    try:
        yield OutputFile(temporary, text, flag)
    except BaseException:
        atomic.__exit__(*sys.exc_info())  # removes the temporary file
        raise
    try:
        atomic.__exit__(None, None, None)
    except OSError as exc:
        raise guard.error(exc) from None


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """A temporary file beside ``path``, renamed over it on success (see
    :func:`atomic_write_bytes`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~current_umask())
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_output(path: str | os.PathLike[str], data: bytes, flag: str) -> None:
    """Write ``data`` to the output the user named with ``flag`` (:func:`open_output`):
    a failure is a :class:`LeverError` (``--output: cannot write PATH (reason)``), ``path``
    shown as given."""
    with open_output(path, flag) as fh:
        fh.write(data)


def _open_in_run_dir(path: Path, flags: int) -> int:
    """``os.open`` of a run-directory file that never follows a symbolic link."""
    try:
        return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LeverError(
                f"{path} is a symbolic link; lever-train writes its run files itself and "
                "never through a link: remove the link"
            ) from None
        raise


def append_text(path: Path, text: str) -> None:
    """Append ``text`` to the run file ``path`` (created as ``open(path, "a")`` would), and
    flush it; a symbolic link at ``path`` is a :class:`LeverError`, never written through."""
    fd = _open_in_run_dir(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with os.fdopen(fd, "ab") as fh:
        fh.write(text.encode("utf-8"))
        fh.flush()


def truncate_file(path: Path, size: int) -> None:
    """Cut the run file ``path`` back to ``size`` bytes (nothing when it is shorter or
    absent); a symbolic link at ``path`` is a :class:`LeverError`."""
    try:
        fd = _open_in_run_dir(path, os.O_WRONLY)
    except FileNotFoundError:
        return
    try:
        if os.fstat(fd).st_size > size:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


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

"""User-fixable errors.

Anything a user can correct (a bad file, a wrong flag, an unknown plugin) is raised
as a :class:`LeverError` whose message names the file, field, flag or plugin. The
CLI prints it as one line and exits with status 2; any other exception is a bug.
"""

from __future__ import annotations


class LeverError(Exception):
    """An error the user can fix; its message is a single self-explanatory line."""


class PluginError(LeverError):
    """A plugin misbehaved: failed inside a hook, or two plugins gave conflicting answers."""


class StoreError(LeverError):
    """The verdict store cannot be used (damaged, or locked by another process too long).

    Raised inside a phase, it ends the run like a plugin's failure: the newest snapshot
    stays, and the run resumes once the store is usable again."""


class JudgeStopped(Exception):
    """A stop was requested (a signal) while the run waited for its judge.

    Not an error: the trainer stops as after any step, from the newest snapshot."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Interrupted(KeyboardInterrupt):
    """The user's own interrupt (a second Ctrl-C): it stops the run at once.

    Raised by the command line's signal handler, so that it is told apart from a
    ``KeyboardInterrupt`` a plugin raises (a plugin failure like any other)."""

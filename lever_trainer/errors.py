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

"""lever_trainer: a plugin-based RCE + GRPO trainer for in-context example selection."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import LeverError, PluginError
from .hookspecs import hookimpl
from .state import RewardChoice, TrainConfig, TrainState

__all__ = [
    "LeverError",
    "PluginError",
    "RewardChoice",
    "TrainConfig",
    "TrainState",
    "__version__",
    "hookimpl",
]

"""lever_trainer: a plugin-based trainer for in-context example selection policies.

Plugins import what they need from :mod:`lever_trainer.api`; the names below are kept
for convenience and do not import torch.
"""

from __future__ import annotations

__version__ = "0.2.0"

from .errors import LeverError, PluginError
from .hookspecs import hookimpl
from .options import Option
from .state import RewardChoice, TrainConfig, TrainState

__all__ = [
    "LeverError",
    "Option",
    "PluginError",
    "RewardChoice",
    "TrainConfig",
    "TrainState",
    "__version__",
    "hookimpl",
]

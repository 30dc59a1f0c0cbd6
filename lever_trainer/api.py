"""Everything a plugin needs, in one import: ``from lever_trainer.api import ...``.

Built-in plugins import only from here (a test checks it), exactly as a third-party
package would.
"""

from __future__ import annotations

from .errors import LeverError, PluginError
from .hookspecs import hookimpl
from .options import Option
from .policy import (
    CHOSEN_LOGIT,
    Policy,
    PointerTrunk,
    TrunkConfig,
    decode_steps,
    dropout,
    one_token_attention,
)
from .state import RewardChoice, TrainConfig, TrainState

__all__ = [
    "CHOSEN_LOGIT",
    "LeverError",
    "Option",
    "PluginError",
    "Policy",
    "PointerTrunk",
    "RewardChoice",
    "TrainConfig",
    "TrainState",
    "TrunkConfig",
    "decode_steps",
    "dropout",
    "hookimpl",
    "one_token_attention",
]

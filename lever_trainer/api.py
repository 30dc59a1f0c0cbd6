"""Everything a plugin needs, in one import: ``from lever_trainer.api import ...``.

Built-in plugins import only from here (a test checks it), exactly as a third-party
package would. What is here is the public API; anything else may change.
"""

from __future__ import annotations

from typing import Any

import torch

from . import losses, metrics
from .data import Batch, Embeddings, QueryTable, gather_groups, iter_batches, make_batch
from .errors import LeverError, PluginError
from .evaluation import format_metrics, policy_logprobs
from .fileio import atomic_write_bytes, json_line
from .hookspecs import hookimpl
from .jsonstream import iter_object_members
from .losses import (
    ZSCORE_STD_EPS,
    adapt_kl_beta,
    group_advantages,
    grpo_loss,
    grpo_terms,
    masked_mean,
    masked_std,
    rce_loss,
    rce_temperature,
    sequence_logprobs,
    top_k_mask,
)
from .options import DATA_COMMANDS, Option
from .phase import Phase
from .policy import (
    CHOSEN_LOGIT,
    PointerTrunk,
    Policy,
    TrunkConfig,
    decode_steps,
    dropout,
    one_token_attention,
)
from .rewards import NormalizeFn, RawRewardFn, RewardParams
from .state import RewardChoice, StopRequest, TrainConfig, TrainState


def expect_tensor(
    value: Any,
    plugin: str,
    hook: str,
    shape: tuple[int, ...],
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``value`` if it is a tensor of ``shape`` (and ``dtype``), else a :class:`PluginError`
    naming the plugin and hook that returned it."""
    if not isinstance(value, torch.Tensor):
        raise PluginError(
            f"plugin {plugin}: hook {hook} returned {type(value).__name__}, "
            f"expected a tensor of shape {list(shape)}"
        )
    if tuple(value.shape) != tuple(shape) or (dtype is not None and value.dtype != dtype):
        want = f"{list(shape)}" + (f" {dtype}" if dtype is not None else "")
        raise PluginError(
            f"plugin {plugin}: hook {hook} returned a tensor of shape {list(value.shape)} "
            f"{value.dtype}, expected {want}"
        )
    return value


__all__ = [
    "CHOSEN_LOGIT",
    "DATA_COMMANDS",
    "ZSCORE_STD_EPS",
    "Batch",
    "Embeddings",
    "LeverError",
    "NormalizeFn",
    "Option",
    "Phase",
    "PluginError",
    "PointerTrunk",
    "Policy",
    "QueryTable",
    "RawRewardFn",
    "RewardChoice",
    "RewardParams",
    "StopRequest",
    "TrainConfig",
    "TrainState",
    "TrunkConfig",
    "adapt_kl_beta",
    "atomic_write_bytes",
    "decode_steps",
    "dropout",
    "expect_tensor",
    "format_metrics",
    "gather_groups",
    "group_advantages",
    "grpo_loss",
    "grpo_terms",
    "hookimpl",
    "iter_batches",
    "iter_object_members",
    "json_line",
    "losses",
    "make_batch",
    "masked_mean",
    "masked_std",
    "metrics",
    "one_token_attention",
    "policy_logprobs",
    "rce_loss",
    "rce_temperature",
    "sequence_logprobs",
    "top_k_mask",
]

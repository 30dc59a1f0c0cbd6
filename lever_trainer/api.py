"""Everything a plugin needs, in one import: ``from lever_trainer.api import ...``.

Built-in plugins import only from here (a test checks it), exactly as a third-party
package would. What is here is the public API; anything else may change.
"""

from __future__ import annotations

from typing import Any

import torch

from . import losses, metrics

# The core's records of the options plugins may read (``LOG_EVERY.of(state.options)``).
from .coreoptions import (
    CAND_EMB,
    EMB_KEY,
    IMG_EMB,
    LOG_EVERY,
    POLICY_TEMPERATURE,
    SELECT_SHOTS,
    VAL_RATIO,
)
from .data import (
    TABLE_FIELDS,
    Batch,
    Embeddings,
    PoolTable,
    QueryTable,
    gather_groups,
    iter_batches,
    load_embeddings,
    make_batch,
    pool_batches,
)
from .errors import LeverError, PluginError
from .evaluation import format_metrics, policy_logprobs
from .fileio import append_text, atomic_write_bytes, json_line, json_safe, truncate_file
from .hookspecs import hookimpl
from .jsonstream import iter_object_members
from .judge import VERDICT_FIELDS, Environment
from .judge_driver import PermanentJudgeError, TransientJudgeError
from .losses import (
    LOG_RATIO_BOUND,
    ZSCORE_STD_EPS,
    adapt_kl_beta,
    bounded_log_ratio,
    effective_sample_size,
    equal_reward_groups,
    group_advantages,
    grpo_loss,
    grpo_terms,
    masked_mean,
    masked_std,
    rce_loss,
    rce_temperature,
    sequence_logprobs,
    softmax_weights,
    step_entropy,
    top_k_mask,
    weighted_sequence_loss,
)
from .manifest import ManifestError, ManifestItem, image_data, iter_manifest, read_manifest
from .options import DATA_COMMANDS, Option
from .phase import EpochData, Phase
from .policy import (
    CHOSEN_LOGIT,
    PointerTrunk,
    Policy,
    TrunkConfig,
    decode_steps,
    dropout,
    one_token_attention,
    sample_sequences,
)
from .rewards import NormalizeFn, RawRewardFn, RewardParams
from .state import About, PolicyObjective, RewardChoice, StopRequest, TrainConfig, TrainState
from .vqa_eval import most_common_answer, normalize_answer, vqa_accuracy


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
    "CAND_EMB",
    "CHOSEN_LOGIT",
    "DATA_COMMANDS",
    "EMB_KEY",
    "IMG_EMB",
    "LOG_EVERY",
    "LOG_RATIO_BOUND",
    "POLICY_TEMPERATURE",
    "SELECT_SHOTS",
    "TABLE_FIELDS",
    "VAL_RATIO",
    "VERDICT_FIELDS",
    "ZSCORE_STD_EPS",
    "About",
    "Batch",
    "Embeddings",
    "Environment",
    "EpochData",
    "LeverError",
    "ManifestError",
    "ManifestItem",
    "NormalizeFn",
    "Option",
    "PermanentJudgeError",
    "Phase",
    "PluginError",
    "PointerTrunk",
    "Policy",
    "PolicyObjective",
    "PoolTable",
    "QueryTable",
    "RawRewardFn",
    "RewardChoice",
    "RewardParams",
    "StopRequest",
    "TrainConfig",
    "TrainState",
    "TransientJudgeError",
    "TrunkConfig",
    "adapt_kl_beta",
    "append_text",
    "atomic_write_bytes",
    "bounded_log_ratio",
    "decode_steps",
    "dropout",
    "effective_sample_size",
    "equal_reward_groups",
    "expect_tensor",
    "format_metrics",
    "gather_groups",
    "group_advantages",
    "grpo_loss",
    "grpo_terms",
    "hookimpl",
    "image_data",
    "iter_batches",
    "iter_manifest",
    "iter_object_members",
    "json_line",
    "json_safe",
    "load_embeddings",
    "losses",
    "make_batch",
    "masked_mean",
    "masked_std",
    "metrics",
    "most_common_answer",
    "normalize_answer",
    "one_token_attention",
    "policy_logprobs",
    "pool_batches",
    "rce_loss",
    "rce_temperature",
    "read_manifest",
    "sample_sequences",
    "sequence_logprobs",
    "softmax_weights",
    "step_entropy",
    "top_k_mask",
    "truncate_file",
    "vqa_accuracy",
    "weighted_sequence_loss",
]

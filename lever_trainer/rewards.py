"""Reward formulas (SPEC section 3).

Raw-reward formulas and group normalisers are looked up by name in two tables,
so the loader never hard-codes an expression: adding a mode is adding an entry.
Raw rewards are computed once per candidate at load time; normalised rewards once
per query group, over the group's kept candidates.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import LeverError
from .losses import ZSCORE_STD_EPS

#: Every raw reward is clipped to this range (SPEC 3.1).
RAW_REWARD_CLIP = 5.0


@dataclass(frozen=True)
class RewardWeights:
    """Weights of the raw-reward formulas: hard (``wh``), soft (``ws``), relevance (``wl``)."""

    hard: float = 1.0
    soft: float = 1.0
    rel: float = 0.1


def _field(cand: Mapping[str, Any], name: str) -> float:
    value = cand.get(name)
    return 0.0 if value is None else float(value)


def hard_plus_soft(cand: Mapping[str, Any], w: RewardWeights) -> float:
    """``wh * vqa_correct + ws * vqa_acc_score`` (the default mode)."""
    return w.hard * _field(cand, "vqa_correct") + w.soft * _field(cand, "vqa_acc_score")


RawRewardFn = Callable[[Mapping[str, Any], RewardWeights], float]
NormalizeFn = Callable[[torch.Tensor], torch.Tensor]

RAW_REWARD_MODES: dict[str, RawRewardFn] = {"hard_plus_soft": hard_plus_soft}


def raw_reward(cand: Mapping[str, Any], mode: str, weights: RewardWeights) -> float:
    """Raw reward of one candidate under ``mode``, clipped to [-5, 5]."""
    try:
        fn = RAW_REWARD_MODES[mode]
    except KeyError:
        known = ", ".join(sorted(RAW_REWARD_MODES))
        raise LeverError(f"--reward-mode: unknown mode {mode!r} (known: {known})") from None
    value = fn(cand, weights)
    return max(-RAW_REWARD_CLIP, min(RAW_REWARD_CLIP, value))


def z_score(rewards: torch.Tensor) -> torch.Tensor:
    """``(r - mean) / std`` with the unbiased std; unchanged when n = 1 or std <= 1e-12."""
    if rewards.numel() < 2:
        return rewards.clone()
    std = rewards.std(unbiased=True)
    if std <= ZSCORE_STD_EPS:
        return rewards.clone()
    return (rewards - rewards.mean()) / std


def z_score_clamp(rewards: torch.Tensor, clamp: float = 3.0) -> torch.Tensor:
    """:func:`z_score` clamped to ``[-clamp, clamp]`` (the default normaliser)."""
    if rewards.numel() < 2 or rewards.std(unbiased=True) <= ZSCORE_STD_EPS:
        return rewards.clone()
    return z_score(rewards).clamp(-clamp, clamp)


NORMALIZERS: dict[str, NormalizeFn] = {"z_score_clamp": z_score_clamp, "z_score": z_score}


def normalize_group(rewards: torch.Tensor, method: str) -> torch.Tensor:
    """Normalise one query's raw rewards [n] with the named method."""
    try:
        fn = NORMALIZERS[method]
    except KeyError:
        known = ", ".join(sorted(NORMALIZERS))
        raise LeverError(f"--normalize: unknown method {method!r} (known: {known})") from None
    return fn(rewards)

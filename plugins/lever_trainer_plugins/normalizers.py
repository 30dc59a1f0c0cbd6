"""Group normalisers (``--normalize``). On by default.

For the two z-scores, a group of one candidate or with ``std <= 1e-12`` keeps its
raw rewards unchanged, as the reference implementation does. Mean and std are taken
in float64: in float32, seven equal rewards of 0.3 have a std of 3e-8, not 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from lever_trainer.api import (
    DATA_COMMANDS,
    ZSCORE_STD_EPS,
    About,
    NormalizeFn,
    Option,
    RewardParams,
    hookimpl,
)


@hookimpl
def about() -> About:
    """What ``lever-train plugins`` shows of this plugin."""
    return About(
        description="group normalisers: z_score_clamp (default), z_score, rank",
        enabled_by_default=True,
    )


def _flat(rewards: torch.Tensor) -> bool:
    """One candidate, or an unbiased std <= 1e-12 (computed in float64)."""
    return rewards.numel() < 2 or bool(rewards.double().std(unbiased=True) <= ZSCORE_STD_EPS)


def z_score(rewards: torch.Tensor, params: RewardParams) -> torch.Tensor:
    """``(r - mean) / std`` with the unbiased std."""
    if _flat(rewards):
        return rewards.clone()
    r = rewards.double()
    return ((r - r.mean()) / r.std(unbiased=True)).to(rewards.dtype)


def z_score_clamp(rewards: torch.Tensor, params: RewardParams) -> torch.Tensor:
    """:func:`z_score` clamped to ``[-c, c]``, ``c = --normalize-clamp-value`` (3)."""
    if _flat(rewards):
        return rewards.clone()
    bound = float(params.option("normalize_clamp", 3.0))
    return z_score(rewards, params).clamp(-bound, bound)


def rank(rewards: torch.Tensor, params: RewardParams) -> torch.Tensor:
    """``1 - 2*rank/(n-1)``, rank 0 the highest reward (ties: lower index first); 0 if n = 1."""
    n = rewards.numel()
    if n < 2:
        return torch.zeros_like(rewards)
    order = torch.sort(rewards, descending=True, stable=True).indices
    ranks = torch.empty(n, dtype=rewards.dtype)
    ranks[order] = torch.arange(n, dtype=rewards.dtype)
    return 1 - 2 * ranks / (n - 1)


NORMALIZERS: dict[str, NormalizeFn] = {
    "z_score_clamp": z_score_clamp,
    "z_score": z_score,
    "rank": rank,
}


@hookimpl
def normalizers() -> Mapping[str, NormalizeFn]:
    """The three normalisers."""
    return NORMALIZERS


NORMALIZE_CLAMP = Option(
    ("--normalize-clamp-value", "--normalize_clamp_value"),
    "float",
    3.0,
    "Bound of z_score_clamp.",
    dest="normalize_clamp",
    min=0,
    min_open=True,
    commands=DATA_COMMANDS,
)


@hookimpl
def add_options() -> Sequence[Option]:
    """The bound of ``z_score_clamp``."""
    return [NORMALIZE_CLAMP]

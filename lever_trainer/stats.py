"""Uncertainty of means over queries: percentile bootstrap intervals, plain and paired.

A selector's accuracy on a query file is a mean over its queries, and so is the
difference between two selectors on the same queries. Resampling the queries with
replacement (the same resampled queries for both selectors in a paired comparison)
gives the spread such a mean would have on another draw of queries from the same
source. Intervals are percentile intervals of ``resamples`` bootstrap means, from a
fixed seed, so a report is reproducible. Pure functions of 1-d tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: Bootstrap resamples of an interval.
RESAMPLES = 2000
#: Coverage of the intervals.
LEVEL = 0.95
#: Seed of the resampling (reports are reproducible).
SEED = 0


def _as_tensor(values: Sequence[float] | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float64).flatten()


def bootstrap_means(
    groups: Sequence[Sequence[float] | torch.Tensor],
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> torch.Tensor:
    """Bootstrap replicates [resamples] of the mean over groups of each group's mean,
    every group's items resampled with replacement on its own (a stratified bootstrap:
    the groups are e.g. tasks, the items their queries)."""
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(resamples, dtype=torch.float64)
    for group in groups:
        values = _as_tensor(group)
        if values.numel() == 0:
            raise ValueError("bootstrap of an empty group")
        idx = torch.randint(values.numel(), (resamples, values.numel()), generator=gen)
        total += values[idx].mean(dim=1)
    return total / len(groups)


def interval(replicates: torch.Tensor, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap replicates."""
    tail = (1.0 - level) / 2
    q = torch.quantile(replicates, torch.tensor([tail, 1.0 - tail], dtype=replicates.dtype))
    return float(q[0]), float(q[1])


def mean_interval(
    values: Sequence[float] | torch.Tensor, resamples: int = RESAMPLES, seed: int = SEED
) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-query values and its bootstrap interval."""
    v = _as_tensor(values)
    low, high = interval(bootstrap_means([v], resamples, seed))
    return float(v.mean()), low, high


def paired_difference(
    a: Sequence[float] | torch.Tensor,
    b: Sequence[float] | torch.Tensor,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> tuple[float, float, float]:
    """(mean(a - b), low, high) over the same queries, resampled in pairs."""
    x, y = _as_tensor(a), _as_tensor(b)
    if x.shape != y.shape:
        raise ValueError(f"paired values of different lengths: {x.numel()} and {y.numel()}")
    return mean_interval(x - y, resamples, seed)


__all__ = [
    "LEVEL",
    "RESAMPLES",
    "bootstrap_means",
    "interval",
    "mean_interval",
    "paired_difference",
]

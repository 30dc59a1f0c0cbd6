"""Leave groups whose kept candidates all have the same raw reward out of the GRPO loss.

Such a group has no advantage signal (its advantages are all 0 under every built-in
estimator), yet by default it still counts in the batch mean and its KL term still
pulls on the policy; DAPO's dynamic sampling drops them. Here they are left out of the
step's loss (PPO and KL terms); the batch mean runs over the other queries, and the
share left out is reported as ``skipped_groups`` (``zero_var_groups`` is reported with
or without this plugin). A batch whose groups are all left out gives a zero gradient.
"Same reward" is judged on the raw reward of the candidates ``select_candidates`` kept,
so equal outcomes count as equal whatever the normaliser.
"""

from __future__ import annotations

import torch

from lever_trainer.api import About, Batch, equal_reward_groups, hookimpl


@hookimpl
def about() -> About:
    """What ``lever-train plugins`` shows of this plugin."""
    return About(
        description="GRPO leaves groups with all-equal rewards out of the loss (skipped_groups)",
    )


@hookimpl
def filter_groups(batch: Batch) -> torch.Tensor:
    """False for the queries whose kept candidates' raw rewards are all equal."""
    return ~equal_reward_groups(batch.rewards_raw, batch.cand_mask)

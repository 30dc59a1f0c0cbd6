"""Policy ``pointer-dpp``: upstream V4-7 (``PointerSelectorV4_7``), a DPP-style diversity gain.

Computed once per query: low-rank item features ``F = normalise(dpp_proj(c))`` [K, 32].
For t >= 1, with ``s_k = max_j <F_k, F_chosen_j>``, the logits gain
``softplus(dpp_lambda) * log(1e-6 + 1 - min(s_k^2, 0.999))`` (a penalty for items
close to earlier choices); then the GRU update. ``step_emb`` has 8 rows whatever S
is (steps past 7 reuse row 7), and ``dpp_lambda`` starts at -2.0 (upstream's sentinel
for an init of 0.0).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lever_trainer.api import About, TrunkConfig, hookimpl

from ._decoders import Encoding, StepPointerPolicy, gather_rows, lambda_init, shots_from

NAME = "pointer-dpp"
#: Upstream's constants: feature rank, step-embedding rows, dpp_lambda_init.
DPP_RANK = 32
STEP_ROWS = 8
DPP_LAMBDA_INIT = 0.0


class DppPointerPolicy(StepPointerPolicy):
    """Trunk, GRU, ``step_emb`` [8, h], ``dpp_proj`` (h -> 32, no bias), ``dpp_lambda``."""

    policy_name = NAME

    def __init__(self, config: TrunkConfig, shots: int) -> None:
        super().__init__(config, shots, step_rows=STEP_ROWS, use_gru=True)
        self.dpp_proj = nn.Linear(config.hidden_dim, DPP_RANK, bias=False)
        self.dpp_lambda = nn.Parameter(torch.tensor(lambda_init(DPP_LAMBDA_INIT)))
        nn.init.xavier_uniform_(self.dpp_proj.weight)

    def prepare(self, encoding: tuple[torch.Tensor, torch.Tensor]) -> Encoding:
        """``(z, keys, F [B, K, 32])``."""
        z, keys = encoding
        return z, keys, F.normalize(self.dpp_proj(keys), dim=-1)

    def step_scores(
        self,
        context: Encoding,
        memory: list[torch.Tensor],
        state: torch.Tensor,
        step: int,
        chosen: torch.Tensor,
        pad: torch.Tensor | None,
    ) -> torch.Tensor:
        """``keys . h~ / tau`` plus, for t >= 1, ``softplus(dpp_lambda) * g``."""
        scores = super().step_scores(context, memory, state, step, chosen, pad)
        if not memory:
            return scores
        max_sim = torch.stack(memory, dim=-1).max(dim=-1).values  # [B, G, K]
        gain = torch.log(1e-6 + 1.0 - max_sim.pow(2).clamp(max=0.999))
        return scores + F.softplus(self.dpp_lambda) * gain

    def remember(
        self,
        context: Encoding,
        memory: list[torch.Tensor],
        pos: torch.Tensor,
        chosen_key: torch.Tensor,
    ) -> None:
        """Keep every item's feature similarity to the chosen one: [B, G, K]."""
        feats = context[2]
        memory.append(torch.bmm(gather_rows(feats, pos), feats.transpose(1, 2)))


@hookimpl
def about() -> About:
    """On by default: a policy is used only when ``--policy`` names it."""
    return About(
        description="policy `pointer-dpp`: upstream V4-7, V4-2 + learned DPP-style diversity gain",
        enabled_by_default=True,
    )


@hookimpl
def policies() -> dict[str, Callable[[int, Mapping[str, Any]], DppPointerPolicy]]:
    """The one policy this plugin builds."""
    return {NAME: build}


def build(input_dim: int, options: Mapping[str, Any]) -> DppPointerPolicy:
    """Build ``pointer-dpp`` from the trunk options and ``shots``."""
    return DppPointerPolicy(TrunkConfig.from_options(input_dim, options), shots_from(options))

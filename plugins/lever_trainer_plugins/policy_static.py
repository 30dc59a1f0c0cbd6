"""Policy ``pointer-static``: upstream's pre-V4-1 pointer (``PointerSelectorV2`` @ d7b9e0a5).

No state update: every step scores the pool against the initial state,
``logit_k = <z, c_k> / tau``; steps differ only by the mask of earlier choices. The
parameters are the shared trunk's alone. One quirk of that version is kept: dropout
sits *after* ``query_proj`` / ``cand_proj`` (before the L2 normalisation), where every
later version puts it before them; the two agree in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from lever_trainer.api import About, TrunkConfig, dropout, hookimpl

from ._decoders import StepPointerPolicy, shots_from

NAME = "pointer-static"


class StaticPointerPolicy(StepPointerPolicy):
    """The trunk and a pointer whose state never changes between steps."""

    policy_name = NAME

    def __init__(self, config: TrunkConfig, shots: int) -> None:
        super().__init__(config, shots, step_rows=0, use_gru=False)

    def encode(
        self,
        query_emb: torch.Tensor,
        cand_emb: torch.Tensor,
        pool_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """State z [B, h] and keys [B, K, h], with dropout after the projections."""
        q1 = self.input_proj(query_emb)
        c1 = self.encode_pool(self.input_proj(cand_emb), pool_mask)
        q1 = self.attend(q1, c1, pool_mask)
        p, training = self.config.dropout, self.training
        z = F.normalize(dropout(self.query_proj(q1), p, training), dim=-1)
        keys = F.normalize(dropout(self.cand_proj(c1), p, training), dim=-1)
        return z, keys


@hookimpl
def about() -> About:
    """On by default: a policy is used only when ``--policy`` names it."""
    return About(
        description="policy `pointer-static`: upstream V2 pointer without state update (mask only)",
        enabled_by_default=True,
    )


@hookimpl
def policies() -> dict[str, Callable[[int, Mapping[str, Any]], StaticPointerPolicy]]:
    """The one policy this plugin builds."""
    return {NAME: build}


def build(input_dim: int, options: Mapping[str, Any]) -> StaticPointerPolicy:
    """Build ``pointer-static`` from the trunk options and ``shots``."""
    return StaticPointerPolicy(TrunkConfig.from_options(input_dim, options), shots_from(options))

"""The reference policy, ``pointer``: the gated pointer decoder of docs/algorithm.md.

After each step the state moves toward the chosen item through a learned gate:
``gate = sigmoid(W_g [z; e] + b_g)``, ``z = normalise(gate * z + (1 - gate) * e)``.
The trunk (projections, cross-attention, dropout) is :class:`lever_trainer.api.PointerTrunk`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lever_trainer.api import About, PointerTrunk, TrunkConfig, decode_steps, hookimpl

NAME = "pointer"

#: The trunk's hyper-parameters are the whole of this policy's options.
PolicyConfig = TrunkConfig


class PointerPolicy(PointerTrunk):
    """Cross-attention encoder plus a gated pointer decoder over a candidate pool."""

    policy_name = "pointer"

    def __init__(self, config: TrunkConfig) -> None:
        super().__init__(config)
        h = config.hidden_dim
        self.query_update_gate = nn.Linear(2 * h, h)
        nn.init.xavier_uniform_(self.query_update_gate.weight)
        nn.init.zeros_(self.query_update_gate.bias)

    def decode(
        self,
        encoding: tuple[torch.Tensor, torch.Tensor],
        pool_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_steps: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the pointer steps for G sequences per query (see :class:`Policy`)."""
        z, keys = encoding
        groups, steps = decode_steps(labels, num_steps)
        batch, pool = keys.shape[0], keys.shape[1]
        state = z.unsqueeze(1).expand(batch, groups, z.shape[-1])
        keys_t = keys.transpose(1, 2)  # [B, h, K]
        chosen = torch.zeros(batch, groups, pool, dtype=torch.bool, device=keys.device)
        pad = None if pool_mask is None else ~pool_mask.unsqueeze(1)  # [B, 1, K]
        all_logits, all_preds = [], []
        for t in range(steps):
            scores = torch.bmm(state, keys_t) / self.config.temperature  # [B, G, K]
            logits = self.step_logits(scores, chosen, pad)
            preds = logits.argmax(dim=-1)
            all_logits.append(logits)
            all_preds.append(preds)
            if t == steps - 1:
                break
            pos = preds if labels is None else labels[:, :, t]
            chosen = chosen.scatter(2, pos.unsqueeze(-1), True)
            chosen_key = torch.gather(
                keys, 1, pos.unsqueeze(-1).expand(batch, groups, keys.shape[-1])
            )
            gate = torch.sigmoid(self.query_update_gate(torch.cat([state, chosen_key], dim=-1)))
            state = F.normalize(gate * state + (1 - gate) * chosen_key, dim=-1)
        return torch.stack(all_logits, dim=2), torch.stack(all_preds, dim=2)


@hookimpl
def about() -> About:
    """On by default: a policy is used only when ``--policy`` names it."""
    return About(
        description="policy `pointer`: the reference cross-attention trunk + gated state update",
        enabled_by_default=True,
    )


@hookimpl
def policies() -> dict[str, Callable[[int, Mapping[str, Any]], PointerPolicy]]:
    """The one policy this plugin builds."""
    return {NAME: build}


def build(input_dim: int, options: Mapping[str, Any]) -> PointerPolicy:
    """Build ``pointer`` from the trunk options (hidden_dim, num_layers, num_heads, ...)."""
    return PointerPolicy(TrunkConfig.from_options(input_dim, options))

"""Policy ``pointer-slots``: upstream V4-8 (``PointerSelectorV4_8``), a parallel slot decoder.

No GRU and no step embedding. One slot per step: ``Z[s] = h0 + slot_emb[s]``; two
rounds of slot self-attention (``Z = LN(Z + SA(Z))``), then slot-to-pool attention
(``Z = LN(Z + Attn(Z, c, c))``, padded pool entries masked out), and the step-s logits
are ``normalise(Z[s]) . c / tau``. All slots are computed before any choice, so a
choice affects later steps only through the mask. ``slot_emb`` has 8 rows whatever S
is; steps past 7 reuse row 7, as upstream does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lever_trainer.api import About, TrunkConfig, decode_steps, hookimpl

from ._decoders import VariantPolicy, attention, shots_from

NAME = "pointer-slots"
#: Upstream's constants: slot-embedding rows, slot self-attention layers.
SLOT_ROWS = 8
SLOT_LAYERS = 2


class SlotPointerPolicy(VariantPolicy):
    """Trunk, ``slot_emb`` [8, h], ``slot_self_attn_layers`` + ``slot_norms`` (2 each),
    ``slot_cand_attn`` + ``slot_cand_norm``."""

    policy_name = NAME

    def __init__(self, config: TrunkConfig, shots: int) -> None:
        super().__init__(config, shots)
        h, heads, p = config.hidden_dim, config.num_heads, config.attn_dropout
        self.slot_emb = nn.Embedding(SLOT_ROWS, h)
        self.slot_self_attn_layers = nn.ModuleList(
            nn.MultiheadAttention(h, heads, dropout=p, batch_first=True) for _ in range(SLOT_LAYERS)
        )
        self.slot_norms = nn.ModuleList(nn.LayerNorm(h) for _ in range(SLOT_LAYERS))
        self.slot_cand_attn = nn.MultiheadAttention(h, heads, dropout=p, batch_first=True)
        self.slot_cand_norm = nn.LayerNorm(h)
        nn.init.normal_(self.slot_emb.weight, mean=0.0, std=0.02)

    def slot_logits(
        self, z: torch.Tensor, keys: torch.Tensor, pad: torch.Tensor | None, steps: int
    ) -> torch.Tensor:
        """Unmasked logits [B, steps, K] of every slot."""
        rows = torch.arange(steps, device=z.device).clamp(max=SLOT_ROWS - 1)
        slots = z.unsqueeze(1) + self.slot_emb.weight[rows].unsqueeze(0)  # [B, S, h]
        for attn, norm in zip(self.slot_self_attn_layers, self.slot_norms, strict=True):
            assert isinstance(attn, nn.MultiheadAttention)
            slots = norm(slots + attention(attn, slots, slots, slots, None, self.training))
        cross = attention(self.slot_cand_attn, slots, keys, keys, pad, self.training)
        slots = F.normalize(self.slot_cand_norm(slots + cross), dim=-1)
        return self.scale(torch.bmm(slots, keys.transpose(1, 2)))

    def decode(
        self,
        encoding: tuple[torch.Tensor, torch.Tensor],
        pool_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_steps: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, G, S, K] and predictions [B, G, S] (see :class:`Policy`)."""
        z, keys = encoding
        groups, steps = decode_steps(labels, num_steps)
        batch, pool = keys.shape[0], keys.shape[1]
        raw = self.slot_logits(z, keys, None if pool_mask is None else ~pool_mask, steps)
        chosen = torch.zeros(batch, groups, pool, dtype=torch.bool, device=keys.device)
        pad = None if pool_mask is None else ~pool_mask.unsqueeze(1)
        all_logits, all_preds = [], []
        for t in range(steps):
            scores = raw[:, t].unsqueeze(1).expand(batch, groups, pool)
            logits = self.step_logits(scores, chosen, pad)
            preds = logits.argmax(dim=-1)
            all_logits.append(logits)
            all_preds.append(preds)
            if t == steps - 1:
                break
            pos = preds if labels is None else labels[:, :, t]
            chosen = chosen.scatter(2, pos.unsqueeze(-1), True)
        return torch.stack(all_logits, dim=2), torch.stack(all_preds, dim=2)


@hookimpl
def about() -> About:
    """On by default: a policy is used only when ``--policy`` names it."""
    return About(
        description=(
            "policy `pointer-slots`: upstream V4-8, parallel slots with self/pool attention"
        ),
        enabled_by_default=True,
    )


@hookimpl
def policies() -> dict[str, Callable[[int, Mapping[str, Any]], SlotPointerPolicy]]:
    """The one policy this plugin builds."""
    return {NAME: build}


def build(input_dim: int, options: Mapping[str, Any]) -> SlotPointerPolicy:
    """Build ``pointer-slots`` from the trunk options and ``shots``."""
    return SlotPointerPolicy(TrunkConfig.from_options(input_dim, options), shots_from(options))

"""Policy ``pointer-set-encoder``: upstream V4-4 (``PointerSelectorV4_4``).

Before the cross-attention, the projected pool passes through one pre-LayerNorm
Transformer encoder layer (one head, feed-forward 4h with exact GELU, dropout = the
trunk's dropout, no final norm), so candidates see each other; the result replaces
the pool everywhere after (cross-attention keys/values and ``cand_proj``). Decoding is
``pointer-mmr`` with max: GRU update, step embedding [S, h], MMR term with
``div_lambda`` [S]. Padded pool entries are masked out of the self-attention.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lever_trainer.api import About, TrunkConfig, dropout, hookimpl

from ._decoders import MmrPointerPolicy, attention, shots_from

NAME = "pointer-set-encoder"


class SetEncoderPolicy(MmrPointerPolicy):
    """Trunk, ``cand_encoder.layers.0`` (pre-LN encoder layer), GRU, step_emb, div_lambda."""

    policy_name = NAME

    def __init__(self, config: TrunkConfig, shots: int) -> None:
        super().__init__(config, shots, reduction="max", step_rows=shots, use_gru=True)
        h = config.hidden_dim
        layer = nn.TransformerEncoderLayer(
            d_model=h,
            nhead=1,
            dim_feedforward=4 * h,
            dropout=config.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.cand_encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)

    def encode_pool(self, c1: torch.Tensor, pool_mask: torch.Tensor | None) -> torch.Tensor:
        """``X + SA(LN1(X))``, then ``X + FF(LN2(X))`` per layer (dropout in training)."""
        pad = None if pool_mask is None else ~pool_mask
        p, training = self.config.dropout, self.training
        x = c1
        for layer in self.cand_encoder.layers:
            assert isinstance(layer, nn.TransformerEncoderLayer)
            y = layer.norm1(x)
            x = x + dropout(attention(layer.self_attn, y, y, y, pad, training), p, training)
            y = F.gelu(layer.linear1(layer.norm2(x)))
            x = x + dropout(layer.linear2(dropout(y, p, training)), p, training)
        return x


@hookimpl
def about() -> About:
    """On by default: a policy is used only when ``--policy`` names it."""
    return About(
        description=(
            "policy `pointer-set-encoder`: upstream V4-4, pool self-attention encoder + V4-3"
        ),
        enabled_by_default=True,
    )


@hookimpl
def policies() -> dict[str, Callable[[int, Mapping[str, Any]], SetEncoderPolicy]]:
    """The one policy this plugin builds."""
    return {NAME: build}


def build(input_dim: int, options: Mapping[str, Any]) -> SetEncoderPolicy:
    """Build ``pointer-set-encoder`` from the trunk options and ``shots``."""
    return SetEncoderPolicy(TrunkConfig.from_options(input_dim, options), shots_from(options))

"""Policy ``pointer-two-stage``: upstream V4-9 (``PointerSelectorV4_9``), top-M refinement.

Each step first scores the pool cheaply (``c = <h~, c_k> / tau``, earlier choices at
-100), keeps the M best (``--two-stage-top-m``, default 8; padded entries never
count), and re-scores only those with ``--refine-head`` (upstream ``--refine_type``):

* ``attn`` (default): ``a = Attn(h~, U, U)``, ``r = normalise(LN(a + h~))``,
  ``rho_m = <r, normalise(U_m)>``;
* ``mlp``: ``rho_m = MLP([h~; U_m])`` (Linear 2h -> h, ReLU, dropout, Linear h -> 1).

Logits are -100 outside the top M and ``rho / tau`` inside, then the chosen-item mask;
a teacher-forced label outside the top M has logit -100. The top-M choice is hard (no
gradient). Then the GRU update; step embedding [S, h]. Upstream's ``refine_score``
(attn head) is built but never used, and is kept so checkpoints load.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lever_trainer.api import (
    CHOSEN_LOGIT,
    About,
    LeverError,
    Option,
    TrunkConfig,
    dropout,
    hookimpl,
    one_token_attention,
)

from ._decoders import Encoding, StepPointerPolicy, gather_rows, option_value, shots_from

NAME = "pointer-two-stage"
HEADS = ("attn", "mlp")
DEFAULT_TOP_M = 8


class TwoStagePointerPolicy(StepPointerPolicy):
    """Trunk, GRU, ``step_emb`` [S, h] and the refine head.

    attn: ``refine_attn`` (multi-head attention), ``refine_norm``, ``refine_score``
    (unused); mlp: ``refine_mlp`` (``0``: Linear 2h -> h, ``3``: Linear h -> 1).
    """

    policy_name = NAME

    def __init__(
        self, config: TrunkConfig, shots: int, head: str = "attn", top_m: int = DEFAULT_TOP_M
    ) -> None:
        super().__init__(
            config,
            shots,
            {"refine_head": head, "two_stage_top_m": top_m},
            step_rows=shots,
            use_gru=True,
        )
        h = config.hidden_dim
        self.head = head
        self.top_m = top_m
        if head == "attn":
            self.refine_attn = nn.MultiheadAttention(
                h, config.num_heads, dropout=config.attn_dropout, batch_first=True
            )
            self.refine_norm = nn.LayerNorm(h)
            self.refine_score = nn.Linear(h, 1, bias=True)
        else:
            self.refine_mlp = nn.Sequential(
                nn.Linear(2 * h, h), nn.ReLU(), nn.Dropout(config.dropout), nn.Linear(h, 1)
            )

    def refine(
        self, state: torch.Tensor, sub: torch.Tensor, sub_pad: torch.Tensor | None
    ) -> torch.Tensor:
        """Refined scores [B, G, M] of the top-M keys ``sub`` [B, G, M, h]."""
        batch, groups, m, h = sub.shape
        if self.head == "attn":
            q = state.reshape(-1, h)
            u = sub.reshape(-1, m, h)
            pad = None if sub_pad is None else sub_pad.reshape(-1, m)
            a = one_token_attention(self.refine_attn, q, u, pad, self.training)
            r = F.normalize(self.refine_norm(a + q), dim=-1)
            rho = torch.bmm(F.normalize(u, dim=-1), r.unsqueeze(-1)).squeeze(-1)
            return rho.view(batch, groups, m)
        both = torch.cat([state.unsqueeze(2).expand(batch, groups, m, h), sub], dim=-1)
        hidden = torch.relu(self.refine_mlp[0](both))
        hidden = dropout(hidden, self.config.dropout, self.training)
        return self.refine_mlp[3](hidden).squeeze(-1)  # type: ignore[no-any-return]

    def step_scores(
        self,
        context: Encoding,
        memory: list[torch.Tensor],
        state: torch.Tensor,
        step: int,
        chosen: torch.Tensor,
        pad: torch.Tensor | None,
    ) -> torch.Tensor:
        """-100 outside the top M of the cheap scores, ``rho / tau`` inside."""
        keys = context[1]
        cheap = super().step_scores(context, memory, state, step, chosen, pad)
        cheap = self.step_logits(cheap, chosen, pad)  # chosen -100, padding -inf
        m = min(self.top_m, keys.shape[1])
        top = cheap.topk(m, dim=-1).indices  # [B, G, M]
        sub_pad = None if pad is None else torch.gather(pad.expand_as(cheap), 2, top)
        rho = self.scale(self.refine(state, gather_rows(keys, top), sub_pad))
        return torch.full_like(cheap, CHOSEN_LOGIT).scatter(2, top, rho)


REFINE_HEAD = Option(
    flags=("--refine-head", "--refine_type"),
    type="choice",
    choices=HEADS,
    default="attn",
    dest="refine_head",
    help="pointer-two-stage: re-scoring head of the top M (attn|mlp); upstream --refine_type",
)
TWO_STAGE_TOP_M = Option(
    flags=("--two-stage-top-m", "--top_m"),
    type="int",
    default=DEFAULT_TOP_M,
    min=1,
    dest="two_stage_top_m",
    help="pointer-two-stage: how many cheap-score leaders are re-scored; upstream --top_m",
)


@hookimpl
def add_options() -> Sequence[Option]:
    """``--refine-head`` and ``--two-stage-top-m``."""
    return [
        REFINE_HEAD,
        TWO_STAGE_TOP_M,
    ]


@hookimpl
def about() -> About:
    """On by default: a policy is used only when ``--policy`` names it."""
    return About(
        description=(
            "policy `pointer-two-stage`: upstream V4-9, cheap top-M then attn/MLP re-scoring"
        ),
        enabled_by_default=True,
    )


@hookimpl
def policies() -> dict[str, Callable[[int, Mapping[str, Any]], TwoStagePointerPolicy]]:
    """The one policy this plugin builds."""
    return {NAME: build}


def build(input_dim: int, options: Mapping[str, Any]) -> TwoStagePointerPolicy:
    """Build ``pointer-two-stage`` from the trunk options, ``shots`` and its own options."""
    top_m = int(option_value(options, TWO_STAGE_TOP_M))
    if top_m < 1:
        raise LeverError(f"--two-stage-top-m must be at least 1, got {top_m}")
    return TwoStagePointerPolicy(
        TrunkConfig.from_options(input_dim, options),
        shots_from(options),
        head=str(option_value(options, REFINE_HEAD)),
        top_m=top_m,
    )

"""Policy ``pointer-additive``: upstream V4-5 (``PointerSelectorV4_5``), a learned scoring head.

As ``pointer-gru`` (GRU update, step embedding [S, h]) with the step score s_t[k]
replaced by ``--scoring-head`` (upstream ``--attention_type``), and logits ``s / tau``:

* ``additive`` (default): ``attn_v . tanh(attn_Wq h~ + attn_Wc c_k)`` (Bahdanau);
* ``bilinear``: ``h~^T B c_k`` with ``B = bilinear.weight[0]``;
* ``dot``: ``<h~, c_k>``, i.e. ``pointer-gru``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lever_trainer.api import About, Option, TrunkConfig, hookimpl

from ._decoders import Encoding, StepPointerPolicy, option_value, shots_from

NAME = "pointer-additive"
HEADS = ("additive", "bilinear", "dot")


class AdditivePointerPolicy(StepPointerPolicy):
    """Trunk, ``decoder_gru``, ``step_emb`` [S, h] and the head's parameters.

    additive: ``attn_Wq`` (h -> h, bias), ``attn_Wc`` (h -> h), ``attn_v`` (h -> 1);
    bilinear: ``bilinear`` (``nn.Bilinear(h, h, 1)``, no bias); dot: none.
    """

    policy_name = NAME

    def __init__(self, config: TrunkConfig, shots: int, head: str = "additive") -> None:
        super().__init__(config, shots, {"scoring_head": head}, step_rows=shots, use_gru=True)
        h = config.hidden_dim
        self.head = head
        if head == "additive":
            self.attn_Wq = nn.Linear(h, h, bias=True)
            self.attn_Wc = nn.Linear(h, h, bias=False)
            self.attn_v = nn.Linear(h, 1, bias=False)
            nn.init.xavier_uniform_(self.attn_Wq.weight)
            nn.init.zeros_(self.attn_Wq.bias)
            nn.init.xavier_uniform_(self.attn_Wc.weight)
            nn.init.xavier_uniform_(self.attn_v.weight)
            with torch.no_grad():
                self.attn_v.weight.mul_(0.1)
        elif head == "bilinear":
            self.bilinear = nn.Bilinear(h, h, 1, bias=False)
            nn.init.xavier_uniform_(self.bilinear.weight)

    def prepare(self, encoding: tuple[torch.Tensor, torch.Tensor]) -> Encoding:
        """``(z, keys)``, plus ``attn_Wc keys`` [B, K, h] for the additive head."""
        z, keys = encoding
        if self.head == "additive":
            return z, keys, self.attn_Wc(keys)
        return z, keys

    def step_scores(
        self,
        context: Encoding,
        memory: list[torch.Tensor],
        state: torch.Tensor,
        step: int,
        chosen: torch.Tensor,
        pad: torch.Tensor | None,
    ) -> torch.Tensor:
        """``s_t / tau`` [B, G, K] for the configured head."""
        keys = context[1]
        if self.head == "additive":
            q = self.attn_Wq(state).unsqueeze(2)  # [B, G, 1, h]
            combined = torch.tanh(q + context[2].unsqueeze(1))  # [B, G, K, h]
            return self.scale(self.attn_v(combined).squeeze(-1))
        if self.head == "bilinear":
            left = torch.matmul(state, self.bilinear.weight[0])  # [B, G, h]
            return self.scale(torch.bmm(left, keys.transpose(1, 2)))
        return super().step_scores(context, memory, state, step, chosen, pad)


SCORING_HEAD = Option(
    flags=("--scoring-head", "--attention_type"),
    type="choice",
    choices=HEADS,
    default="additive",
    dest="scoring_head",
    help="pointer-additive: step scoring head (additive|bilinear|dot); upstream --attention_type",
)


@hookimpl
def add_options() -> Sequence[Option]:
    """``--scoring-head``."""
    return [SCORING_HEAD]


@hookimpl
def about() -> About:
    """On by default: a policy is used only when ``--policy`` names it."""
    return About(
        description=(
            "policy `pointer-additive`: upstream V4-5, V4-2 with an additive/bilinear/dot head"
        ),
        enabled_by_default=True,
    )


@hookimpl
def policies() -> dict[str, Callable[[int, Mapping[str, Any]], AdditivePointerPolicy]]:
    """The one policy this plugin builds."""
    return {NAME: build}


def build(input_dim: int, options: Mapping[str, Any]) -> AdditivePointerPolicy:
    """Build ``pointer-additive`` from the trunk options, ``shots`` and ``scoring_head``."""
    return AdditivePointerPolicy(
        TrunkConfig.from_options(input_dim, options),
        shots_from(options),
        head=str(option_value(options, SCORING_HEAD)),
    )

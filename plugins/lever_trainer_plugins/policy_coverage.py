"""Policy ``pointer-coverage``: upstream V4-6 (``PointerSelectorV4_6``), topic coverage gain.

Computed once per query: each item's distribution over 16 learned topics,
``T = softmax(c . normalise(topic_prototypes)^T)``, and the query's need
``need = softmax(query_topic_head(h0))``. For t >= 1 the logits gain
``softplus(cover_lambda) * sum_m need_m * clamp(1 - covered_m, 0, 1) * T[k, m]``; after
each choice ``covered = min(covered + T[chosen], 1)``, then the GRU update.
``step_emb`` has 8 rows whatever S is (steps past 7 reuse row 7), and
``cover_lambda`` starts at -2.0 (upstream's sentinel for an init of 0.0).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lever_trainer.api import About, TrunkConfig, hookimpl

from ._decoders import Encoding, StepPointerPolicy, gather_rows, lambda_init, shots_from

NAME = "pointer-coverage"
#: Upstream's constants: topics, step-embedding rows, cover_lambda_init.
NUM_TOPICS = 16
STEP_ROWS = 8
COVER_LAMBDA_INIT = 0.0


class CoveragePointerPolicy(StepPointerPolicy):
    """Trunk, GRU, ``step_emb`` [8, h], ``topic_prototypes`` [16, h],
    ``query_topic_head`` (h -> 16) and ``cover_lambda`` (a scalar)."""

    policy_name = NAME

    def __init__(self, config: TrunkConfig, shots: int) -> None:
        super().__init__(config, shots, step_rows=STEP_ROWS, use_gru=True)
        h = config.hidden_dim
        self.topic_prototypes = nn.Parameter(torch.empty(NUM_TOPICS, h))
        self.query_topic_head = nn.Linear(h, NUM_TOPICS, bias=True)
        self.cover_lambda = nn.Parameter(torch.tensor(lambda_init(COVER_LAMBDA_INIT)))
        nn.init.normal_(self.topic_prototypes, mean=0.0, std=0.02)
        nn.init.xavier_uniform_(self.query_topic_head.weight)
        nn.init.zeros_(self.query_topic_head.bias)

    def prepare(self, encoding: tuple[torch.Tensor, torch.Tensor]) -> Encoding:
        """``(z, keys, T [B, K, 16], need [B, 16])``."""
        z, keys = encoding
        proto = F.normalize(self.topic_prototypes, dim=-1)
        topics = torch.softmax(torch.matmul(keys, proto.t()), dim=-1)
        need = torch.softmax(self.query_topic_head(z), dim=-1)
        return z, keys, topics, need

    def begin(self, context: Encoding, batch: int, groups: int) -> list[torch.Tensor]:
        """``[covered]``: zeros [B, G, 16]."""
        need = context[3]
        return [need.new_zeros(batch, groups, need.shape[-1])]

    def step_scores(
        self,
        context: Encoding,
        memory: list[torch.Tensor],
        state: torch.Tensor,
        step: int,
        chosen: torch.Tensor,
        pad: torch.Tensor | None,
    ) -> torch.Tensor:
        """``keys . h~ / tau`` plus, for t >= 1, ``softplus(cover_lambda) * gain``."""
        scores = super().step_scores(context, memory, state, step, chosen, pad)
        if step == 0:
            return scores
        topics, need = context[2], context[3]
        uncovered = (1.0 - memory[0]).clamp(min=0.0, max=1.0)  # [B, G, 16]
        gain = torch.bmm(need.unsqueeze(1) * uncovered, topics.transpose(1, 2))  # [B, G, K]
        return scores + F.softplus(self.cover_lambda) * gain

    def remember(
        self,
        context: Encoding,
        memory: list[torch.Tensor],
        pos: torch.Tensor,
        chosen_key: torch.Tensor,
    ) -> None:
        """``covered = min(covered + T[chosen], 1)``."""
        memory[0] = (memory[0] + gather_rows(context[2], pos)).clamp(max=1.0)


@hookimpl
def about() -> About:
    """On by default: a policy is used only when ``--policy`` names it."""
    return About(
        description="policy `pointer-coverage`: upstream V4-6, V4-2 + learned topic-coverage gain",
        enabled_by_default=True,
    )


@hookimpl
def policies() -> dict[str, Callable[[int, Mapping[str, Any]], CoveragePointerPolicy]]:
    """The one policy this plugin builds."""
    return {NAME: build}


def build(input_dim: int, options: Mapping[str, Any]) -> CoveragePointerPolicy:
    """Build ``pointer-coverage`` from the trunk options and ``shots``."""
    return CoveragePointerPolicy(TrunkConfig.from_options(input_dim, options), shots_from(options))

"""Policy ``pointer-mmr``: upstream V4-3 (``PointerSelectorV4_3``), V4-2 plus an MMR term.

As ``pointer-gru`` (GRU update, step embedding [S, h]), and for t >= 1 the logits lose
``softplus(div_lambda[t]) * red_k``, where ``red_k`` is the max (default) or the mean
of item k's cosine similarity to the items chosen so far. ``div_lambda`` [S] starts at
0.1. At S = 2 max and mean coincide (one earlier choice at the last step).
``--mmr-no-gru`` (upstream ``--no_gru``) keeps the state at its initial value.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lever_trainer.api import About, Option, TrunkConfig, hookimpl

from ._decoders import MmrPointerPolicy, option_value, shots_from

NAME = "pointer-mmr"
REDUCTIONS = ("max", "mean")


class MmrPolicy(MmrPointerPolicy):
    """Trunk, ``decoder_gru``, ``step_emb`` [S, h] and ``div_lambda`` [S]."""

    policy_name = NAME

    def __init__(
        self, config: TrunkConfig, shots: int, reduction: str = "max", no_gru: bool = False
    ) -> None:
        super().__init__(
            config,
            shots,
            {"mmr_reduction": reduction, "mmr_no_gru": no_gru},
            reduction=reduction,
            step_rows=shots,
            use_gru=not no_gru,
        )


MMR_REDUCTION = Option(
    flags=("--mmr-reduction", "--mmr_reduction"),
    type="choice",
    choices=REDUCTIONS,
    default="max",
    dest="mmr_reduction",
    help="pointer-mmr: how the similarities to earlier choices combine (max|mean)",
)
MMR_NO_GRU = Option(
    flags=("--mmr-no-gru", "--no_gru"),
    type="bool",
    default=False,
    dest="mmr_no_gru",
    help="pointer-mmr: no GRU state update (the state stays h0); upstream --no_gru",
)


@hookimpl
def add_options() -> Sequence[Option]:
    """``--mmr-reduction`` and ``--mmr-no-gru``."""
    return [
        MMR_REDUCTION,
        MMR_NO_GRU,
    ]


@hookimpl
def about() -> About:
    """On by default: a policy is used only when ``--policy`` names it."""
    return About(
        description="policy `pointer-mmr`: upstream V4-3, V4-2 + learned MMR redundancy penalty",
        enabled_by_default=True,
    )


@hookimpl
def policies() -> dict[str, Callable[[int, Mapping[str, Any]], MmrPolicy]]:
    """The one policy this plugin builds."""
    return {NAME: build}


def build(input_dim: int, options: Mapping[str, Any]) -> MmrPolicy:
    """Build ``pointer-mmr`` from the trunk options, ``shots`` and its own options."""
    return MmrPolicy(
        TrunkConfig.from_options(input_dim, options),
        shots_from(options),
        reduction=str(option_value(options, MMR_REDUCTION)),
        no_gru=bool(option_value(options, MMR_NO_GRU)),
    )

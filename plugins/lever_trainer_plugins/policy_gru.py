"""Policy ``pointer-gru``: upstream V4-2 (``PointerSelectorV4_2``), GRU update + step embedding.

At step t the state is ``h~ = normalise(h + step_emb[t])`` and
``logit_k = <h~, c_k> / tau``; after the choice, ``h = normalise(GRU(c_chosen, h))``
(the GRU consumes h, not h~). ``step_emb`` has S rows (S = ``shots``); steps past S
reuse the last row. ``--gru-no-step-emb`` (upstream ``--no_step_emb``) drops it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lever_trainer.api import About, Option, TrunkConfig, hookimpl

from ._decoders import StepPointerPolicy, option_value, shots_from

NAME = "pointer-gru"


class GruPointerPolicy(StepPointerPolicy):
    """Trunk, GRU state update (``decoder_gru``) and step embedding (``step_emb`` [S, h])."""

    policy_name = NAME

    def __init__(self, config: TrunkConfig, shots: int, no_step_emb: bool = False) -> None:
        super().__init__(
            config,
            shots,
            {"gru_no_step_emb": no_step_emb},
            step_rows=0 if no_step_emb else shots,
            use_gru=True,
        )


GRU_NO_STEP_EMB = Option(
    flags=("--gru-no-step-emb", "--no_step_emb"),
    type="bool",
    default=False,
    dest="gru_no_step_emb",
    help="pointer-gru: no step embedding (h~ = h); upstream --no_step_emb",
)


@hookimpl
def add_options() -> Sequence[Option]:
    """``--gru-no-step-emb``."""
    return [GRU_NO_STEP_EMB]


@hookimpl
def about() -> About:
    """On by default: a policy is used only when ``--policy`` names it."""
    return About(
        description="policy `pointer-gru`: upstream V4-2, GRU state update + per-step embedding",
        enabled_by_default=True,
    )


@hookimpl
def policies() -> dict[str, Callable[[int, Mapping[str, Any]], GruPointerPolicy]]:
    """The one policy this plugin builds."""
    return {NAME: build}


def build(input_dim: int, options: Mapping[str, Any]) -> GruPointerPolicy:
    """Build ``pointer-gru`` from the trunk options, ``shots`` and ``gru_no_step_emb``."""
    return GruPointerPolicy(
        TrunkConfig.from_options(input_dim, options),
        shots_from(options),
        no_step_emb=bool(option_value(options, GRU_NO_STEP_EMB)),
    )

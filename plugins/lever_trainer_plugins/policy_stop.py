"""Policy ``pointer-stop``: upstream V4-10 (``PointerSelectorV4_10``), a learned STOP item.

The pool gains one item after its last column: ``normalise(stop_token)``, so the logits
have K + 1 columns and column K is STOP (with padded pools K is the padded width: the
padded columns are -inf and STOP follows them). Per step, as ``pointer-gru``
(GRU update, step embedding [S, h]), except:

* STOP is never masked: only chosen pool items get -100;
* once STOP has been chosen (label or argmax), every later row is -100 everywhere but
  0 at STOP (padded columns stay -inf), so a STOP label there has log-prob 0 and any
  other -100;
* the state is frozen from the STOP step on (that step's GRU update is discarded too).

Greedy decoding that picks STOP keeps predicting STOP (column K) for the remaining
steps; a prediction >= K means "no further demonstration", so the selected list is
shorter than S.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lever_trainer.api import CHOSEN_LOGIT, About, TrunkConfig, decode_steps, hookimpl

from ._decoders import StepPointerPolicy, gather_rows, shots_from

NAME = "pointer-stop"


class StopPointerPolicy(StepPointerPolicy):
    """Trunk, GRU, ``step_emb`` [S, h] and ``stop_token`` [1, h]."""

    policy_name = NAME
    extra_items: ClassVar[int] = 1

    def __init__(self, config: TrunkConfig, shots: int) -> None:
        super().__init__(config, shots, step_rows=shots, use_gru=True)
        self.stop_token = nn.Parameter(torch.empty(1, config.hidden_dim))
        nn.init.normal_(self.stop_token, mean=0.0, std=0.02)

    def decode(
        self,
        encoding: tuple[torch.Tensor, torch.Tensor],
        pool_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_steps: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, G, S, K + 1] and predictions [B, G, S]; column K is STOP."""
        z, keys = encoding
        groups, steps = decode_steps(labels, num_steps)
        batch, pool, h = keys.shape
        stop = F.normalize(self.stop_token, dim=-1).expand(batch, 1, h)
        items = torch.cat([keys, stop], dim=1)  # [B, K + 1, h]: the pool, then STOP
        width = pool + 1
        stop_idx = width - 1
        device = items.device
        state = z.unsqueeze(1).expand(batch, groups, h)
        chosen = torch.zeros(batch, groups, width, dtype=torch.bool, device=device)
        ended = torch.zeros(batch, groups, 1, dtype=torch.bool, device=device)
        pad = None
        if pool_mask is not None:
            no_pad = torch.zeros(batch, 1, dtype=torch.bool, device=device)
            pad = torch.cat([~pool_mask, no_pad], dim=1).unsqueeze(1)  # [B, 1, K + 1]
        stop_only = torch.full((width,), CHOSEN_LOGIT, device=device, dtype=items.dtype)
        stop_only[stop_idx] = 0.0
        items_t = items.transpose(1, 2)
        all_logits, all_preds = [], []
        for t in range(steps):
            h_t = self.step_state(state, t)
            scores = self.scale(torch.bmm(h_t, items_t))
            logits = torch.where(ended, stop_only, scores.masked_fill(chosen, CHOSEN_LOGIT))
            if pad is not None:
                logits = logits.masked_fill(pad, float("-inf"))
            preds = logits.argmax(dim=-1)
            all_logits.append(logits)
            all_preds.append(preds)
            if t == steps - 1:
                break
            pos = preds if labels is None else labels[:, :, t]
            is_stop = (pos == stop_idx).unsqueeze(-1)  # [B, G, 1]
            ended = ended | is_stop
            chosen = chosen | (F.one_hot(pos, width).bool() & ~is_stop)
            new_state = self.gru_update(gather_rows(items, pos), state)
            state = torch.where(ended, state, new_state)
        return torch.stack(all_logits, dim=2), torch.stack(all_preds, dim=2)


@hookimpl
def about() -> About:
    """On by default: a policy is used only when ``--policy`` names it."""
    return About(
        description=(
            "policy `pointer-stop`: upstream V4-10, V4-2 + a learned STOP item (fewer shots)"
        ),
        enabled_by_default=True,
    )


@hookimpl
def policies() -> dict[str, Callable[[int, Mapping[str, Any]], StopPointerPolicy]]:
    """The one policy this plugin builds."""
    return {NAME: build}


def build(input_dim: int, options: Mapping[str, Any]) -> StopPointerPolicy:
    """Build ``pointer-stop`` from the trunk options and ``shots``."""
    return StopPointerPolicy(TrunkConfig.from_options(input_dim, options), shots_from(options))

"""Freeze the backbone (input_proj, query_proj, cand_proj) during GRPO only."""

from __future__ import annotations

from torch import nn

from lever_trainer import TrainState, hookimpl
from lever_trainer.model import BACKBONE_MODULES, PointerPolicy

DESCRIPTION = "freeze input_proj, query_proj, cand_proj at the start of GRPO"


@hookimpl
def configure_trainable_params(state: TrainState, model: nn.Module) -> None:
    """At the GRPO phase start, stop gradients to the backbone and report the split."""
    if state.phase != "grpo":
        return
    if not isinstance(model, PointerPolicy):
        raise TypeError(f"freeze-backbone expects a PointerPolicy, got {type(model).__name__}")
    for _, param in model.backbone_parameters():
        param.requires_grad_(False)
    present = [m for m in BACKBONE_MODULES if any(True for _ in getattr(model, m).parameters())]
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state.log(f"freeze-backbone: frozen modules: {', '.join(present)}")
    state.log(f"trainable params: {trainable:,} / {total:,} ({100.0 * trainable / total:.1f}%)")

"""Freeze the policy's backbone during GRPO only (the policy names its backbone).

A run where phase ``online`` trains and ``grpo`` does not refuses it at start-up.

For the built-in policies the backbone is ``input_proj``, ``query_proj`` and
``cand_proj`` (see docs/algorithm.md); any policy says which of its modules form it through
``backbone_modules`` / ``backbone_parameters()``.
"""

from __future__ import annotations

from torch import nn

from lever_trainer.api import About, Policy, TrainState, hookimpl

from ._group_objective import refuse_unless_applied


@hookimpl
def about() -> About:
    """``--freeze_backbone_in_grpo`` (the seed script's flag) asks for it."""
    return About(
        description="freeze the policy's backbone (input_proj, query_proj, cand_proj) at the "
        "start of GRPO",
        enable_flags=("--freeze_backbone_in_grpo",),
    )


@hookimpl
def on_train_start(state: TrainState) -> None:
    """Refuse a run where only ``online`` would learn from groups: this plugin freezes
    nothing there."""
    refuse_unless_applied(state, "freeze-backbone", {"grpo"}, "it freezes during GRPO")


@hookimpl
def configure_trainable_params(state: TrainState, model: nn.Module) -> None:
    """At the GRPO phase start, stop gradients to the backbone and report the split."""
    if state.phase != "grpo":
        return
    if not isinstance(model, Policy):
        raise TypeError(
            f"freeze-backbone expects a lever_trainer Policy, got {type(model).__name__}"
        )
    frozen = model.backbone_parameters()
    if not frozen:
        state.log(
            f"warning: freeze-backbone: policy {model.policy_name} has no backbone "
            "(no backbone_modules); nothing is frozen"
        )
        return
    for _, param in frozen:
        param.requires_grad_(False)
    present = [m for m in model.backbone_modules if any(n.split(".")[0] == m for n, _ in frozen)]
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state.log(f"freeze-backbone: frozen modules: {', '.join(present)}")
    state.log(f"trainable params: {trainable:,} / {total:,} ({100.0 * trainable / total:.1f}%)")

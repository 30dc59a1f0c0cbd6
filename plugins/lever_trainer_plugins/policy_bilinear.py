"""Policy ``cosine-bilinear``: cosine similarity plus a learned bilinear residual per position.

Position t of the sequence scores pool item k by

    logit_t,k = beta * (q . c_k + q^T A_t c_k + c_k^T B_t c_k + w_t . c_k) / tau_p

with q and c_k the L2-normalised query and item embeddings, A_t, B_t [d, d] and w_t [d]
starting at 0 and beta (one learnable scale) at 1: the untrained policy *is* cosine
similarity at temperature tau_p, and training learns a small correction to that metric
per position. Items already chosen get -100, padded ones -inf. No attention, no
dropout; about 2 d^2 parameters per position.

The candidate term ``c^T B_t c`` scores an item on its own, whatever the query: how
far an item lies from queries in the space the downstream model compares them in
depends on the item as well as on its direction (a normalised embedding has lost its
length). ``--bilinear-candidate-term off`` leaves it out (and checkpoints written
without it load without it).

With ``--bilinear-order reverse`` (the default) the policy decides the **last** position
first, then the earlier ones over the remaining items. Logits, labels and predictions
stay indexed by sequence position and the sequence log-prob is still
``sum_t log_softmax(logits_t)[y_t]`` (the factorisation p(y_S) p(y_S-1 | y_S) ...), so
RCE and GRPO apply unchanged. Downstream models that weigh the last demonstration most
(recency) get the policy's best item in the slot that counts.

``--bilinear-order auto`` lets the training data decide, once, when
training starts: the starting policy's greedy sequence of every training query (the
validation split left out) is taken in both orders, and the order whose sequence the
judge found correct more often — counted over the queries whose logged candidates hold
both sequences — is kept (``reverse`` on a tie, when no query holds both, and when a
phase of the run learns the last position on its own, ``assumes_last_first``). The run
prints the counts; the checkpoint records the order chosen, so ``select`` decodes as the
run did. Soft rewards are not used for the choice: the soft score favours the last
slot's similarity whichever order answers better.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lever_trainer.api import (
    CHOSEN_LOGIT,
    POLICY_TEMPERATURE,
    SELECT_SHOTS,
    About,
    Option,
    Policy,
    TrainState,
    decode_steps,
    hookimpl,
    pool_batches,
)

NAME = "cosine-bilinear"

ORDERS = ("reverse", "forward")
#: ``--bilinear-order`` values: an order, or ``auto`` (chosen from the training data)
ORDER_CHOICES = ("auto", *ORDERS)


class CosineBilinearPolicy(Policy):
    """Cosine similarity with a per-position bilinear residual (see module docstring)."""

    policy_name = "cosine-bilinear"

    def __init__(
        self,
        input_dim: int,
        shots: int,
        temperature: float,
        order: str,
        candidate_term: bool = False,
    ) -> None:
        super().__init__()
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        self.input_dim, self.shots, self.temperature, self.order = (
            input_dim,
            shots,
            temperature,
            order,
        )
        self.candidate_term = candidate_term
        self.bilinear = nn.Parameter(torch.zeros(shots, input_dim, input_dim))
        self.item_bias = nn.Parameter(torch.zeros(shots, input_dim))
        self.log_scale = nn.Parameter(torch.zeros(()))
        if candidate_term:
            self.candidate_quadratic = nn.Parameter(torch.zeros(shots, input_dim, input_dim))

    def policy_options(self) -> dict[str, Any]:
        """Width-independent options: positions, temperature, order, candidate term."""
        return {
            "shots": self.shots,
            "temperature": self.temperature,
            "bilinear_order": self.order,
            "bilinear_candidate_term": "on" if self.candidate_term else "off",
        }

    def decode_order(self, steps: int) -> list[int]:
        """Last position first with ``reverse``."""
        order = list(range(steps))
        return order[::-1] if self.order == "reverse" else order

    def encode(
        self,
        query_emb: torch.Tensor,
        cand_emb: torch.Tensor,
        pool_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores [B, shots, K] of every item for every position (before masking)."""
        q = F.normalize(query_emb, dim=-1)
        c = F.normalize(cand_emb, dim=-1)
        state = q.unsqueeze(1) + torch.einsum("bd,nde->bne", q, self.bilinear) + self.item_bias
        scores = torch.einsum("bnd,bkd->bnk", state, c)
        if self.candidate_term:
            scores = scores + torch.einsum("bkd,nde,bke->bnk", c, self.candidate_quadratic, c)
        return scores * (self.log_scale.exp() / self.temperature)

    def decode(
        self,
        encoding: torch.Tensor,
        pool_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_steps: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions in ``decode_order``; each masks the items chosen before it."""
        groups, steps = decode_steps(labels, num_steps)
        batch, _, pool = encoding.shape
        chosen = torch.zeros(batch, groups, pool, dtype=torch.bool, device=encoding.device)
        pad = None if pool_mask is None else ~pool_mask.unsqueeze(1)
        logits_at: list[torch.Tensor] = [encoding[:, :1]] * steps
        preds_at: list[torch.Tensor] = [encoding.new_zeros(0)] * steps
        order = self.decode_order(steps)
        for i, t in enumerate(order):
            row = encoding[:, min(t, self.shots - 1)].unsqueeze(1).expand(batch, groups, pool)
            logits = row.masked_fill(chosen, CHOSEN_LOGIT)
            if pad is not None:
                logits = logits.masked_fill(pad, float("-inf"))
            preds = logits.argmax(dim=-1)
            logits_at[t], preds_at[t] = logits, preds
            if i == steps - 1:
                break
            pos = preds if labels is None else labels[:, :, t]
            chosen = chosen.scatter(2, pos.unsqueeze(-1), True)
        return torch.stack(logits_at, dim=2), torch.stack(preds_at, dim=2)


@hookimpl
def about() -> About:
    """On by default: a policy is used only when ``--policy`` names it."""
    return About(
        description="policy `cosine-bilinear`: cosine + learned bilinear residual per position",
        enabled_by_default=True,
    )


@hookimpl
def policies() -> dict[str, Callable[[int, Mapping[str, Any]], CosineBilinearPolicy]]:
    """The one policy this plugin builds."""
    return {NAME: build}


def build(input_dim: int, options: Mapping[str, Any]) -> CosineBilinearPolicy:
    """``cosine-bilinear`` with ``shots`` positions, ``temperature`` (0.1), the order and
    the candidate term (off when the options do not name it: a checkpoint written before
    it existed)."""
    temperature = POLICY_TEMPERATURE.of(options)
    return CosineBilinearPolicy(
        input_dim,
        int(SELECT_SHOTS.of(options) or 2),
        0.1 if temperature is None else float(temperature),
        _build_order(BILINEAR_ORDER.of(options)),
        BILINEAR_CANDIDATE_TERM.of(options, missing="off") == "on",
    )


BILINEAR_ORDER = Option(
    ("--bilinear-order",),
    "choice",
    "reverse",
    "cosine-bilinear: decide the last position first (reverse), the first (forward), or "
    "whichever the training data's verdicts favour when training starts (auto).",
    dest="bilinear_order",
    choices=ORDER_CHOICES,
)
BILINEAR_CANDIDATE_TERM = Option(
    ("--bilinear-candidate-term",),
    "choice",
    "on",
    "cosine-bilinear: score each item on its own as well (c^T B c per position).",
    dest="bilinear_candidate_term",
    choices=("on", "off"),
)


def _build_order(value: Any) -> str:
    """The order a policy is built with: ``auto`` builds ``reverse`` until training
    chooses (a checkpoint records the chosen one; one without it decodes in reverse)."""
    return "reverse" if value in (None, "auto") else str(value)


@hookimpl
def on_train_start(state: TrainState) -> None:
    """``--bilinear-order auto``: the order the training data's verdicts favour."""
    model = state.model
    if not isinstance(model, CosineBilinearPolicy) or BILINEAR_ORDER.of(state.options) != "auto":
        return
    learners = [
        p.name
        for p in state.phases
        if getattr(p, "assumes_last_first", False) and p.epochs(state) > 0
    ]
    if learners:
        model.order = "reverse"
        state.log(f"--bilinear-order auto: reverse (phase {learners[0]} learns the last slot)")
        return
    correct = {order: _logged_correct(state, model, order) for order in ORDERS}
    both = correct["reverse"].keys() & correct["forward"].keys()
    counts = {order: sum(hits[q] for q in both) for order, hits in correct.items()}
    model.order = "forward" if counts["forward"] > counts["reverse"] else "reverse"
    state.log(
        f"--bilinear-order auto: {model.order} (the starting policy's sequences were correct "
        f"on {counts['reverse']:g} training queries in reverse order and {counts['forward']:g} "
        f"forward, of the {len(both)} whose logged candidates hold both)"
    )


@torch.no_grad()
def _logged_correct(state: TrainState, model: CosineBilinearPolicy, order: str) -> dict[int, float]:
    """``{training row: correctness}`` of the rows whose logged candidates hold the
    policy's greedy sequence in ``order`` (that candidate's correctness)."""
    table, emb = state.train, state.emb
    assert emb is not None
    was_order, was_training = model.order, model.training
    model.order = order
    model.eval()
    device = next(model.parameters()).device
    hits: dict[int, float] = {}
    try:
        for batch in pool_batches(table, emb, 256):
            b = batch.to(device)
            _, greedy = model.decode(
                model.encode(b.query_emb, b.cand_emb, b.pool_mask), b.pool_mask, None, table.seq_len
            )
            for row, seq in zip(batch.rows.tolist(), greedy[:, 0].cpu(), strict=True):
                n = int(table.group_len[row])
                same = (table.sequences[row, :n] == seq).all(-1).nonzero()
                if len(same):
                    hits[row] = float(table.correct[row, int(same[0])])
    finally:
        model.order = was_order
        model.train(was_training)
    return hits


@hookimpl
def add_options() -> Sequence[Option]:
    """The decoding order."""
    return [
        BILINEAR_ORDER,
        BILINEAR_CANDIDATE_TERM,
    ]

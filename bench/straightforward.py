"""The straightforward path: the reference implementation's structure, for comparison.

One query per optimiser step; the query and its whole pool are encoded again for
every logged candidate sequence (the query is repeated ``n`` times and the policy
runs on the ``[n, K, d]`` stack), with ``torch.nn.MultiheadAttention`` called as a
module. Same model parameters, same losses (``lever_trainer.losses``), so the only
difference from the trainer is the structure of the computation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lever_trainer.data import Embeddings, QueryTable
from lever_trainer.losses import (
    group_advantages,
    grpo_loss,
    rce_loss,
    rce_temperature,
    sequence_logprobs,
    top_k_mask,
)
from lever_trainer.policy import CHOSEN_LOGIT
from lever_trainer_plugins.pointer import PointerPolicy


def reference_forward(
    model: PointerPolicy,
    query: torch.Tensor,
    cands: torch.Tensor,
    labels: torch.Tensor | None,
    steps: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pointer policy written out literally: logits [B, S, K] and predictions [B, S]."""
    q1 = model.input_proj(query).unsqueeze(1)
    c1 = model.input_proj(cands)
    for attn, norm in zip(model.cross_attn_layers, model.attn_norms, strict=True):
        a, _ = attn(q1, c1, c1, need_weights=False)
        q1 = norm(a + q1)
    p = model.config.dropout
    z = F.normalize(model.query_proj(F.dropout(q1.squeeze(1), p, model.training)), dim=-1)
    keys = F.normalize(model.cand_proj(F.dropout(c1, p, model.training)), dim=-1)
    steps = labels.shape[1] if labels is not None else steps
    chosen = torch.zeros(keys.shape[:2], dtype=torch.bool)
    all_logits, all_preds = [], []
    for t in range(steps):
        logits = torch.einsum("bh,bkh->bk", z, keys) / model.config.temperature
        logits = logits.masked_fill(chosen, CHOSEN_LOGIT)
        pred = logits.argmax(-1)
        all_logits.append(logits)
        all_preds.append(pred)
        pos = labels[:, t] if labels is not None else pred
        chosen = chosen.clone()
        chosen[torch.arange(len(pos)), pos] = True
        e = keys[torch.arange(len(pos)), pos]
        gate = torch.sigmoid(model.query_update_gate(torch.cat([z, e], dim=-1)))
        z = F.normalize(gate * z + (1 - gate) * e, dim=-1)
    return torch.stack(all_logits, 1), torch.stack(all_preds, 1)


def _query(table: QueryTable, emb: Embeddings, i: int) -> tuple[torch.Tensor, ...]:
    n, k = int(table.group_len[i]), int(table.pool_len[i])
    query = emb.query[table.query_ids[i]].unsqueeze(0)
    cands = emb.cand[table.pool_ids[i, :k]].unsqueeze(0)
    return query, cands, table.sequences[i, :n], table.rewards_raw[i, :n], table.rewards_norm[i, :n]


def logprobs_one(
    model: PointerPolicy, query: torch.Tensor, cands: torch.Tensor, seqs: torch.Tensor
) -> torch.Tensor:
    """Sequence log-probs [n] with the pool re-encoded for each of the n sequences."""
    n = seqs.shape[0]
    logits, _ = reference_forward(model, query.expand(n, -1), cands.expand(n, -1, -1), seqs)
    return sequence_logprobs(logits, seqs)


@torch.no_grad()
def reference_logprobs(
    model: PointerPolicy, table: QueryTable, emb: Embeddings, queries: int
) -> torch.Tensor:
    """Eval-mode log-probs [Q, G] of every candidate of the first ``queries`` queries."""
    model.eval()
    out = torch.zeros(table.rewards_raw.shape)
    for i in range(queries):
        query, cands, seqs, _, _ = _query(table, emb, i)
        out[i, : len(seqs)] = logprobs_one(model, query, cands, seqs)
    return out


def rce_epoch(model: PointerPolicy, table: QueryTable, emb: Embeddings, queries: int) -> None:
    """One RCE epoch over the first ``queries`` queries, one query per step."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    for i in range(queries):
        query, cands, seqs, raw, _ = _query(table, emb, i)
        lp = logprobs_one(model, query, cands, seqs)
        mask = torch.ones(1, len(raw), dtype=torch.bool)
        loss = rce_loss(
            lp.unsqueeze(0), raw.unsqueeze(0), mask, rce_temperature(i, queries, 2.0, 0.5)
        )
        opt.zero_grad()
        torch.autograd.backward(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


def grpo_epoch(
    model: PointerPolicy,
    table: QueryTable,
    emb: Embeddings,
    queries: int,
    ref: torch.Tensor,
    top_k: int = 3,
) -> None:
    """One GRPO epoch (top-k curriculum) over the first ``queries`` queries, one per step."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    for i in range(queries):
        query, cands, seqs, _, norm = _query(table, emb, i)
        keep = top_k_mask(norm.unsqueeze(0), torch.ones(1, len(norm), dtype=torch.bool), top_k)[0]
        idx = keep.nonzero().squeeze(1)
        lp = logprobs_one(model, query, cands, seqs[idx]).unsqueeze(0)
        mask = torch.ones_like(lp, dtype=torch.bool)
        adv = group_advantages(norm[idx].unsqueeze(0), mask)
        out = grpo_loss(lp, ref[i, idx].unsqueeze(0), adv, mask, 0.2, 0.1)
        opt.zero_grad()
        torch.autograd.backward(out["loss"])
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


@torch.no_grad()
def select(model: PointerPolicy, table: QueryTable, emb: Embeddings, queries: int) -> None:
    """Greedy selection of S demonstrations for each of the first ``queries`` queries."""
    model.eval()
    for i in range(queries):
        query, cands, _, _, _ = _query(table, emb, i)
        reference_forward(model, query, cands, None, table.seq_len)

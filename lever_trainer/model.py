"""The pointer policy (SPEC section 4).

The policy is split in two stages so that a batch can encode each query and its
pool once and then decode any number of candidate sequences against that encoding:

* :meth:`PointerPolicy.encode` projects the query and pool, runs the
  cross-attention layers, applies dropout and the two output projections, and
  returns the unit-norm state ``z`` [B, h] and keys ``c`` [B, K, h].
* :meth:`PointerPolicy.decode` runs the S pointer steps for ``G`` sequences per
  query at once ([B, G, S] labels), returning logits [B, G, S, K].

:meth:`PointerPolicy.forward` keeps the one-sequence-per-query signature of SPEC
section 4 (logits [B, S, K], predictions [B, S]).

Padded pool entries (``pool_mask`` False) are excluded from attention and get a
logit of ``-inf``, so they carry zero probability in every softmax; the ``-100``
given to already-chosen positions stays inside the softmax, as the SPEC says.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: Logit given to a pool position that was already chosen at an earlier step.
CHOSEN_LOGIT = -100.0

#: Parameter-name prefixes of the backbone; everything else is the pointer head.
BACKBONE_MODULES = ("input_proj", "query_proj", "cand_proj")
HEAD_MODULES = ("cross_attn_layers", "attn_norms", "query_update_gate")


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout, as :func:`torch.nn.functional.dropout`, with cheaper masks on CPU.

    Zeroes each element with probability ``p`` and scales the rest by ``1 / (1 - p)``.
    The mask compares random 16-bit integers with ``p * 2**16`` when that is a whole
    number (p = 0.5 is), else random 32-bit integers with ``p * 2**32``: four or two
    elements per 64-bit draw instead of one float each, which is what makes
    ``bernoulli_`` the most expensive step of a training batch on CPU.
    """
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return torch.zeros_like(x)
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    bits, dtype = (16, torch.int16) if float(p * 2**16).is_integer() else (32, torch.int32)
    threshold = p * 2**bits
    per_word = 64 // bits
    words = -(-x.numel() // per_word)
    raw = torch.randint(-(2**63), 2**63 - 1, (words,), dtype=torch.int64, device=x.device)
    draws = raw.view(dtype)[: x.numel()].view(x.shape)
    # draws are uniform on [-2**(bits-1), 2**(bits-1)); keep those at or above the cut
    keep = draws >= round(threshold) - 2 ** (bits - 1)
    out: torch.Tensor = x * keep * (1.0 / (1.0 - p))
    return out


@dataclass(frozen=True)
class PolicyConfig:
    """Hyper-parameters of the pointer policy (defaults from SPEC section 4)."""

    input_dim: int
    hidden_dim: int = 256
    num_layers: int = 1
    num_heads: int = 1
    attn_dropout: float = 0.1
    dropout: float = 0.5
    temperature: float = 0.1

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, for checkpoint metadata."""
        return asdict(self)


class PointerPolicy(nn.Module):
    """Cross-attention encoder plus a gated pointer decoder over a candidate pool."""

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        self.config = config
        d, h = config.input_dim, config.hidden_dim
        self.input_proj: nn.Module = nn.Identity() if d == h else nn.Linear(d, h, bias=False)
        self.cross_attn_layers = nn.ModuleList(
            nn.MultiheadAttention(
                h, config.num_heads, dropout=config.attn_dropout, batch_first=True
            )
            for _ in range(config.num_layers)
        )
        self.attn_norms = nn.ModuleList(nn.LayerNorm(h) for _ in range(config.num_layers))
        self.dropout = nn.Dropout(config.dropout)
        self.query_proj = nn.Linear(h, h, bias=False)
        self.cand_proj = nn.Linear(h, h, bias=False)
        self.query_update_gate = nn.Linear(2 * h, h)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """SPEC initialisation: Xavier for input_proj and the gate, identity+noise projections."""
        if isinstance(self.input_proj, nn.Linear):
            nn.init.xavier_uniform_(self.input_proj.weight)
        h = self.config.hidden_dim
        with torch.no_grad():
            for proj in (self.query_proj, self.cand_proj):
                proj.weight.copy_(torch.eye(h) + 0.01 * torch.randn(h, h))
        nn.init.xavier_uniform_(self.query_update_gate.weight)
        nn.init.zeros_(self.query_update_gate.bias)

    # -- backbone / head split -------------------------------------------------
    def backbone_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Named parameters of the backbone (input_proj, query_proj, cand_proj)."""
        return [(n, p) for n, p in self.named_parameters() if n.split(".")[0] in BACKBONE_MODULES]

    def head_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Named parameters of the pointer head (attention, norms, update gate)."""
        return [(n, p) for n, p in self.named_parameters() if n.split(".")[0] in HEAD_MODULES]

    # -- computation -------------------------------------------------------------
    def encode(
        self,
        query_emb: torch.Tensor,
        cand_emb: torch.Tensor,
        pool_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode queries [B, d] and pools [B, K, d] into state z [B, h] and keys [B, K, h].

        ``pool_mask`` [B, K] is True for real pool entries; padded entries are
        left out of the attention.
        """
        q1 = self.input_proj(query_emb)
        c1 = self.input_proj(cand_emb)
        pad = None if pool_mask is None else ~pool_mask
        for attn, norm in zip(self.cross_attn_layers, self.attn_norms, strict=True):
            q1 = norm(self._attend(attn, q1, c1, pad) + q1)
        p, training = self.config.dropout, self.training
        z = F.normalize(self.query_proj(dropout(q1, p, training)), dim=-1)
        keys = F.normalize(self.cand_proj(dropout(c1, p, training)), dim=-1)
        return z, keys

    def _attend(
        self,
        attn: nn.Module,
        q1: torch.Tensor,
        c1: torch.Tensor,
        pad: torch.Tensor | None,
    ) -> torch.Tensor:
        """``attn(query=q1, key=c1, value=c1)`` for a one-token query, without projecting keys.

        Equal to :class:`torch.nn.MultiheadAttention` (same parameters, same
        formula), but the key and value projections are moved to the query side:
        ``q . (W_k c + b_k) = (W_k^T q) . c + q . b_k`` and
        ``sum_k a_k (W_v c_k + b_v) = W_v (sum_k a_k c_k) + (sum_k a_k) b_v``. That
        replaces two [K, h] x [h, h] products per query by [h] x [h, h] ones — a
        third of the encoder's work when the pool has 64 entries.
        """
        assert isinstance(attn, nn.MultiheadAttention)
        batch, h = q1.shape
        heads = attn.num_heads
        dh = h // heads
        assert attn.in_proj_weight is not None and attn.in_proj_bias is not None
        w_q, w_k, w_v = torch.split(attn.in_proj_weight, h)
        b_q, b_k, b_v = torch.split(attn.in_proj_bias, h)
        q = F.linear(q1, w_q, b_q).view(batch, heads, dh) * dh**-0.5
        u = torch.einsum("bnj,njh->bnh", q, w_k.view(heads, dh, h))  # [B, heads, h]
        scores = torch.bmm(u, c1.transpose(1, 2))  # [B, heads, K]
        scores = scores + (q * b_k.view(heads, dh)).sum(-1, keepdim=True)
        if pad is not None:
            scores = scores.masked_fill(pad.unsqueeze(1), float("-inf"))
        weights = F.dropout(torch.softmax(scores, dim=-1), attn.dropout, self.training)
        context = torch.bmm(weights, c1)  # [B, heads, h]
        out = torch.einsum("bnh,njh->bnj", context, w_v.view(heads, dh, h))
        out = out + weights.sum(-1, keepdim=True) * b_v.view(heads, dh)
        return attn.out_proj(out.reshape(batch, h))  # type: ignore[no-any-return]

    def decode(
        self,
        z: torch.Tensor,
        keys: torch.Tensor,
        pool_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_steps: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the pointer steps for G sequences per query.

        ``z`` [B, h], ``keys`` [B, K, h]; ``labels`` [B, G, S] (teacher forcing) or
        None (greedy, then G = 1 and ``num_steps`` steps). Returns logits
        [B, G, S, K] and predictions [B, G, S].
        """
        if labels is None:
            if num_steps is None:
                raise ValueError("decode needs labels or num_steps")
            groups, steps = 1, num_steps
        else:
            groups, steps = labels.shape[1], labels.shape[2]
        batch, pool = keys.shape[0], keys.shape[1]
        state = z.unsqueeze(1).expand(batch, groups, z.shape[-1])
        keys_t = keys.transpose(1, 2)  # [B, h, K]
        chosen = torch.zeros(batch, groups, pool, dtype=torch.bool, device=keys.device)
        pad = None if pool_mask is None else ~pool_mask.unsqueeze(1)  # [B, 1, K]
        all_logits, all_preds = [], []
        for t in range(steps):
            logits = torch.bmm(state, keys_t) / self.config.temperature  # [B, G, K]
            logits = logits.masked_fill(chosen, CHOSEN_LOGIT)
            if pad is not None:
                logits = logits.masked_fill(pad, float("-inf"))
            preds = logits.argmax(dim=-1)
            all_logits.append(logits)
            all_preds.append(preds)
            if t == steps - 1:
                break
            pos = preds if labels is None else labels[:, :, t]
            chosen = chosen.scatter(2, pos.unsqueeze(-1), True)
            chosen_key = torch.gather(
                keys, 1, pos.unsqueeze(-1).expand(batch, groups, keys.shape[-1])
            )
            gate = torch.sigmoid(self.query_update_gate(torch.cat([state, chosen_key], dim=-1)))
            state = F.normalize(gate * state + (1 - gate) * chosen_key, dim=-1)
        return torch.stack(all_logits, dim=2), torch.stack(all_preds, dim=2)

    def forward(
        self,
        query_emb: torch.Tensor,
        cand_emb: torch.Tensor,
        labels: torch.Tensor | None = None,
        num_steps: int = 2,
        pool_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SPEC section 4 signature: logits [B, S, K] and predictions [B, S].

        ``labels`` [B, S] switches on teacher forcing; without them the policy
        decodes greedily for ``num_steps`` steps.
        """
        z, keys = self.encode(query_emb, cand_emb, pool_mask)
        lab = None if labels is None else labels.unsqueeze(1)
        logits, preds = self.decode(z, keys, pool_mask, lab, num_steps)
        return logits.squeeze(1), preds.squeeze(1)

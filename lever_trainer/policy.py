"""The policy protocol, and the building blocks that policy plugins share.

A policy is built by a plugin's ``build_policy`` hook (``--policy NAME``) and must be a
:class:`Policy`: an ``nn.Module`` that encodes each query and its pool **once** and then
decodes any number of candidate sequences against that encoding.

* :meth:`Policy.encode` ``(query_emb [B, d], cand_emb [B, K, d], pool_mask [B, K] | None)``
  returns an *encoding*: any object (usually a tuple of tensors with leading dim B)
  that only the same policy's :meth:`Policy.decode` reads.
* :meth:`Policy.decode` ``(encoding, pool_mask, labels [B, G, S] | None, num_steps)``
  returns logits ``[B, G, S, K + extra_items]`` and predictions ``[B, G, S]``. With
  ``labels`` it teacher-forces each of the G sequences; without, it decodes greedily
  (G = 1) for ``num_steps`` steps.

Rules every policy keeps, which the trainer, validation and ``select`` rely on:

* padded pool entries (``pool_mask`` False) are invisible: left out of every attention
  and given a logit of ``-inf``;
* a position chosen at an earlier step gets the logit :data:`CHOSEN_LOGIT` (``-100``),
  after all additive terms, and stays inside the softmax;
* eval mode is deterministic; training mode may draw dropout masks (use :func:`dropout`);
* ``extra_items`` columns follow the pool (a STOP item is column ``K``); a prediction
  ``>= K`` means "no further demonstration";
* :meth:`Policy.policy_options` returns the JSON-able options that, with the policy's
  name and the embedding width, rebuild the same module through ``build_policy``;
  checkpoints record them, so ``--sft-ckpt``, ``--resume`` and ``select`` rebuild it.

:class:`PointerTrunk` is the encoder every upstream variant shares (docs/algorithm.md,
steps 1-3): ``input_proj``, ``cross_attn_layers`` + ``attn_norms``, dropout,
``query_proj`` / ``cand_proj`` and L2 normalisation. Its module names are the
checkpoint names; the backbone (what ``freeze-backbone`` freezes) is ``input_proj``,
``query_proj`` and ``cand_proj``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

#: Logit given to a pool position that was already chosen at an earlier step.
CHOSEN_LOGIT = -100.0


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


def one_token_attention(
    attn: nn.MultiheadAttention,
    q1: torch.Tensor,
    c1: torch.Tensor,
    pad: torch.Tensor | None,
    training: bool,
) -> torch.Tensor:
    """``attn(query=q1, key=c1, value=c1)`` for a one-token query [B, h], keys [B, K, h].

    Equal to :class:`torch.nn.MultiheadAttention` (same parameters, same formula), but
    the key and value projections are moved to the query side:
    ``q . (W_k c + b_k) = (W_k^T q) . c + q . b_k`` and
    ``sum_k a_k (W_v c_k + b_v) = W_v (sum_k a_k c_k) + (sum_k a_k) b_v``. That replaces
    two [K, h] x [h, h] products per query by [h] x [h, h] ones: a third of the
    encoder's work when the pool has 64 entries. ``pad`` [B, K] is True for padding.
    """
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
    weights = F.dropout(torch.softmax(scores, dim=-1), attn.dropout, training)
    context = torch.bmm(weights, c1)  # [B, heads, h]
    out = torch.einsum("bnh,njh->bnj", context, w_v.view(heads, dh, h))
    out = out + weights.sum(-1, keepdim=True) * b_v.view(heads, dh)
    return attn.out_proj(out.reshape(batch, h))  # type: ignore[no-any-return]


class Policy(nn.Module):
    """Base class of every policy (see the module docstring for the protocol)."""

    #: The ``--policy`` name this class is built under (set by each policy class).
    policy_name: ClassVar[str] = ""
    #: Item columns after the pool in the logits (1 for a STOP item).
    extra_items: ClassVar[int] = 0
    #: First components of the parameter names that form the backbone.
    backbone_modules: ClassVar[tuple[str, ...]] = ()

    #: Embedding width d the policy was built for.
    input_dim: int

    def policy_options(self) -> dict[str, Any]:
        """JSON-able options that rebuild this module (with its name and ``input_dim``)."""
        raise NotImplementedError

    def encode(
        self,
        query_emb: torch.Tensor,
        cand_emb: torch.Tensor,
        pool_mask: torch.Tensor | None = None,
    ) -> Any:
        """Encode queries [B, d] and pools [B, K, d] once; the result goes to :meth:`decode`."""
        raise NotImplementedError

    def decode(
        self,
        encoding: Any,
        pool_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_steps: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, G, S, K + extra_items] and predictions [B, G, S] (see module docstring)."""
        raise NotImplementedError

    def decode_order(self, steps: int) -> list[int]:
        """The order in which the policy decides the ``steps`` positions (default: first
        to last). A policy that decides the last position first returns it reversed;
        :func:`sample_sequences` fills positions in this order."""
        return list(range(steps))

    def forward(
        self,
        query_emb: torch.Tensor,
        cand_emb: torch.Tensor,
        labels: torch.Tensor | None = None,
        num_steps: int = 2,
        pool_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference signature: logits [B, S, K] and predictions [B, S].

        ``labels`` [B, S] switches on teacher forcing; without them the policy decodes
        greedily for ``num_steps`` steps.
        """
        encoding = self.encode(query_emb, cand_emb, pool_mask)
        lab = None if labels is None else labels.unsqueeze(1)
        logits, preds = self.decode(encoding, pool_mask, lab, num_steps)
        return logits.squeeze(1), preds.squeeze(1)

    def backbone_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Named parameters of the backbone (``backbone_modules``)."""
        return [
            (n, p) for n, p in self.named_parameters() if n.split(".")[0] in self.backbone_modules
        ]

    def head_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Named parameters outside the backbone (the pointer head)."""
        return [
            (n, p)
            for n, p in self.named_parameters()
            if n.split(".")[0] not in self.backbone_modules
        ]


_C = TypeVar("_C", bound="TrunkConfig")


@dataclass(frozen=True)
class TrunkConfig:
    """Hyper-parameters of :class:`PointerTrunk` (defaults: the reference policy's)."""

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

    def options(self) -> dict[str, Any]:
        """Every field but ``input_dim``: what ``build_policy`` receives as options."""
        out = self.to_dict()
        out.pop("input_dim")
        return out

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of the fields, ``input_dim`` included."""
        return [f.name for f in fields(cls)]

    @classmethod
    def from_options(cls: type[_C], input_dim: int, options: Mapping[str, Any]) -> _C:
        """The config for width ``input_dim``: the fields found in ``options`` (others ignored;
        a None value means "not given"), defaults for the rest."""
        names = set(cls.field_names()) - {"input_dim"}
        given = {k: v for k, v in options.items() if k in names and v is not None}
        return cls(input_dim=input_dim, **given)


class PointerTrunk(Policy):
    """The encoder of docs/algorithm.md#pointer-policy steps 1-3; subclasses add a decoder.

    ``encode`` returns ``(z, keys)``: the unit-norm query state z [B, h] and the
    unit-norm item keys [B, K, h]. Subclasses that transform the projected pool before
    the cross-attention (a set encoder) override :meth:`encode_pool`.
    """

    backbone_modules: ClassVar[tuple[str, ...]] = ("input_proj", "query_proj", "cand_proj")

    def __init__(self, config: TrunkConfig) -> None:
        super().__init__()
        self.config = config
        self.input_dim = config.input_dim
        d, h = config.input_dim, config.hidden_dim
        if h % config.num_heads:
            raise ValueError(f"hidden_dim {h} is not a multiple of num_heads {config.num_heads}")
        self.input_proj: nn.Module = nn.Identity() if d == h else nn.Linear(d, h, bias=False)
        self.cross_attn_layers = nn.ModuleList(
            nn.MultiheadAttention(
                h, config.num_heads, dropout=config.attn_dropout, batch_first=True
            )
            for _ in range(config.num_layers)
        )
        self.attn_norms = nn.ModuleList(nn.LayerNorm(h) for _ in range(config.num_layers))
        self.query_proj = nn.Linear(h, h, bias=False)
        self.cand_proj = nn.Linear(h, h, bias=False)
        self.reset_trunk_parameters()

    def policy_options(self) -> dict[str, Any]:
        """The config's fields without ``input_dim``."""
        return self.config.options()

    def reset_trunk_parameters(self) -> None:
        """Reference initialisation: Xavier for input_proj, identity + N(0, 0.01) projections."""
        if isinstance(self.input_proj, nn.Linear):
            nn.init.xavier_uniform_(self.input_proj.weight)
        h = self.config.hidden_dim
        with torch.no_grad():
            for proj in (self.query_proj, self.cand_proj):
                proj.weight.copy_(torch.eye(h) + 0.01 * torch.randn(h, h))

    def encode_pool(self, c1: torch.Tensor, pool_mask: torch.Tensor | None) -> torch.Tensor:
        """Transform the projected pool [B, K, h] before the cross-attention (identity)."""
        return c1

    def attend(
        self, q1: torch.Tensor, c1: torch.Tensor, pool_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The cross-attention layers: ``q1 = LayerNorm(attn(q1, c1, c1) + q1)`` each."""
        pad = None if pool_mask is None else ~pool_mask
        for attn, norm in zip(self.cross_attn_layers, self.attn_norms, strict=True):
            assert isinstance(attn, nn.MultiheadAttention)
            q1 = norm(one_token_attention(attn, q1, c1, pad, self.training) + q1)
        return q1

    def encode(
        self,
        query_emb: torch.Tensor,
        cand_emb: torch.Tensor,
        pool_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """State z [B, h] and keys [B, K, h], both L2-normalised."""
        q1 = self.input_proj(query_emb)
        c1 = self.encode_pool(self.input_proj(cand_emb), pool_mask)
        q1 = self.attend(q1, c1, pool_mask)
        p, training = self.config.dropout, self.training
        z = F.normalize(self.query_proj(dropout(q1, p, training)), dim=-1)
        keys = F.normalize(self.cand_proj(dropout(c1, p, training)), dim=-1)
        return z, keys

    def step_logits(
        self,
        scores: torch.Tensor,
        chosen: torch.Tensor,
        pad: torch.Tensor | None,
    ) -> torch.Tensor:
        """Mask a step's scores [B, G, K]: chosen -> ``-100``, padding -> ``-inf``."""
        logits = scores.masked_fill(chosen, CHOSEN_LOGIT)
        if pad is not None:
            logits = logits.masked_fill(pad, float("-inf"))
        return logits


def sample_sequences(
    policy: Policy,
    encoding: Any,
    pool_mask: torch.Tensor | None,
    num_samples: int,
    steps: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw ``num_samples`` sequences [B, N, S] per query from the policy's step
    distributions (positions filled in ``policy.decode_order``; an item is never drawn
    twice in one sequence, since chosen items carry the -100 logit).

    Each position is drawn from ``softmax(logits_t / temperature)`` teacher-forced on the
    positions already drawn; positions not yet drawn hold a placeholder that the
    policy's causal order never reads. Extra items (a STOP column) are not drawn.
    """
    batch = pool_mask.shape[0] if pool_mask is not None else None
    labels: torch.Tensor | None = None
    for t in policy.decode_order(steps):
        if labels is None:
            if batch is None:
                raise ValueError("sample_sequences needs the pool mask")
            device = pool_mask.device if pool_mask is not None else None
            labels = torch.zeros(batch, num_samples, steps, dtype=torch.long, device=device)
        logits, _ = policy.decode(encoding, pool_mask, labels)
        pool = logits.shape[-1] - policy.extra_items
        step = logits[:, :, t, :pool].float() / temperature
        probs = torch.softmax(step, dim=-1).reshape(-1, pool)
        pick = torch.multinomial(probs.cpu(), 1, generator=generator)
        labels[:, :, t] = pick.view(labels.shape[0], num_samples).to(labels.device)
    assert labels is not None
    return labels


def decode_steps(labels: torch.Tensor | None, num_steps: int | None) -> tuple[int, int]:
    """``(G, S)`` of a decode call: from ``labels`` [B, G, S], else ``(1, num_steps)``."""
    if labels is None:
        if num_steps is None:
            raise ValueError("decode needs labels or num_steps")
        return 1, num_steps
    return int(labels.shape[1]), int(labels.shape[2])


__all__ = [
    "CHOSEN_LOGIT",
    "PointerTrunk",
    "Policy",
    "TrunkConfig",
    "decode_steps",
    "dropout",
    "one_token_attention",
    "sample_sequences",
]

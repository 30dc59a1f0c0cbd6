"""Shared building blocks of the upstream-variant policy plugins (``pointer-*``).

Private to the built-in plugins: the variant modules (``policy_*.py``) import from here
and from :mod:`lever_trainer.api`, nothing else.

* :class:`VariantPolicy`: the shared trunk plus the sequence length ``shots`` and the
  variant's own options, all recorded in :meth:`~VariantPolicy.policy_options`.
* :class:`StepPointerPolicy`: the autoregressive skeleton of most variants (optional
  step embedding, optional GRU state update, per-step scores with additive terms) that
  decodes G teacher-forced sequences per query at once; a variant overrides
  :meth:`~StepPointerPolicy.step_scores` and :meth:`~StepPointerPolicy.remember`.
* helpers: :func:`attention` (multi-head attention with a key padding mask, used where
  queries have more than one token), :func:`gather_rows`, :func:`option_value`,
  :func:`shots_from`, :func:`lambda_init`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lever_trainer.api import (
    SELECT_SHOTS,
    LeverError,
    Option,
    PointerTrunk,
    TrunkConfig,
    decode_steps,
)

#: Upstream's default ``shot_num``, used when the options carry no ``shots``.
DEFAULT_SHOTS = 2

#: What the decoding hooks read: ``(z [B, h], keys [B, K, h], *variant extras)``, made
#: from the encoding by :meth:`StepPointerPolicy.prepare`.
Encoding = tuple[torch.Tensor, ...]


def shots_from(options: Mapping[str, Any]) -> int:
    """The sequence length S (``--shots``; upstream's default 2 when missing or None)."""
    value = SELECT_SHOTS.of(options)
    shots = DEFAULT_SHOTS if value is None else int(value)
    if shots < 1:
        raise LeverError(f"shots must be at least 1, got {shots}")
    return shots


def option_value(options: Mapping[str, Any], option: Option) -> Any:
    """``option``'s value in ``options``, or its declared default when missing or None;
    a choice option's value is checked against its choices."""
    value = option.of(options)
    if value is None:
        return option.default
    if option.choices and value not in option.choices:
        choices = ", ".join(map(str, option.choices))
        raise LeverError(f"{option.name}: expected one of {choices}, got {value!r}")
    return value


def lambda_init(value: float) -> float:
    """Upstream's lambda sentinel: an init of 0.0 means -2.0 (softplus ~ 0.127)."""
    return value if value != 0.0 else -2.0


def gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[b, index[b, ...]]``: rows [B, ..., h] of ``table`` [B, K, h]."""
    batch, width = table.shape[0], table.shape[-1]
    flat = index.reshape(batch, -1, 1).expand(batch, -1, width)
    return torch.gather(table, 1, flat).view(*index.shape, width)


def attention(
    attn: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pad: torch.Tensor | None,
    training: bool,
) -> torch.Tensor:
    """``attn(query, key, value, key_padding_mask=pad)`` for batch-first [N, L, h] inputs.

    The same formula and parameters as :class:`torch.nn.MultiheadAttention`, written out
    so that no fused path runs: padded keys (``pad`` [N, Lk] True) get weight 0, and
    the outputs of padded query rows stay finite. Dropout ``attn.dropout`` on the
    weights in training.
    """
    n, lq, h = query.shape
    lk = key.shape[1]
    heads = attn.num_heads
    dh = h // heads
    assert attn.in_proj_weight is not None and attn.in_proj_bias is not None
    w_q, w_k, w_v = torch.split(attn.in_proj_weight, h)
    b_q, b_k, b_v = torch.split(attn.in_proj_bias, h)
    q = (F.linear(query, w_q, b_q) * dh**-0.5).view(n, lq, heads, dh).transpose(1, 2)
    k = F.linear(key, w_k, b_k).view(n, lk, heads, dh).transpose(1, 2)
    v = F.linear(value, w_v, b_v).view(n, lk, heads, dh).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-1, -2))  # [N, heads, Lq, Lk]
    if pad is not None:
        scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    weights = F.dropout(torch.softmax(scores, dim=-1), attn.dropout, training)
    out = torch.matmul(weights, v).transpose(1, 2).reshape(n, lq, h)
    return attn.out_proj(out)  # type: ignore[no-any-return]


class VariantPolicy(PointerTrunk):
    """The shared trunk plus ``shots`` (S) and the variant's own options.

    ``variant_options`` are the plugin's option values (by ``dest``) exactly as they
    must be given back to ``build_policy`` to rebuild this module.
    """

    def __init__(
        self,
        config: TrunkConfig,
        shots: int,
        variant_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(config)
        self.shots = shots
        self.variant_options: dict[str, Any] = dict(variant_options or {})

    def policy_options(self) -> dict[str, Any]:
        """Trunk options, the variant's own options and ``shots``."""
        out = super().policy_options()
        out.update(self.variant_options)
        out["shots"] = self.shots
        return out

    def scale(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores / tau`` (the logit temperature, a constant)."""
        return scores / self.config.temperature


class StepPointerPolicy(VariantPolicy):
    """Autoregressive pointer decoding with an optional step embedding and GRU update.

    At step t, with state h (h0 = the encoder's z):

    * ``h~ = normalise(h + step_emb[min(t, rows - 1)])`` (``h~ = h`` without step_emb);
    * logits = :meth:`step_scores` (``keys . h~ / tau`` plus the variant's terms), then
      earlier choices -> ``-100`` and padding -> ``-inf``;
    * the label (teacher forcing) or the argmax is chosen, :meth:`remember` records it,
      and with a GRU ``h = normalise(GRU(e, h))`` (e the chosen key; h, not h~).

    The G sequences of a query are decoded as one [B, G] batch.
    """

    def __init__(
        self,
        config: TrunkConfig,
        shots: int,
        variant_options: Mapping[str, Any] | None = None,
        *,
        step_rows: int = 0,
        use_gru: bool = True,
    ) -> None:
        super().__init__(config, shots, variant_options)
        h = config.hidden_dim
        self.use_gru = use_gru
        self.step_rows = step_rows
        if use_gru:
            self.decoder_gru = nn.GRUCell(h, h)
        if step_rows > 0:
            self.step_emb = nn.Embedding(step_rows, h)
            nn.init.normal_(self.step_emb.weight, mean=0.0, std=0.02)

    # -- variant hooks -------------------------------------------------------------

    def prepare(self, encoding: tuple[torch.Tensor, torch.Tensor]) -> Encoding:
        """Per-pool tensors the decoding hooks read, from the encoding ``(z, keys)``.

        Computed once per :meth:`decode` call (for all G sequences); a variant appends
        what its scores need (item topics, low-rank features, ...).
        """
        return encoding

    def begin(self, context: Encoding, batch: int, groups: int) -> list[torch.Tensor]:
        """Fresh per-decode memory (a list the variant's hooks read and update)."""
        return []

    def step_scores(
        self,
        context: Encoding,
        memory: list[torch.Tensor],
        state: torch.Tensor,
        step: int,
        chosen: torch.Tensor,
        pad: torch.Tensor | None,
    ) -> torch.Tensor:
        """Scores [B, G, K] of step ``step`` before masking: ``keys . h~ / tau``."""
        return self.scale(torch.bmm(state, context[1].transpose(1, 2)))

    def remember(
        self,
        context: Encoding,
        memory: list[torch.Tensor],
        pos: torch.Tensor,
        chosen_key: torch.Tensor,
    ) -> None:
        """Record the choice ``pos`` [B, G] (key ``chosen_key`` [B, G, h])."""

    # -- decoding ------------------------------------------------------------------

    def step_state(self, state: torch.Tensor, step: int) -> torch.Tensor:
        """``h~``: the state plus the step embedding, re-normalised."""
        if self.step_rows <= 0:
            return state
        row = self.step_emb.weight[min(step, self.step_rows - 1)]
        return F.normalize(state + row, dim=-1)

    def gru_update(self, chosen_key: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """``normalise(GRU(e, h))`` over [B, G, h]."""
        shape = state.shape
        new = self.decoder_gru(chosen_key.reshape(-1, shape[-1]), state.reshape(-1, shape[-1]))
        return F.normalize(new, dim=-1).view(shape)

    def decode(
        self,
        encoding: tuple[torch.Tensor, torch.Tensor],
        pool_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_steps: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, G, S, K] and predictions [B, G, S] (see :class:`Policy`)."""
        z, keys = encoding
        context = self.prepare(encoding)
        groups, steps = decode_steps(labels, num_steps)
        batch, pool, width = keys.shape
        state = z.unsqueeze(1).expand(batch, groups, width)
        chosen = torch.zeros(batch, groups, pool, dtype=torch.bool, device=keys.device)
        pad = None if pool_mask is None else ~pool_mask.unsqueeze(1)  # [B, 1, K]
        memory = self.begin(context, batch, groups)
        all_logits, all_preds = [], []
        for t in range(steps):
            h_t = self.step_state(state, t)
            scores = self.step_scores(context, memory, h_t, t, chosen, pad)
            logits = self.step_logits(scores, chosen, pad)
            preds = logits.argmax(dim=-1)
            all_logits.append(logits)
            all_preds.append(preds)
            if t == steps - 1:
                break
            pos = preds if labels is None else labels[:, :, t]
            chosen = chosen.scatter(2, pos.unsqueeze(-1), True)
            chosen_key = gather_rows(keys, pos)
            self.remember(context, memory, pos, chosen_key)
            if self.use_gru:
                state = self.gru_update(chosen_key, state)
        return torch.stack(all_logits, dim=2), torch.stack(all_preds, dim=2)


class MmrPointerPolicy(StepPointerPolicy):
    """:class:`StepPointerPolicy` plus upstream V4-3's MMR diversity term.

    For t >= 1, ``logit_k -= softplus(div_lambda[t]) * red_k`` with
    ``red_k = max_j <c_k, e_j>`` (``reduction="max"``) or the mean over the earlier
    choices e_j (``"mean"``). ``div_lambda`` [S] starts at 0.1; its entry 0 is never used,
    and steps past S use the last entry.
    """

    REDUCTIONS = ("max", "mean")

    def __init__(
        self,
        config: TrunkConfig,
        shots: int,
        variant_options: Mapping[str, Any] | None = None,
        *,
        reduction: str = "max",
        step_rows: int = 0,
        use_gru: bool = True,
    ) -> None:
        super().__init__(config, shots, variant_options, step_rows=step_rows, use_gru=use_gru)
        if reduction not in self.REDUCTIONS:
            raise LeverError(f"MMR reduction must be max or mean, got {reduction!r}")
        self.reduction = reduction
        self.div_lambda = nn.Parameter(torch.full((shots,), 0.1))

    def step_scores(
        self,
        context: Encoding,
        memory: list[torch.Tensor],
        state: torch.Tensor,
        step: int,
        chosen: torch.Tensor,
        pad: torch.Tensor | None,
    ) -> torch.Tensor:
        """``keys . h~ / tau - softplus(div_lambda[t]) * red`` (no MMR term at t = 0)."""
        scores = super().step_scores(context, memory, state, step, chosen, pad)
        if not memory:
            return scores
        sims = torch.stack(memory, dim=-1)  # [B, G, K, t]
        red = sims.max(dim=-1).values if self.reduction == "max" else sims.mean(dim=-1)
        weight = F.softplus(self.div_lambda[min(step, self.div_lambda.shape[0] - 1)])
        return scores - weight * red

    def remember(
        self,
        context: Encoding,
        memory: list[torch.Tensor],
        pos: torch.Tensor,
        chosen_key: torch.Tensor,
    ) -> None:
        """Keep the similarity of every item to the chosen one: [B, G, K]."""
        memory.append(torch.bmm(chosen_key, context[1].transpose(1, 2)))


__all__ = [
    "DEFAULT_SHOTS",
    "Encoding",
    "MmrPointerPolicy",
    "StepPointerPolicy",
    "VariantPolicy",
    "attention",
    "gather_rows",
    "lambda_init",
    "option_value",
    "shots_from",
]

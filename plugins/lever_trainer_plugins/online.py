"""Phase ``online``: the policy proposes sequences from each query's whole pool, the judge
scores them, and a group-relative update learns from the verdicts. Off by default; needs
``--judge``.

Each epoch is one round. For every training query the current policy (eval mode)
proposes its greedy sequence and ``--online-samples`` sequences drawn at
``--online-temperature`` (positions filled in the policy's decision order, no item twice).
The judge scores them; a query is never judged on more than ``--online-budget`` distinct
sequences over the whole phase (sequences already judged, in this run or in the verdict
store, are free; new ones past the budget are left out of the group). The group's raw
rewards (the run's reward mode) give advantages through ``compute_advantages``
(``group-zscore`` by default), and ``--online-passes`` passes over the round's groups
minimise the group objective that GRPO minimises (``_group_objective``: the same hooks,
the same options ``--clip-epsilon``, ``--kl-beta``, the same variant plugins), with the
ratios and the KL measured against the log-probs the proposals had when they were
proposed: each round's reference is the policy that proposed it. The KL weight starts at
``--kl-beta`` when the phase starts and moves through ``adapt_kl_beta`` after every step,
as in GRPO; ``--plugin ppo-clip-only`` leaves the KL term out (the objective of this
phase before it shared GRPO's).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lever_trainer.api import (
    TABLE_FIELDS,
    About,
    Batch,
    EpochData,
    LeverError,
    Option,
    Phase,
    QueryTable,
    TrainState,
    hookimpl,
    pool_batches,
    sample_sequences,
    sequence_logprobs,
)

from ._group_objective import OBJECTIVE_METRICS, GroupObjectivePhase, check_decisions

ONLINE_EPOCHS = Option(("--online-epochs",), "int", 8, "Rounds of the online phase.", min=0)
ONLINE_LR = Option(
    ("--online-lr",), "float", 1e-4, "Online learning rate (AdamW).", min=0, min_open=True
)
ONLINE_SAMPLES = Option(
    ("--online-samples",),
    "int",
    8,
    "Sequences drawn per query per round (plus the greedy one).",
    min=1,
)
ONLINE_TEMPERATURE = Option(
    ("--online-temperature",),
    "float",
    1.0,
    "Sampling temperature of the proposals.",
    min=0,
    min_open=True,
)
ONLINE_BUDGET = Option(
    ("--online-budget",),
    "int",
    64,
    "Most distinct sequences judged per training query over the phase.",
    min=1,
)
ONLINE_PASSES = Option(("--online-passes",), "int", 2, "Passes over each round's groups.", min=1)
ONLINE_CLIP_EPSILON = Option(
    ("--online-clip-epsilon",),
    "float",
    None,
    "Removed: the online phase uses --clip-epsilon.",
    min=0,
    extra={"removed": "use --clip-epsilon (one PPO clip for grpo and online)"},
)
ONLINE_KL_BETA = Option(
    ("--online-kl-beta",),
    "float",
    None,
    "Removed: the online phase uses --kl-beta.",
    min=0,
    extra={
        "removed": "use --kl-beta (one KL weight for grpo and online; "
        "--plugin ppo-clip-only for no KL term, the old default)"
    },
)


class OnlinePhase(GroupObjectivePhase):
    """Rounds of propose -> judge -> group-objective update (see the module docstring)."""

    name = "online"
    order = 40
    epochs_option = ONLINE_EPOCHS.dest
    lr_option = ONLINE_LR.dest
    needs_reward = False
    log_metrics = ("judge_calls_per_query", "online_reward", "online_correct")
    metric_names = (
        *OBJECTIVE_METRICS,
        "judge_calls_per_query",
        "online_reward",
        "online_correct",
    )

    def __init__(self) -> None:
        super().__init__()
        self.judged: dict[int, set[str]] = {}
        self.round: EpochData | None = None
        self.round_stats: dict[str, float] = {}

    def start(self, state: TrainState, resumed: bool) -> None:
        """The phase needs a judge; then the KL penalty's answer, as in GRPO."""
        if state.judge is None:
            raise LeverError("phase online needs a downstream judge: give --judge NAME")
        super().start(state, resumed)

    # -- one round of proposals ------------------------------------------------------
    @torch.no_grad()
    def propose(self, state: TrainState, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences [Q, 1 + N, S] (greedy first) and their log-probs at collection."""
        model, table = state.model, state.train
        steps, samples = table.seq_len, int(ONLINE_SAMPLES.of(state.options))
        temperature = float(ONLINE_TEMPERATURE.of(state.options))
        generator = torch.Generator().manual_seed(state.config.seed * 1009 + epoch)
        was_training = model.training
        model.eval()
        seqs, logps = [], []
        emb = state.emb
        assert emb is not None
        device = next(model.parameters()).device
        for batch in pool_batches(table, emb, 256):
            b = batch.to(device)
            encoding = model.encode(b.query_emb, b.cand_emb, b.pool_mask)
            _, greedy = model.decode(encoding, b.pool_mask, None, steps)
            drawn = sample_sequences(
                model, encoding, b.pool_mask, samples, steps, temperature, generator
            )
            labels = torch.cat([greedy[:, :1].clamp_max(b.pool_mask.shape[1] - 1), drawn], 1)
            logits, _ = model.decode(encoding, b.pool_mask, labels)
            seqs.append(labels.cpu())
            logps.append(sequence_logprobs(logits, labels).cpu())
        model.train(was_training)
        return torch.cat(seqs), torch.cat(logps)

    def judge_round(
        self, state: TrainState, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rewards, correctness and a mask [Q, G] of the proposals within the budget."""
        assert state.judge is not None
        table, budget = state.train, int(ONLINE_BUDGET.of(state.options))
        ids = table.pool_ids.gather(1, positions.flatten(1)).view(positions.shape)
        query_ids = table.query_ids.tolist()
        rows: list[int] = []
        cols: list[int] = []
        asked_ids: list[int] = []
        asked: list[list[int]] = []
        # counted against the budget only once their verdicts are in: a judge that fails
        # midway leaves the budget as it was, and a resumed round asks for them again
        pending: dict[int, set[str]] = {}
        for row, (qid, group) in enumerate(zip(query_ids, ids.tolist(), strict=True)):
            seen, new = self.judged.get(qid, set()), pending.setdefault(qid, set())
            for j, seq in enumerate(group):
                key = ",".join(map(str, seq))
                if key not in seen and key not in new and len(seen) + len(new) >= budget:
                    continue
                if key not in seen:
                    new.add(key)
                rows.append(row)
                cols.append(j)
                asked_ids.append(qid)
                asked.append(seq)
        pools = {
            q: p[:n]
            for q, p, n in zip(
                query_ids, table.pool_ids.tolist(), table.pool_len.tolist(), strict=True
            )
        }
        rewards, correct = state.judge.rewards(asked_ids, asked, pools)
        for qid, new in pending.items():
            self.judged.setdefault(qid, set()).update(new)
        shape = positions.shape[:2]
        keep = torch.zeros(shape, dtype=torch.bool)
        reward_t, correct_t = torch.zeros(shape), torch.zeros(shape)
        if rows:
            at = (torch.tensor(rows), torch.tensor(cols))
            keep[at] = True
            reward_t[at] = torch.tensor(rewards, dtype=reward_t.dtype)
            correct_t[at] = torch.tensor(correct, dtype=correct_t.dtype)
        return reward_t, correct_t, keep

    def epoch_data(self, state: TrainState, epoch: int, resumed: bool) -> EpochData:
        """One round: propose, judge, and the groups to learn from."""
        if resumed and self.round is not None:
            return self.round
        positions, logps = self.propose(state, epoch)
        rewards, correct, keep = self.judge_round(state, positions)
        # kept proposals first in each group, their order kept
        idx = torch.sort(keep.to(torch.int8), dim=1, descending=True, stable=True).indices
        width = max(int(keep.sum(1).max()), 1)
        idx = idx[:, :width]
        mask = keep.gather(1, idx)
        steps = positions.shape[-1]
        train = state.train
        table = QueryTable(
            query_ids=train.query_ids,
            pool_ids=train.pool_ids,
            pool_len=train.pool_len,
            sequences=positions.gather(1, idx.unsqueeze(-1).expand(-1, -1, steps)),
            group_len=mask.sum(1),
            rewards_raw=rewards.gather(1, idx),
            rewards_norm=rewards.gather(1, idx),
            correct=correct.gather(1, idx),
            cand_index=idx,
        )
        self.round = EpochData(table, logps.gather(1, idx), int(ONLINE_PASSES.of(state.options)))
        greedy_kept = keep[:, 0]
        self.round_stats = {
            "online_reward": float(rewards[:, 0][greedy_kept].mean()) if greedy_kept.any() else 0.0,
            "online_correct": float(correct[:, 0][greedy_kept].mean())
            if greedy_kept.any()
            else 0.0,
            "judge_calls_per_query": sum(len(s) for s in self.judged.values()) / max(len(train), 1),
        }
        return self.round

    # -- the update ----------------------------------------------------------------
    def loss(self, state: TrainState, batch: Batch) -> dict[str, torch.Tensor]:
        """The group objective on the round's proposals, scored by their raw rewards."""
        return self.group_loss(state, batch, batch.rewards_raw)

    def epoch_metrics(self, state: TrainState) -> dict[str, float]:
        """The round's greedy reward and correctness on the training queries, and the
        distinct sequences judged per training query so far, and the KL weight."""
        return {**self.round_stats, **super().epoch_metrics(state)}

    def state_dict(self) -> dict[str, Any]:
        """Sequences judged per query (one ``;``-joined string each: a snapshot of tens of
        thousands of small strings is slow to check and write), the current round's
        groups, the KL weight."""
        out: dict[str, Any] = {
            **super().state_dict(),
            "judged": {str(q): ";".join(sorted(s)) for q, s in self.judged.items()},
            "round_stats": dict(self.round_stats),
        }
        if self.round is not None:
            out["round"] = {f: getattr(self.round.table, f) for f in TABLE_FIELDS}
            out["round_ref"] = self.round.ref_logprobs
            out["round_passes"] = self.round.passes
        return out

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(saved)
        self.judged = {int(q): _sequence_set(s) for q, s in saved.get("judged", {}).items()}
        self.round_stats = dict(saved.get("round_stats", {}))
        if "round" in saved:
            table = QueryTable(**saved["round"])
            self.round = EpochData(table, saved["round_ref"], int(saved["round_passes"]))


@hookimpl
def phases() -> Sequence[Phase]:
    """The online phase."""
    return [OnlinePhase()]


@hookimpl
def on_train_start(state: TrainState) -> None:
    """Conflicting answers to the hooks of an online step stop the run before it trains."""
    for phase in state.phases:
        if isinstance(phase, OnlinePhase):
            check_decisions(state, phase)


@hookimpl
def add_options() -> Sequence[Option]:
    """Rounds, learning rate, proposals, budget and passes (the update takes GRPO's)."""
    return [
        ONLINE_EPOCHS,
        ONLINE_LR,
        ONLINE_SAMPLES,
        ONLINE_TEMPERATURE,
        ONLINE_BUDGET,
        ONLINE_PASSES,
        ONLINE_CLIP_EPSILON,
        ONLINE_KL_BETA,
    ]


@hookimpl
def about() -> About:
    """What ``lever-train plugins`` shows."""
    return About(
        description="phase `online`: the policy proposes, the judge scores, GRPO's objective "
        "(--judge)",
    )


__all__ = ["OnlinePhase"]


def _sequence_set(saved: str | list[str]) -> set[str]:
    """The sequences of a snapshot's ``judged`` entry: a ``;``-joined string, or a list
    (snapshots written before the string form)."""
    if isinstance(saved, str):
        return set(saved.split(";")) if saved else set()
    return set(saved)

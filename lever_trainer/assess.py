"""``lever-train evaluate``: checkpoints and baselines side by side on one query file.

For every selector — each checkpoint, the starting policy of the first checkpoint's run
(``start``), and the baselines ``random``, ``cosine``, ``cosine-reversed`` and ``best``
— on the same queries:

* with a judge, the downstream verdicts of its free greedy selection over each whole
  pool (``judge_correct``, ``judge_reward``; docs/algorithm.md#judging);
* where the file has logged sequences, the offline validation metrics for the
  policies (``val_loss``, ``policy_reward@1``, ...).

Judged figures come with their uncertainty: a 95 % bootstrap interval over the queries
for every selector's ``judge_correct``, and for each selector's difference against the
**best heuristic** (the better of ``cosine`` and ``cosine-reversed`` on these queries)
a paired bootstrap interval, so a gain inside the noise shows as one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import header_metadata, load_into_model, read_state_dict
from .data import Embeddings, PoolTable, QueryTable, check_pool_ids, load_pools
from .errors import LeverError
from .evaluation import Evaluator
from .jsonstream import iter_object_members
from .judge import Judge
from .plugins import PluginSet
from .policies import build_policy, policy_from_checkpoint, recorded_policy
from .policy import Policy
from .select import select_greedy
from .selectors import (
    cosine_selection,
    exhaustive_baselines,
    judge_per_query,
    means,
    random_baseline,
)
from .stats import mean_interval, paired_difference

#: Baselines ``evaluate`` knows.
BASELINES = ("random", "cosine", "cosine-reversed", "start", "best")
#: The baselines whose better one is the best heuristic.
HEURISTICS = ("cosine", "cosine-reversed")
#: Metric columns of the printed table, in order.
COLUMNS = (
    "judge_correct",
    "judge_reward",
    "policy_reward@1",
    "policy_correct@1",
    "normalized_gain",
    "val_loss",
)


@dataclass
class Report:
    """What ``evaluate`` measured: one metrics dict per selector, in order; with a judge,
    also each selector's verdicts query by query (``per_query``, in ``query_ids`` order)."""

    queries: str
    n_queries: int
    steps: int
    judge: dict[str, Any] | None
    selectors: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    query_ids: list[int] = field(default_factory=list)
    per_query: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    #: What judging cost (``judge_calls``, ``judge_seconds``, ``judge_cache_hit_rate``,
    #: ``judge_retries``), with a judge.
    judge_cost: dict[str, float] | None = None

    def add_judged(self, name: str, per_query: dict[str, list[float]]) -> None:
        """Record a selector's per-query verdicts and their means."""
        self.per_query[name] = per_query
        self.selectors.setdefault(name, {}).update(means(per_query))

    def best_heuristic(self) -> str | None:
        """The better of ``cosine`` and ``cosine-reversed`` by ``judge_correct`` (the first
        on a tie), or None when neither was judged."""
        judged = [h for h in HEURISTICS if h in self.per_query]
        if not judged:
            return None
        return max(judged, key=lambda h: self.selectors[h]["judge_correct"])

    def intervals(self) -> dict[str, dict[str, Any]]:
        """Per judged selector: ``judge_correct`` with its 95 % bootstrap interval over the
        queries, and its paired difference against the best heuristic with its interval."""
        best = self.best_heuristic()
        out: dict[str, dict[str, Any]] = {}
        for name, values in self.per_query.items():
            mean, low, high = mean_interval(values["judge_correct"])
            entry: dict[str, Any] = {"judge_correct": [mean, low, high]}
            if best is not None and name != best:
                diff = paired_difference(
                    values["judge_correct"], self.per_query[best]["judge_correct"]
                )
                entry["vs_best_heuristic"] = {"baseline": best, "difference": list(diff)}
            out[name] = entry
        return out

    def to_json(self) -> str:
        """The report as JSON text."""
        return json.dumps(
            {
                "queries": self.queries,
                "n_queries": self.n_queries,
                "steps": self.steps,
                "judge": self.judge,
                "judge_cost": self.judge_cost,
                "selectors": self.selectors,
                "intervals": self.intervals(),
                "best_heuristic": self.best_heuristic(),
                "query_ids": self.query_ids,
                "per_query": self.per_query,
                "notes": self.notes,
            },
            indent=2,
        )

    def table(self) -> list[str]:
        """The report as aligned text lines (with a judge, each accuracy's interval and the
        difference against the best heuristic, in points)."""
        cols = [c for c in COLUMNS if any(c in m for m in self.selectors.values())]
        width = max([len("selector"), *(len(n) for n in self.selectors)]) + 2
        intervals = self.intervals() if self.per_query else {}
        best = self.best_heuristic()
        head = "selector".ljust(width) + "".join(f"{c:>18}" for c in cols)
        if intervals:
            head += f"{'95% interval':>18}{'vs ' + (best or '-'):>30}"
        lines = [head]
        for name, metrics in self.selectors.items():
            cells = "".join(f"{metrics[c]:>18.4f}" if c in metrics else f"{'-':>18}" for c in cols)
            if intervals:
                cells += _interval_cells(intervals.get(name), name == best)
            lines.append(name.ljust(width) + cells)
        if intervals and best is not None:
            lines.append(
                f"(intervals: 95 % bootstrap over the {self.n_queries} queries; differences "
                f"in points against {best}, the best heuristic here, paired by query)"
            )
        if self.judge_cost is not None:
            cost = self.judge_cost
            lines.append(
                f"(judge cost: {cost['judge_calls']:.0f} verdicts asked in "
                f"{cost['judge_seconds']:.1f} s, cache hit rate "
                f"{cost['judge_cache_hit_rate']:.3f}, {cost['judge_retries']:.0f} retries)"
            )
        return lines


def _interval_cells(entry: dict[str, Any] | None, is_best: bool) -> str:
    if entry is None:
        return f"{'-':>18}{'-':>30}"
    _, low, high = entry["judge_correct"]
    cells = f"{f'{low:.4f}-{high:.4f}':>18}"
    if is_best:
        return cells + f"{'(best heuristic)':>30}"
    if "vs_best_heuristic" not in entry:
        return cells + f"{'-':>30}"
    diff, dlow, dhigh = (100 * v for v in entry["vs_best_heuristic"]["difference"])
    return cells + f"{f'{diff:+.2f} [{dlow:+.2f}, {dhigh:+.2f}]':>30}"


def has_logged_sequences(path: Path) -> bool:
    """Whether the first query of an RL/pool JSON file carries ``pointer_candidates``."""
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return False
    members = iter_object_members(path)
    try:
        for key, value in members:
            if key.strip().isdigit():
                return isinstance(value, dict) and "pointer_candidates" in value
    finally:
        members.close()
    return False


def start_policy_of(plugins: PluginSet, path: str, input_dim: int, trust: bool) -> Policy | None:
    """The policy a run started from, rebuilt from one of its checkpoints' metadata: the
    run's policy and options, initialised with its seed (then its ``--sft-ckpt``)."""
    metadata = header_metadata(path)
    recorded = recorded_policy(metadata)
    options = metadata.get("options")
    if recorded is None or not isinstance(options, dict) or "seed" not in options:
        return None
    torch.manual_seed(int(options["seed"]))
    policy = build_policy(plugins, recorded[0], input_dim, recorded[1])
    sft = options.get("sft_ckpt")
    if sft:
        if not Path(sft).is_file():
            return None
        load_into_model(policy, read_state_dict(sft, trust), sft)
    return policy


def evaluate(
    plugins: PluginSet,
    checkpoints: Sequence[str],
    queries: Path,
    emb: Embeddings,
    judge: Judge | None,
    baselines: Sequence[str],
    table: QueryTable | None,
    steps: int | None,
    max_pool: int | None = None,
    batch_size: int = 256,
    device: str = "cpu",
    trust: bool = False,
    echo: Callable[[str], None] = print,
) -> Report:
    """Measure every selector (see the module docstring)."""
    pools = PoolTable.from_table(table) if table is not None else load_pools(queries, max_pool)
    check_pool_ids(pools, emb, str(queries))
    policies = _policies_to_measure(plugins, checkpoints, emb.dim, baselines, trust)
    if steps is None:
        steps = table.seq_len if table is not None else _recorded_shots(checkpoints) or 2
    _check_pools_hold(pools, steps, queries)
    report = Report(
        str(queries),
        len(pools),
        steps,
        None
        if judge is None
        else {"name": judge.name, "version": judge.version, "plugin": judge.plugin},
    )
    if judge is None:
        report.notes.append("no --judge: only the offline metrics of logged sequences")
    else:
        report.query_ids = [int(q) for q in pools.query_ids.tolist()]
    for name, model in policies.items():
        metrics: dict[str, float] = {}
        evaluator = Evaluator(model.to(device), emb, torch.device(device), batch_size)
        if table is not None:
            metrics.update(evaluator.validate(table))
        report.selectors[name] = metrics
        if judge is not None:
            picks = select_greedy(model, pools, emb, steps, batch_size, device).picks
            report.add_judged(name, judge_per_query(judge, pools, picks))
        echo(f"evaluated {name}")
    if judge is not None:
        _judge_baselines(report, judge, pools, emb, steps, baselines)
        report.judge_cost = judge.cost.metrics()
    return report


def _policies_to_measure(
    plugins: PluginSet,
    checkpoints: Sequence[str],
    input_dim: int,
    baselines: Sequence[str],
    trust: bool,
) -> dict[str, Policy]:
    """Every checkpoint's policy by its path, then (with the ``start`` baseline) the policy
    the first checkpoint's run started from, where it can be rebuilt."""
    policies: dict[str, Policy] = {}
    for path in checkpoints:
        model, _ = policy_from_checkpoint(plugins, path, input_dim, trust)
        policies[path] = model
    if "start" in baselines and checkpoints:
        start = start_policy_of(plugins, checkpoints[0], input_dim, trust)
        if start is not None:
            policies["start"] = start
    return policies


def _check_pools_hold(pools: PoolTable, steps: int, queries: Path) -> None:
    """Fail, naming the first such query, when a pool holds fewer ids than ``steps``."""
    short = int(pools.pool_len.min())
    if short < steps:
        row = int((pools.pool_len < steps).nonzero()[0, 0])
        raise LeverError(
            f"{queries}: query {int(pools.query_ids[row])}'s pool holds {short} ids, fewer "
            f"than the {steps} demonstrations to select (--shots)"
        )


def _judge_baselines(
    report: Report,
    judge: Judge,
    pools: PoolTable,
    emb: Embeddings,
    steps: int,
    baselines: Sequence[str],
) -> None:
    """Add the judged scores of the requested non-learned baselines (random, cosine,
    cosine-reversed, best) to ``report``, with a note on how random and best were found."""
    exact = None
    if "random" in baselines or "best" in baselines:
        exact = exhaustive_baselines(judge, pools, steps)
    if "random" in baselines:
        if exact is not None:
            report.add_judged("random", exact["random"])
            report.notes.append("random: exact expectation over every ordered sequence")
        else:
            report.add_judged("random", random_baseline(judge, pools, steps))
            report.notes.append("random: mean of 20 seeded draws")
    for name, reverse in (("cosine", False), ("cosine-reversed", True)):
        if name in baselines:
            picks = cosine_selection(pools, emb, steps, reverse)
            report.add_judged(name, judge_per_query(judge, pools, picks))
    if "best" in baselines:
        if exact is not None:
            report.add_judged("best", exact["best"])
        else:
            report.notes.append(
                "best: left out (the judge is not cheap, or pools hold too many sequences)"
            )


def _recorded_shots(checkpoints: Sequence[str]) -> int | None:
    for path in checkpoints:
        recorded = recorded_policy(header_metadata(path))
        if recorded is not None and isinstance(recorded[1].get("shots"), int):
            return int(recorded[1]["shots"])
    return None


__all__ = [
    "BASELINES",
    "HEURISTICS",
    "Report",
    "evaluate",
    "has_logged_sequences",
    "start_policy_of",
]

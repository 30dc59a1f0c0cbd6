"""``lever-train evaluate``: checkpoints and baselines side by side on one query file.

For every selector — each checkpoint, the starting policy of the first checkpoint's run
(``start``), and the baselines ``random``, ``cosine``, ``cosine-reversed`` and ``best``
— on the same queries:

* with a judge, the downstream verdicts of its free greedy selection over each whole
  pool (``judge_correct``, ``judge_reward``; docs/algorithm.md#judging);
* where the file has logged sequences, the offline validation metrics for the
  policies (``val_loss``, ``policy_reward@1``, ...).
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
    judge_selection,
    random_baseline,
)

#: Baselines ``evaluate`` knows.
BASELINES = ("random", "cosine", "cosine-reversed", "start", "best")
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
    """What ``evaluate`` measured: one metrics dict per selector, in order."""

    queries: str
    n_queries: int
    steps: int
    judge: dict[str, Any] | None
    selectors: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        """The report as JSON text."""
        return json.dumps(
            {
                "queries": self.queries,
                "n_queries": self.n_queries,
                "steps": self.steps,
                "judge": self.judge,
                "selectors": self.selectors,
                "notes": self.notes,
            },
            indent=2,
        )

    def table(self) -> list[str]:
        """The report as aligned text lines."""
        cols = [c for c in COLUMNS if any(c in m for m in self.selectors.values())]
        width = max([len("selector"), *(len(n) for n in self.selectors)]) + 2
        lines = ["selector".ljust(width) + "".join(f"{c:>18}" for c in cols)]
        for name, metrics in self.selectors.items():
            cells = "".join(f"{metrics[c]:>18.4f}" if c in metrics else f"{'-':>18}" for c in cols)
            lines.append(name.ljust(width) + cells)
        return lines


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
    max_pool: int = 64,
    batch_size: int = 256,
    device: str = "cpu",
    trust: bool = False,
    echo: Callable[[str], None] = print,
) -> Report:
    """Measure every selector (see the module docstring)."""
    pools = PoolTable.from_table(table) if table is not None else load_pools(queries, max_pool)
    check_pool_ids(pools, emb, str(queries))
    policies: dict[str, Policy] = {}
    for path in checkpoints:
        model, _ = policy_from_checkpoint(plugins, path, emb.dim, trust)
        policies[path] = model
    if "start" in baselines and checkpoints:
        start = start_policy_of(plugins, checkpoints[0], emb.dim, trust)
        if start is not None:
            policies["start"] = start
    if steps is None:
        steps = table.seq_len if table is not None else _recorded_shots(checkpoints) or 2
    short = int(pools.pool_len.min())
    if short < steps:
        row = int((pools.pool_len < steps).nonzero()[0, 0])
        raise LeverError(
            f"{queries}: query {int(pools.query_ids[row])}'s pool holds {short} ids, fewer "
            f"than the {steps} demonstrations to select (--shots)"
        )
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
    for name, model in policies.items():
        metrics: dict[str, float] = {}
        evaluator = Evaluator(model.to(device), emb, torch.device(device), batch_size)
        if table is not None:
            metrics.update(evaluator.validate(table))
        if judge is not None:
            picks = select_greedy(model, pools, emb, steps, batch_size, device).picks
            metrics.update(judge_selection(judge, pools, picks))
        report.selectors[name] = metrics
        echo(f"evaluated {name}")
    if judge is not None:
        exact = None
        if "random" in baselines or "best" in baselines:
            exact = exhaustive_baselines(judge, pools, steps)
        if "random" in baselines:
            if exact is not None:
                report.selectors["random"] = exact["random"]
                report.notes.append("random: exact expectation over every ordered sequence")
            else:
                report.selectors["random"] = random_baseline(judge, pools, steps)
                report.notes.append("random: mean of 20 seeded draws")
        for name, reverse in (("cosine", False), ("cosine-reversed", True)):
            if name in baselines:
                picks = cosine_selection(pools, emb, steps, reverse)
                report.selectors[name] = judge_selection(judge, pools, picks)
        if "best" in baselines:
            if exact is not None:
                report.selectors["best"] = exact["best"]
            else:
                report.notes.append(
                    "best: left out (the judge is not cheap, or pools hold too many sequences)"
                )
    return report


def _recorded_shots(checkpoints: Sequence[str]) -> int | None:
    for path in checkpoints:
        recorded = recorded_policy(header_metadata(path))
        if recorded is not None and isinstance(recorded[1].get("shots"), int):
            return int(recorded[1]["shots"])
    return None


__all__ = ["BASELINES", "Report", "evaluate", "has_logged_sequences", "start_policy_of"]

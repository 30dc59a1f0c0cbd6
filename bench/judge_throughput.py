"""Judge throughput against a judge with a fixed latency: in-process and over Ray actors.

    python bench/judge_throughput.py                      # 50 ms per batch, batches of 16
    python bench/judge_throughput.py --latency 0.2 --batches 32

The judge sleeps ``--latency`` seconds per call (a model's forward pass on a GPU takes
50 ms to 1 s) and answers a fixed verdict per pair. Each row judges ``--batches``
batches of ``--batch-size`` unseen pairs through the run's own path (a
:class:`~lever_trainer.judge.Judge`, its driver, the verdict checks; no store) and
reports verdicts/s and the ratio to the ideal, ``concurrency * batch / latency``:

* ``local``: the environment in this process, the driver's threads at concurrency 1
  and 4;
* ``ray``: ``--judge-backend ray`` with 1, 2 and 4 workers (one environment per Ray
  actor, the driver's concurrency equal to the workers), on a local Ray cluster
  started here with one CPU slot per worker (the judge only sleeps).

The actors are started, and a warm-up round judged, before the clock starts. It ends
with the 4-worker / 1-worker speed-up of the Ray rows. Not a test; needs the ``ray``
extra for the Ray rows (without it, they are skipped with a line saying so).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

from lever_trainer.judge import Environment, Judge
from lever_trainer.judge_driver import DriverSettings

VERDICT = {"vqa_correct": 1.0, "vqa_acc_score": 0.5, "vqa_gt_prob": 0.25, "vqa_rel_score": 0.0}


class FixedLatency(Environment):
    """Sleeps ``latency`` seconds per call; one fixed verdict per pair."""

    name, version = "fixed-latency", "1"

    def __init__(self, latency: float) -> None:
        self.latency = latency

    def judge(
        self, query_ids: Sequence[int], sequences: Sequence[Sequence[int]]
    ) -> list[dict[str, float]]:
        time.sleep(self.latency)
        return [dict(VERDICT) for _ in query_ids]


class Build:
    """Builds a :class:`FixedLatency` inside a Ray actor (shipped by value)."""

    def __init__(self, latency: float) -> None:
        self.latency = latency

    def __call__(self) -> Environment:
        return FixedLatency(self.latency)


def round_of(env: Environment, concurrency: int, batch: int, batches: int, start: int) -> float:
    """Seconds to judge ``batches`` batches of unseen pairs (query ids from ``start``)."""
    judge = Judge(
        env,
        "bench",
        None,
        lambda v: v["vqa_acc_score"],
        driver=DriverSettings(batch_size=batch, concurrency=concurrency),
    )
    judge._bar = lambda total: None  # type: ignore[method-assign]  # no progress bar
    n = batch * batches
    qids = list(range(start, start + n))
    seqs = [[1, 2]] * n
    t0 = time.perf_counter()
    judge.verdicts(qids, seqs)
    return time.perf_counter() - t0


def row(kind: str, n: int, env: Environment, args: argparse.Namespace, at: int) -> list[Any]:
    round_of(env, n, args.batch_size, n, at)  # warm-up: one batch per worker
    seconds = round_of(env, n, args.batch_size, args.batches, at + 10_000_000)
    verdicts = args.batch_size * args.batches / seconds
    ideal = n * args.batch_size / args.latency
    return [kind, n, round(seconds, 3), round(verdicts, 1), round(ideal, 1), verdicts / ideal]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--latency", type=float, default=0.05, help="seconds per call")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batches", type=int, default=64, help="batches per measured round")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    rows = []
    local = FixedLatency(args.latency)
    for c in (1, 4):
        rows.append(row("local", c, local, args, 100_000_000 * c))
    try:
        import ray
    except ImportError:
        ray = None
        print("ray rows skipped: Ray is not installed (pip install 'lever-trainer[ray]')")
    if ray is not None:
        from lever_trainer.ray_judge import RayEnvironment

        ray.init(num_cpus=max(args.workers), include_dashboard=False, log_to_driver=False)
        try:
            for w in args.workers:
                env = RayEnvironment(local, "bench", Build(args.latency), workers=w)
                try:
                    rows.append(row("ray", w, env, args, 1_000_000_000 * w))
                finally:
                    env.close()
        finally:
            ray.shutdown()
    print(
        f"judge latency {args.latency * 1000:g} ms per call, batches of {args.batch_size}, "
        f"{args.batches} batches per round"
    )
    print("| backend | concurrency (workers) | seconds | verdicts/s | ideal | of ideal |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind, n, seconds, rate, ideal, share in rows:
        print(f"| {kind} | {n} | {seconds} | {rate} | {ideal} | {share:.0%} |")
    ray_rates = {r[1]: r[3] for r in rows if r[0] == "ray"}
    if 1 in ray_rates and 4 in ray_rates:
        print(f"ray: 4 workers judge {ray_rates[4] / ray_rates[1]:.2f}x as fast as 1")


if __name__ == "__main__":
    main()

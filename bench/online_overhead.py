"""The trainer's own time per online round against the judge's, with a judge of fixed latency.

    pip install examples/digits_env
    python bench/online_overhead.py                          # 50 ms per batch of 64
    python bench/online_overhead.py --latency 0.5 --concurrency 1,8 --recipes online

A judged phase spends each round (epoch) waiting for verdicts and training on them. This
script measures both sides in real training runs on the bundled digits task t0: the judge
is the digits judge behind a wrapper (an environment ``slow-digits``, put on
``PYTHONPATH`` as a plugin for the run) that sleeps ``--latency`` seconds per call of
``--batch`` pairs, like a model server's forward pass of a batch. ``--judge-concurrency``
calls are in flight. Every run starts with an empty verdict store. From each judged
epoch's ``metrics.jsonl`` line: ``judge_seconds`` (the wait on the judge) and
``epoch_seconds - judge_seconds`` (everything else: the trainer's own time, building the
round, storing verdicts, the updates). Printed per recipe and concurrency: verdicts per
round, judge and trainer seconds per round (means over the rounds that judged), the ratio
trainer / judge, and the judge speed (verdicts/s) at which the trainer's time would be 5 %
of the judge's. Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RECIPES = {
    "online": ["--plugin", "online", "--rce-epochs", "0", "--grpo-epochs", "0"],
    "judge-rank": ["--plugin", "judge-rank", "--rce-epochs", "0", "--rank-rounds", "3"],
}

PLUGIN = """
import os, time
from lever_digits_env import DigitsEnvironment
from lever_trainer.api import About, hookimpl


class SlowDigits(DigitsEnvironment):
    name = "slow-digits"

    def judge(self, query_ids, sequences):
        time.sleep(float(os.environ["SLOW_JUDGE_LATENCY"]))
        return super().judge(query_ids, sequences)


@hookimpl
def about():
    return About(description="environment `slow-digits` (bench only)", enabled_by_default=True)


@hookimpl
def environments():
    return {"slow-digits": SlowDigits()}
"""


def write_plugin(folder: Path) -> None:
    """The ``slow-digits`` environment as an importable module with an entry point."""
    (folder / "lever_slow_digits.py").write_text(PLUGIN)
    info = folder / "lever_slow_digits-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lever-slow-digits\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[lever_trainer]\nslow-digits = lever_slow_digits\n")


def run(recipe: str, concurrency: int, args: argparse.Namespace, work: Path) -> list[dict]:
    import lever_digits_env

    data = lever_digits_env.task_folder("t0")
    out = work / f"{recipe}-c{concurrency}"
    cmd = [sys.executable, "-m", "lever_trainer"]
    cmd += ["--beam-data", str(data / "digits_rl_train.json")]
    cmd += ["--img-emb", str(data / "digits_emb.safetensors")]
    cmd += ["--judge", "slow-digits", "--judge-batch-size", str(args.batch)]
    cmd += ["--judge-concurrency", str(concurrency), "--store", str(out / "verdicts.sqlite")]
    cmd += ["--output-dir", str(out / "run"), "--no-cache", "--overwrite", *RECIPES[recipe]]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(work / "plugin"), os.environ.get("PYTHONPATH", "")]),
        "SLOW_JUDGE_LATENCY": str(args.latency),
        "OMP_NUM_THREADS": str(args.threads),
        "XDG_CONFIG_HOME": str(work / "config"),
    }
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("judge_calls", 0) > 0]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--latency", type=float, default=0.05, help="seconds per judge call")
    ap.add_argument("--batch", type=int, default=64, help="pairs per judge call")
    ap.add_argument("--concurrency", default="1,8", help="judge calls in flight, comma list")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lever-overhead-") as tmp:
        work = Path(tmp)
        (work / "plugin").mkdir()
        write_plugin(work / "plugin")
        print(
            f"judge: {args.latency * 1000:.0f} ms per call of {args.batch} pairs; "
            "digits task t0; means over the rounds that judged"
        )
        print(
            f"{'recipe':<11} {'in flight':>9} {'rounds':>6} {'verdicts':>9} "
            f"{'judge s':>8} {'trainer s':>9} {'trainer/judge':>13} {'5 % at (v/s)':>12}"
        )
        for recipe in args.recipes.split(","):
            for c in (int(x) for x in args.concurrency.split(",")):
                rows = run(recipe, c, args, work)
                calls = statistics.mean(r["judge_calls"] for r in rows)
                judge = statistics.mean(r["judge_seconds"] for r in rows)
                trainer = statistics.mean(r["epoch_seconds"] - r["judge_seconds"] for r in rows)
                # trainer = 5 % of the judge when the judge takes 20 x trainer seconds
                at_five = calls / (20 * trainer)
                print(
                    f"{recipe:<11} {c:>9} {len(rows):>6} {calls:>9.0f} {judge:>8.2f} "
                    f"{trainer:>9.3f} {trainer / judge:>12.1%} {at_five:>12.0f}"
                )


if __name__ == "__main__":
    main()

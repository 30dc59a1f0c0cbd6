"""Selector quality on the digits task: trained recipes against the heuristics.

    pip install examples/digits_env          # the task's data and its judge
    python bench/quality.py                  # 3 seeds; about 3 minutes on 2 CPU cores
    python bench/quality.py --seeds 0,1,2,3,4 --workdir /tmp/q

Trains, for every seed, through the real command line:

* ``default``  - the project's default offline recipe (logged sequences only);
* ``online``   - the default recipe, then the ``online`` phase with the digits judge;
* ``upstream`` - the reference algorithm's settings (docs/algorithm.md#reference-settings);

then runs ``lever-train evaluate`` once over every checkpoint on the 297 held-out test
queries (pools only), with the baselines: random pair (exact expectation over every
ordered pair), cosine top-2 in both orders, the best pair of each pool. It prints the
downstream accuracy (``vqa_correct`` of the greedy free selection) and mean raw reward,
mean and spread (min-max) over the seeds, the judge calls per training query of the
online recipe, and the wall time of each training run. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: Extra training options of each recipe, on top of the project's defaults.
RECIPES: dict[str, list[str]] = {
    "default": [],
    "online": ["--judge", "digits", "--plugin", "online"],
    "upstream": ["--preset", "upstream"],
}


def lever_train(*args: str, env: dict[str, str]) -> str:
    cmd = [sys.executable, "-m", "lever_trainer", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stdout}\n{done.stderr}")
    return done.stdout


def last_checkpoint(run: Path) -> Path:
    """The run's final epoch checkpoint (the one written last)."""
    return max(run.glob("*_epoch*.safetensors"), key=lambda p: p.stat().st_mtime_ns)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lever-quality")
    args = ap.parse_args()
    try:
        import lever_digits_env
    except ImportError:
        sys.exit("bench/quality.py needs the digits environment: pip install examples/digits_env")
    files = lever_digits_env.files()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    store = work / "verdicts.sqlite"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    seeds = [int(s) for s in args.seeds.split(",")]
    common = [
        "--beam-data",
        str(files["train"]),
        "--img-emb",
        str(files["embeddings"]),
        "--store",
        str(store),
        "--overwrite",
        "--no-cache",
    ]
    checkpoints: dict[str, list[Path]] = {r: [] for r in RECIPES}
    seconds: dict[str, list[float]] = {r: [] for r in RECIPES}
    calls: list[float] = []
    for seed in seeds:
        for recipe, extra in RECIPES.items():
            run = work / f"{recipe}-seed{seed}"
            t0 = time.perf_counter()
            lever_train(*common, "--output-dir", str(run), "--seed", str(seed), *extra, env=env)
            seconds[recipe].append(time.perf_counter() - t0)
            checkpoints[recipe].append(last_checkpoint(run))
            if recipe == "online":
                history = (run / "metrics.jsonl").read_text().splitlines()
                calls.append(json.loads(history[-1])["judge_calls_per_query"])
            print(f"trained {recipe} seed {seed} in {seconds[recipe][-1]:.1f} s", flush=True)
    report = work / "evaluate.json"
    every = [str(p) for r in RECIPES for p in checkpoints[r]]
    lever_train(
        "evaluate",
        *every,
        "--queries",
        str(files["test"]),
        "--img-emb",
        str(files["embeddings"]),
        "--judge",
        "digits",
        "--store",
        str(store),
        "--output",
        str(report),
        "--baselines",
        "random,cosine,cosine-reversed,best",
        env=env,
    )
    selectors = json.loads(report.read_text())["selectors"]

    def row(name: str, values: list[dict[str, float]], extra: str = "") -> str:
        acc = [v["judge_correct"] for v in values]
        reward = [v["judge_reward"] for v in values]
        spread = f"{min(acc):.3f}-{max(acc):.3f}" if len(acc) > 1 else "-"
        return (
            f"{name:<34}{statistics.mean(acc):>9.4f}{spread:>14}"
            f"{statistics.mean(reward):>9.3f}  {extra}"
        )

    n = json.loads(report.read_text())["n_queries"]
    print(f"\ndigits task, {n} test queries, greedy free selection, seeds {args.seeds}")
    print(f"{'selector':<34}{'accuracy':>9}{'(min-max)':>14}{'reward':>9}  notes")
    print(row("random pair (exact expectation)", [selectors["random"]]))
    print(row("top-2 by cosine", [selectors["cosine"]]))
    print(row("top-2 by cosine, reversed", [selectors["cosine-reversed"]]))
    print(row("best pair in each pool", [selectors["best"]]))
    for recipe, label in (
        ("default", "default offline recipe"),
        ("online", "online recipe (default + online)"),
        ("upstream", "upstream preset (reference)"),
    ):
        values = [selectors[str(p)] for p in checkpoints[recipe]]
        note = f"train {statistics.mean(seconds[recipe]):.1f} s/seed"
        if recipe == "online":
            note += f", {statistics.mean(calls):.1f} judge calls per training query"
        print(row(label, values, note))


if __name__ == "__main__":
    main()

"""Selector quality on the six digits tasks: trained recipes against the heuristics.

    pip install examples/digits_env          # the tasks' data and their judges
    python bench/quality.py                  # 6 tasks x 3 seeds x 3 recipes
    python bench/quality.py --tasks t1,t3 --recipes default,online --seeds 0,1,2,3,4

For every task (``t0``, the bundled default, and its siblings ``t1``-``t5``: other
splits, embedding widths, pool sizes and judge parameters) and every seed, each recipe
trains through the real command line on the task's 700 training queries:

* ``default``  - the project's default offline recipe (logged sequences only);
* ``online``   - the ``judge-rank`` phase with the task's judge, from the untrained
  policy (no RCE: chosen by ``bench/cv.py`` on the training queries);
* ``online-grpo`` - the default recipe, then the group-relative ``online`` phase (no KL
  term: ``ppo-clip-only``);
* ``upstream`` - the reference algorithm's settings (``--preset upstream``);

then ``lever-train evaluate`` scores every run's final policy (its last epoch), and its
``best.safetensors`` (the validation choice, which may be the starting policy), with the
baselines on the task's 297 held-out test
queries, which no choice ever looks at: random pair (exact expectation), cosine top-2 in
both orders and the best pair of each pool. The **best heuristic** of a task is the better
of the two cosine orders there.

Printed per task and recipe: downstream accuracy (``vqa_correct`` of the greedy free
selection; mean and min-max over the seeds) and the difference against the best
heuristic in points, with a paired bootstrap 95 % interval over the test queries (each
query's correctness averaged over the seeds). Then the mean over the tasks of that
difference, with a bootstrap interval that resamples each task's queries on its own, the
worst task, and for ``online`` its difference against ``default`` and the judge calls per
training query. ``--output`` writes it all as JSON. Not a test.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lever_trainer.checkpoint import header_metadata
from lever_trainer.stats import bootstrap_means, interval, paired_difference

#: Extra training options of each recipe, on top of the project's defaults.
RECIPES: dict[str, list[str]] = {
    "default": [],
    "online": ["--judge", "digits", "--plugin", "judge-rank", "--rce-epochs", "0"],
    # ppo-clip-only: the online objective without a KL term, as this recipe was measured
    "online-grpo": ["--judge", "digits", "--plugin", "online", "--plugin", "ppo-clip-only"],
    # The preset pins the reference's --max-pool 64 (its pools' size); t5's pools hold 128.
    "upstream": ["--preset", "upstream", "--max-pool", "128"],
    # the default with the decoding order chosen from the logged verdicts (not the default)
    "auto-order": ["--bilinear-order", "auto"],
}
TASKS = ("t0", "t1", "t2", "t3", "t4", "t5")
HEURISTICS = ("cosine", "cosine-reversed")


def lever_train(*args: str, env: dict[str, str]) -> str:
    cmd = [sys.executable, "-m", "lever_trainer", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stdout}\n{done.stderr}")
    return done.stdout


def last_checkpoint(run: Path) -> Path:
    """The run's final policy: its last epoch checkpoint."""
    return max(run.glob("*_epoch*.safetensors"), key=lambda p: p.stat().st_mtime_ns)


def train(
    task: str, recipe: str, seed: int, files: dict[str, Path], work: Path, env: dict[str, str]
) -> dict[str, Any]:
    run = work / task / f"{recipe}-seed{seed}"
    args = ["--beam-data", str(files["train"]), "--img-emb", str(files["embeddings"])]
    args += ["--store", str(work / "verdicts.sqlite"), "--overwrite", "--no-cache"]
    args += ["--digits-task", task, "--output-dir", str(run), "--seed", str(seed)]
    t0 = time.perf_counter()
    lever_train(*args, *RECIPES[recipe], env=env)
    best = run / "best.safetensors"
    out: dict[str, Any] = {
        "best": str(best) if best.is_file() else None,
        "seconds": time.perf_counter() - t0,
        "checkpoint": str(last_checkpoint(run)),
    }
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    calls = [h["judge_calls_per_query"] for h in history if "judge_calls_per_query" in h]
    if calls:
        out["judge_calls_per_query"] = calls[-1]
    print(f"  {task} {recipe} seed {seed}: {out['seconds']:.1f} s", flush=True)
    return out


def seed_mean(per_query: dict[str, Any], names: list[str]) -> list[float]:
    """Each query's correctness averaged over the runs ``names``."""
    columns = [per_query[n]["judge_correct"] for n in names]
    return [sum(v) / len(v) for v in zip(*columns, strict=True)]


def exact_best_pair(task: str, test_file: Path, query_ids: list[int]) -> float:
    """The share of test queries with at least one correct ordered pair in their pool,
    judged pair by pair with the task's judge (no verdict store)."""
    from itertools import permutations

    import lever_digits_env

    env = lever_digits_env.DigitsEnvironment(lever_digits_env.task_folder(task))
    queries = json.loads(test_file.read_text())
    solvable = 0
    for q in query_ids:
        pairs = [list(p) for p in permutations(queries[str(q)]["candidate_pool_ids"], 2)]
        verdicts = env.judge([q] * len(pairs), pairs)
        solvable += any(v["vqa_correct"] > 0 for v in verdicts)
    return solvable / len(query_ids)


def points(triple: tuple[float, float, float] | list[float]) -> str:
    d, lo, hi = (100 * v for v in triple)
    return f"{d:+6.2f} [{lo:+6.2f}, {hi:+6.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per training run")
    ap.add_argument("--jobs", type=int, default=2, help="training runs at once")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lever-quality")
    ap.add_argument("--output", type=Path, help="write the figures as JSON")
    args = ap.parse_args()
    try:
        import lever_digits_env
    except ImportError:
        sys.exit("bench/quality.py needs the digits environment: pip install examples/digits_env")
    tasks, recipes = args.tasks.split(","), args.recipes.split(",")
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        sys.exit(f"--recipes: unknown {', '.join(unknown)} (known: {', '.join(RECIPES)})")
    seeds = [int(s) for s in args.seeds.split(",")]
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    results: dict[str, Any] = {}
    for task in tasks:
        files = lever_digits_env.files(task)
        jobs = [(r, s) for r in recipes for s in seeds]
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            runs = dict(
                zip(
                    jobs,
                    pool.map(lambda j, t=task, f=files: train(t, j[0], j[1], f, work, env), jobs),
                    strict=True,
                )
            )
        report_path = work / task / "evaluate.json"
        lever_train(
            "evaluate",
            *[runs[j]["checkpoint"] for j in jobs],
            *[runs[j]["best"] for j in jobs if runs[j]["best"]],
            "--queries", str(files["test"]),
            "--img-emb", str(files["embeddings"]),
            "--judge", "digits", "--digits-task", task,
            "--store", str(work / "verdicts.sqlite"),
            "--baselines", "random,cosine,cosine-reversed,best",
            "--output", str(report_path),
            env={**env, "OMP_NUM_THREADS": str(max(args.threads, args.jobs))},
        )  # fmt: skip
        report = json.loads(report_path.read_text())
        sel, per_query = report["selectors"], report["per_query"]
        best_h = max(HEURISTICS, key=lambda h: sel[h]["judge_correct"])
        if "best" in sel:
            best_pair = sel["best"]["judge_correct"]
        else:  # evaluate leaves it out past 5,000 ordered pairs a pool (t5: 16,256)
            best_pair = exact_best_pair(task, files["test"], report["query_ids"])
        task_out: dict[str, Any] = {
            "n_queries": report["n_queries"],
            "best_heuristic": best_h,
            "baselines": {b: sel[b]["judge_correct"] for b in ("random", *HEURISTICS)},
            "heuristic_per_query": per_query[best_h]["judge_correct"],
            "best_pair": best_pair,
            "recipes": {},
        }
        for recipe in recipes:
            names = [runs[(recipe, s)]["checkpoint"] for s in seeds]
            accs = [sel[n]["judge_correct"] for n in names]
            averaged = seed_mean(per_query, names)
            entry = {
                "accuracy": statistics.mean(accs),
                "seeds": accs,
                "per_query": averaged,
                "vs_best_heuristic": list(
                    paired_difference(averaged, task_out["heuristic_per_query"])
                ),
                "train_seconds": statistics.mean(runs[(recipe, s)]["seconds"] for s in seeds),
            }
            bests = [runs[(recipe, s)]["best"] for s in seeds]
            if all(bests):
                entry["best_checkpoint_accuracy"] = statistics.mean(
                    sel[b]["judge_correct"] for b in bests
                )
                entry["best_checkpoint_is_start"] = sum(
                    header_metadata(b).get("phase") == "start" for b in bests
                )
            calls = [runs[(recipe, s)].get("judge_calls_per_query") for s in seeds]
            if all(c is not None for c in calls):
                entry["judge_calls_per_query"] = statistics.mean(calls)  # type: ignore[arg-type]
            task_out["recipes"][recipe] = entry
        results[task] = task_out
        print_task(task, task_out, seeds)
    summary = print_summary(results, recipes, tasks)
    if args.output:
        args.output.write_text(
            json.dumps({"tasks": results, "summary": summary, "seeds": seeds}, indent=1)
        )


def print_task(task: str, out: dict[str, Any], seeds: list[int]) -> None:
    b = out["baselines"]
    print(
        f"\n{task}: {out['n_queries']} test queries; random {b['random']:.4f}, cosine "
        f"{b['cosine']:.4f}, reversed {b['cosine-reversed']:.4f}, "
        f"best pair {out['best_pair']:.4f}; "
        f"best heuristic {out['best_heuristic']}"
    )
    print(
        f"  {'recipe':<10}{'accuracy':>9}{'seeds (min-max)':>17}   vs best heuristic, points [95%]"
    )
    for recipe, e in out["recipes"].items():
        spread = f"{min(e['seeds']):.3f}-{max(e['seeds']):.3f}"
        note = f"   train {e['train_seconds']:.1f} s/seed"
        if "judge_calls_per_query" in e:
            note += f", {e['judge_calls_per_query']:.1f} judge calls per training query"
        if "best_checkpoint_accuracy" in e:
            note += (
                f"; best.safetensors {e['best_checkpoint_accuracy']:.4f} (the start in "
                f"{e['best_checkpoint_is_start']} of {len(seeds)} runs)"
            )
        print(
            f"  {recipe:<10}{e['accuracy']:>9.4f}{spread:>17}   "
            f"{points(e['vs_best_heuristic'])}{note}"
        )


def print_summary(results: dict[str, Any], recipes: list[str], tasks: list[str]) -> dict[str, Any]:
    print(f"\nover the {len(tasks)} tasks: mean of (selector - best heuristic), points, with a")
    print("bootstrap 95 % interval resampling each task's test queries; the worst task")
    summary: dict[str, Any] = {}
    for recipe in recipes:
        diffs = [
            [
                a - h
                for a, h in zip(
                    results[t]["recipes"][recipe]["per_query"],
                    results[t]["heuristic_per_query"],
                    strict=True,
                )
            ]
            for t in tasks
        ]
        mean = statistics.mean(results[t]["recipes"][recipe]["vs_best_heuristic"][0] for t in tasks)
        low, high = interval(bootstrap_means(diffs))
        worst = min(tasks, key=lambda t: results[t]["recipes"][recipe]["vs_best_heuristic"][0])
        worst_d = results[worst]["recipes"][recipe]["vs_best_heuristic"][0]
        summary[recipe] = {
            "mean_vs_best_heuristic": [mean, low, high],
            "worst_task": [worst, worst_d],
        }
        print(f"  {recipe:<10}{points((mean, low, high))}   worst {worst} {100 * worst_d:+.2f}")
    if "online" in recipes and "default" in recipes:
        diffs = [
            [
                a - b
                for a, b in zip(
                    results[t]["recipes"]["online"]["per_query"],
                    results[t]["recipes"]["default"]["per_query"],
                    strict=True,
                )
            ]
            for t in tasks
        ]
        mean = statistics.mean(statistics.mean(d) for d in diffs)
        low, high = interval(bootstrap_means(diffs))
        per_task = {t: statistics.mean(d) for t, d in zip(tasks, diffs, strict=True)}
        calls = statistics.mean(
            results[t]["recipes"]["online"].get("judge_calls_per_query", float("nan"))
            for t in tasks
        )
        summary["online_vs_default"] = {
            "mean": [mean, low, high],
            "per_task": per_task,
            "judge_calls_per_query": calls,
        }
        shown = ", ".join(f"{t} {100 * d:+.2f}" for t, d in per_task.items())
        print(
            f"  online - default: {points((mean, low, high))}; per task {shown}; "
            f"{calls:.1f} judge calls per training query"
        )
    return summary


if __name__ == "__main__":
    main()

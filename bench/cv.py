"""Cross-validation of a training recipe on the training queries of the digits tasks.

    pip install examples/digits_env
    python bench/cv.py --extra "--judge digits --plugin judge-rank"
    python bench/cv.py --extra "--judge digits --plugin judge-rank --rank-penalty 1e-2" --folds 5

How the recipes' hyper-parameters are chosen without looking at any test query: each
task's 700 training queries are split into ``--folds`` folds (a fixed seeded
permutation); for each fold the recipe trains, through the real command line, on the
other folds' queries (their logged sequences, and the judge on those queries only) and
``lever-train evaluate`` scores its final policy on the held-out fold's queries with the
task's judge, next to cosine top-2 in both orders. Printed per task and over the tasks:
held-out accuracy minus the best heuristic on the same queries (the better of the two
orders over all the task's held-out queries), in points. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

TASKS = ("t0", "t1", "t2", "t3", "t4", "t5")


def lever_train(*args: str, env: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "lever_trainer", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stdout}\n{done.stderr}")


def last_checkpoint(run: Path) -> Path:
    return max(run.glob("*_epoch*.safetensors"), key=lambda p: p.stat().st_mtime_ns)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--extra", default="", help="training options of the recipe")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lever-cv")
    args = ap.parse_args()
    import lever_digits_env

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    extra = shlex.split(args.extra)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    gains: dict[str, float] = {}
    for task in args.tasks.split(","):
        files = lever_digits_env.files(task)
        doc = json.loads(Path(files["train"]).read_text())
        qids = [k for k in doc if k.isdigit()]
        random.Random(1234).shuffle(qids)
        picked: list[float] = []
        heuristics: dict[str, list[float]] = {"cosine": [], "cosine-reversed": []}
        for fold in range(args.folds):
            held = set(qids[fold :: args.folds])
            base = work / task / f"fold{fold}"
            base.mkdir(parents=True, exist_ok=True)
            train_file, held_file = base / "train.json", base / "held.json"
            meta = {k: v for k, v in doc.items() if not k.isdigit()}
            train_file.write_text(
                json.dumps({**meta, **{q: doc[q] for q in qids if q not in held}})
            )
            held_file.write_text(json.dumps({q: doc[q] for q in qids if q in held}))
            run = base / "run"
            lever_train(
                "--beam-data", str(train_file), "--img-emb", str(files["embeddings"]),
                "--digits-task", task, "--store", str(work / "verdicts.sqlite"),
                "--output-dir", str(run), "--overwrite", "--no-cache", "--seed", str(args.seed),
                *extra, env=env,
            )  # fmt: skip
            report = base / "evaluate.json"
            lever_train(
                "evaluate", str(last_checkpoint(run)), "--queries", str(held_file),
                "--img-emb", str(files["embeddings"]), "--judge", "digits",
                "--digits-task", task, "--store", str(work / "verdicts.sqlite"),
                "--baselines", "cosine,cosine-reversed", "--output", str(report), env=env,
            )  # fmt: skip
            per_query = json.loads(report.read_text())["per_query"]
            picked += per_query[str(last_checkpoint(run))]["judge_correct"]
            for h in heuristics:
                heuristics[h] += per_query[h]["judge_correct"]
        best = max(statistics.mean(v) for v in heuristics.values())
        gains[task] = statistics.mean(picked) - best
        print(f"{task}: held-out {statistics.mean(picked):.4f}, best heuristic {best:.4f}, "
              f"{100 * gains[task]:+.2f} points", flush=True)  # fmt: skip
    shown = " ".join(f"{t} {100 * g:+.2f}" for t, g in gains.items())
    print(f"cv {args.extra!r}: mean {100 * statistics.mean(gains.values()):+.2f} points ({shown})")


if __name__ == "__main__":
    main()

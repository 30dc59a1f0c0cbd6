"""Does choosing best.safetensors by validation (the start competing, the paired noise
test) pick a better selector than the last epoch? Test accuracy on the digits tasks.

For every task bundled with the digits environment (``t0``-``t5``) and seed, trains the
default offline recipe through the real command line, selects for the task's held-out
test queries with ``best.safetensors`` and with the last epoch's checkpoint, and scores
both with the task's own judge. Prints one row per task and seed, then the means::

    pip install examples/digits_env
    python bench/do_no_harm.py [--seeds 0,1,2] [--tasks t0,t1,...] [--extra "--judge digits"]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import lever_digits_env

from lever_trainer.checkpoint import header_metadata


def lever(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "lever_trainer", *args], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"lever-train {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def score(task: str, files: dict[str, Path], ckpt: Path, work: Path) -> float:
    """Test accuracy of ``ckpt``'s greedy selection, by the task's judge."""
    picks = work / f"{ckpt.parent.name}-{ckpt.stem}.json"
    lever(
        "select", "--ckpt", str(ckpt), "--queries", str(files["test"]),
        "--img-emb", str(files["embeddings"]), "--output", str(picks),
    )  # fmt: skip
    chosen = {int(q): list(s) for q, s in json.loads(picks.read_text()).items()}
    judge = lever_digits_env.DigitsEnvironment(lever_digits_env.task_folder(task))
    verdicts = judge.judge(list(chosen), list(chosen.values()))
    return float(sum(v["vqa_correct"] for v in verdicts)) / len(verdicts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tasks", default=None, help="comma-separated, e.g. t0,t1")
    parser.add_argument("--extra", default="", help="more lever-train options, quoted")
    args = parser.parse_args()
    tasks = list(lever_digits_env.TASKS)
    if args.tasks:
        tasks = [k for k in tasks if k in args.tasks.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="do-no-harm-") as tmp:
        work = Path(tmp)
        print(f"{'task':<5} {'seed':>4}  {'best.safetensors':>16}  {'last epoch':>10}  chosen")
        for name in tasks:
            files = lever_digits_env.files(name)
            for seed in seeds:
                out = work / f"{name}-s{seed}"
                lever(
                    "--beam-data", str(files["train"]), "--img-emb", str(files["embeddings"]),
                    "--output-dir", str(out), "--seed", str(seed), "--no-cache",
                    "--digits-task", name,
                    *shlex.split(args.extra),
                )  # fmt: skip
                last = sorted(out.glob("*_epoch*.safetensors"))[-1]
                best = out / "best.safetensors"
                meta = header_metadata(best)
                chosen = (
                    "start"
                    if meta.get("phase") == "start"
                    else f"{meta.get('phase')} {meta.get('epoch')}"
                )
                scores = score(name, files, best, work), score(name, files, last, work)
                row = (name, seed, *scores, chosen)
                rows.append(row)
                print(f"{row[0]:<5} {row[1]:>4}  {row[2]:>16.4f}  {row[3]:>10.4f}  {row[4]}")
    n = len(rows)
    mean_best = sum(r[2] for r in rows) / n
    mean_last = sum(r[3] for r in rows) / n
    print(f"mean over {n} runs: best.safetensors {mean_best:.4f}, last epoch {mean_last:.4f}")


if __name__ == "__main__":
    main()

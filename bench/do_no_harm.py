"""Does choosing best.safetensors by validation (the start competing, the paired noise
test) pick a better selector than the last epoch? Test accuracy on the digits tasks.

For every task folder (``../shared/quality`` and its ``tasks/t*``) and seed, trains the
default offline recipe through the real command line, selects for the task's held-out
test queries with ``best.safetensors`` and with the last epoch's checkpoint, and scores
both with the task's own ``digits_oracle.py``. Prints one row per task and seed, then
the means. Needs the quality tasks beside the repository (``../shared/quality``)::

    python bench/do_no_harm.py [--seeds 0,1,2] [--tasks t0,t1,...] [--extra "--judge digits"]
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUALITY = ROOT.parent / "shared" / "quality"


def task_dirs() -> dict[str, Path]:
    """``t0`` (the folder itself) and every ``tasks/t*`` sibling."""
    found = {"t0": QUALITY}
    for sub in sorted((QUALITY / "tasks").glob("t*")):
        found[sub.name] = sub
    return found


def lever(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "lever_trainer", *args], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"lever-train {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def score(task: Path, ckpt: Path, work: Path) -> float:
    """Test accuracy of ``ckpt``'s greedy selection, by the task's own oracle."""
    picks = work / f"{ckpt.parent.name}-{ckpt.stem}.json"
    lever(
        "select", "--ckpt", str(ckpt), "--queries", str(task / "digits_test.json"),
        "--img-emb", str(task / "digits_emb.safetensors"), "--output", str(picks),
    )  # fmt: skip
    out = subprocess.run(
        [sys.executable, str(task / "digits_oracle.py"), "score", str(picks)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"downstream accuracy: ([0-9.]+)", out)
    assert match is not None, out
    return float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tasks", default=None, help="comma-separated, e.g. t0,t1")
    parser.add_argument("--extra", default="", help="more lever-train options, quoted")
    args = parser.parse_args()
    tasks = task_dirs()
    if args.tasks:
        tasks = {k: v for k, v in tasks.items() if k in args.tasks.split(",")}
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="do-no-harm-") as tmp:
        work = Path(tmp)
        print(f"{'task':<5} {'seed':>4}  {'best.safetensors':>16}  {'last epoch':>10}  chosen")
        for name, task in tasks.items():
            for seed in seeds:
                out = work / f"{name}-s{seed}"
                lever(
                    "--beam-data", str(task / "digits_rl_train.json"),
                    "--img-emb", str(task / "digits_emb.safetensors"),
                    "--output-dir", str(out), "--seed", str(seed), "--no-cache",
                    *shlex.split(args.extra),
                )  # fmt: skip
                last = sorted(out.glob("*_epoch*.safetensors"))[-1]
                best = out / "best.safetensors"
                header = json.loads(
                    best.read_bytes()[8 : 8 + int.from_bytes(best.read_bytes()[:8], "little")]
                )
                meta = header.get("__metadata__", {})
                chosen = (
                    "start"
                    if meta.get("phase") == "start"
                    else f"{meta.get('phase')} {meta.get('epoch')}"
                )
                row = (name, seed, score(task, best, work), score(task, last, work), chosen)
                rows.append(row)
                print(f"{row[0]:<5} {row[1]:>4}  {row[2]:>16.4f}  {row[3]:>10.4f}  {row[4]}")
    n = len(rows)
    mean_best = sum(r[2] for r in rows) / n
    mean_last = sum(r[3] for r in rows) / n
    print(f"mean over {n} runs: best.safetensors {mean_best:.4f}, last epoch {mean_last:.4f}")


if __name__ == "__main__":
    main()

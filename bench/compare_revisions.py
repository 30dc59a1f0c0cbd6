"""Throughput of this checkout against an earlier revision, side by side in one run.

    python bench/compare_revisions.py --base c5e3ca7            # 1,000 and 10,000 queries
    python bench/compare_revisions.py --base v0.1.0 --sizes 10000 --repeats 5

The base revision is checked out with ``git worktree`` and installed into its own
virtual environment (torch==2.13.0 first, as the README says), both under
``--workdir`` and reused by later runs. For each size the data of
``bench/throughput.py`` is generated once; then the ``ours`` worker of each side's own
``bench/throughput.py`` (load from the prepared form, reference log-probs, one RCE
epoch, one GRPO epoch, greedy select) runs in its own process, alternating base and
current ``--repeats`` times so that both see the same machine load. It prints the
median queries/s of each side and the ratio current / base. Not a test.

``load (s)`` includes discovering the plugins of each side's environment, so it is
only like for like when both environments hold the same plugins: a development
environment with more packages installed (the digits environment, the tutorial's)
loads about 0.05 s slower at 1,000 queries than the same revision given as ``--base``.
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
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIGURES = (
    ("rce_qps", "RCE epoch (queries/s)"),
    ("grpo_qps", "GRPO epoch (queries/s)"),
    ("ref_qps", "reference log-probs (q/s)"),
    ("select_qps", "select (queries/s)"),
    ("load_s", "load (s)"),
)


def run(cmd: list[str], **kw: Any) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def base_checkout(rev: str, workdir: Path) -> tuple[Path, Path]:
    """(worktree, python) of ``rev``, installed in its own venv."""
    sha = run(["git", "-C", str(ROOT), "rev-parse", "--short", rev]).strip()
    tree, venv = workdir / f"tree-{sha}", workdir / f"venv-{sha}"
    if not tree.is_dir():
        run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), sha])
    python = venv / "bin" / "python"
    if not python.is_file():
        run([sys.executable, "-m", "venv", str(venv)])
        run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"])
        run([str(python), "-m", "pip", "install", "-q", str(tree)])
    return tree, python


def worker(
    python: Path, tree: Path, data: Path, emb: Path, threads: int, kind: str = "ours"
) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": ""}
    # The base is installed (pip compiles its bytecode); the current checkout runs from
    # its source tree. Let both import from bytecode, or the current side pays for
    # compiling every module at each start (the first, untimed run writes it).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    out = run(
        [
            str(python),
            str(tree / "bench" / "throughput.py"),
            "--threads",
            str(threads),
            "--worker",
            *([kind, str(data), str(emb), "32"] if kind == "ours" else [kind, str(data)]),
        ],
        env=env,
        cwd=tempfile.gettempdir(),
    )
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--base", required=True, help="git revision to compare against")
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lever-compare")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE))
    import throughput

    base_tree, base_python = base_checkout(args.base, args.workdir)
    sides = {"base": (base_python, base_tree), "current": (Path(sys.executable), ROOT)}
    print(f"base {args.base} ({base_tree.name}) vs current checkout, {args.threads} threads")
    for size in (int(s) for s in args.sizes.split(",")):
        data, emb = throughput.generate(args.workdir / f"q{size}", size)
        # The prepared form sits beside the data file and its key names the plugins'
        # versions, so each side reads the data through its own link (its own cache).
        files = {}
        for name in sides:
            side = args.workdir / f"q{size}-{name}"
            side.mkdir(exist_ok=True)
            for src in (data, emb):
                link = side / src.name
                if not link.exists():
                    link.symlink_to(src)
            files[name] = (side / data.name, side / emb.name)
        samples: dict[str, list[dict[str, Any]]] = {"base": [], "current": []}
        for name, (python, tree) in sides.items():
            worker(python, tree, *files[name], args.threads, kind="prepare")  # the prepared form
        for _ in range(args.repeats):
            for name, (python, tree) in sides.items():
                samples[name].append(worker(python, tree, *files[name], args.threads))
        print(f"\n== {size:,} queries, median of {args.repeats} alternating runs")
        print(f"{'figure':<28}{'base':>10}{'current':>10}{'current/base':>14}")
        for key, label in FIGURES:
            b = statistics.median(s[key] for s in samples["base"])
            c = statistics.median(s[key] for s in samples["current"])
            ratio = b / c if key == "load_s" else c / b  # > 1: current is faster
            print(f"{label:<28}{b:>10.2f}{c:>10.2f}{ratio:>13.3f}x")


if __name__ == "__main__":
    main()

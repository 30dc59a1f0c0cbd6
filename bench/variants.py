"""Every policy and every training variant on the same budget: demo and quality task.

    python bench/variants.py                       # 3 seeds, 2 worker processes
    python bench/variants.py --budget grpo         # a longer, stronger GRPO phase
    python bench/variants.py --seeds 0 --rows pointer kl-k1 --workers 1

For each row (a ``--policy NAME`` with the default plugins, or the ``pointer`` policy
with one training variant) and each seed, it trains twice with the same budget:

* on the demo data (``lever-train demo-data``: 400 queries, pools of 32, d = 64) and
  reports the final validation ``policy_reward@1``;
* on the digits quality task of ``examples/digits_env`` (``pip install
  examples/digits_env``; ``digits_rl_train.json``, ``digits_emb.safetensors``), then
  decodes each of the 297 test queries greedily over its whole 64-id pool (eval mode,
  docs/algorithm.md#judging) and scores the picks with the task's judge (the ``digits``
  environment: ``vqa_correct`` of each pick; needs numpy and scikit-learn).

It prints one table, mean ± std over the seeds, and the lines of core code
(``lever_trainer/``) this branch changed against ``--base``, with the hooks each
variant answers and whether the branch added them. Each training runs in-process in a
worker (1 thread each); results are cached in ``--out`` (JSON), so an interrupted run
continues where it stopped. Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

_COMMON = ("--rce-lr", "1e-3", "--batch-size", "16", "--hidden-dim", "128")
#: The budgets (every row of a table trains with the same one): ``short`` is the README's
#: demo command shortened; ``grpo`` gives GRPO ten times the learning rate and three
#: times the epochs, so that the GRPO variants move the policy.
BUDGETS: dict[str, tuple[str, ...]] = {
    "short": (
        *_COMMON, "--rce-epochs", "8", "--grpo-epochs", "2", "--grpo-lr", "1e-4",
        "--plugin", "grpo-reference-refresh",
    ),
    "grpo": (
        *_COMMON, "--rce-epochs", "8", "--grpo-epochs", "6", "--grpo-lr", "1e-3",
        "--plugin", "grpo-reference-refresh",
    ),
}  # fmt: skip

POLICIES = (
    "pointer", "pointer-static", "pointer-gru", "pointer-mmr", "pointer-set-encoder",
    "pointer-additive", "pointer-coverage", "pointer-dpp", "pointer-slots",
    "pointer-two-stage", "pointer-stop",
)  # fmt: skip

#: Variant rows: name -> extra flags (on the ``pointer`` policy).
VARIANTS: dict[str, tuple[str, ...]] = {
    "top1-only": ("--plugin", "top1-only"),
    "ppo-clip-only": ("--plugin", "ppo-clip-only"),
    "fixed-kl (--no-plugin adaptive-kl)": ("--no-plugin", "adaptive-kl"),
    "rank-advantage": ("--plugin", "rank-advantage"),
    "easy-first": ("--plugin", "easy-first"),
    "group-center": ("--plugin", "group-center"),
    "rloo": ("--plugin", "rloo"),
    "clip-higher": ("--plugin", "clip-higher"),
    "dual-clip": ("--plugin", "dual-clip"),
    "kl-k1": ("--plugin", "kl-k1"),
    "kl-k2": ("--plugin", "kl-k2"),
    "kl-target": ("--plugin", "kl-target"),
    "skip-zero-variance": ("--plugin", "skip-zero-variance"),
    "gspo": ("--plugin", "gspo"),
    "cispo": ("--plugin", "cispo"),
    "sapo": ("--plugin", "sapo"),
    "reinforce-pp": ("--plugin", "reinforce-pp"),
    "disable-dropout": ("--plugin", "disable-dropout"),
    "reference-sync": ("--plugin", "reference-sync", "--ref-sync-steps", "10"),
    "lr-schedule": ("--plugin", "lr-schedule"),
    "early-stopping": ("--plugin", "early-stopping"),
}


def rows() -> dict[str, tuple[str, ...]]:
    """Every row: its flags on top of the budget."""
    out: dict[str, tuple[str, ...]] = {p: ("--policy", p) for p in POLICIES}
    out.update({name: ("--policy", "pointer", *flags) for name, flags in VARIANTS.items()})
    return out


def prepare_data(work: Path) -> dict[str, tuple[Path, Path]]:
    """The demo data and a writable copy of the quality task's training files."""
    from lever_trainer.demo import DemoSpec, write_demo

    demo = work / "demo"
    if not (demo / "rl_data.json").is_file():
        write_demo(demo, DemoSpec(queries=400, demos=1200, pool=32, dim=64, seed=0))
    import lever_digits_env

    quality = work / "quality"
    quality.mkdir(parents=True, exist_ok=True)
    for name in ("digits_rl_train.json", "digits_emb.safetensors"):
        if not (quality / name).is_file():
            shutil.copy(lever_digits_env.DATA / name, quality / name)
    return {
        "demo": (demo / "rl_data.json", demo / "embeddings.safetensors"),
        "quality": (quality / "digits_rl_train.json", quality / "digits_emb.safetensors"),
    }


def quality_accuracy(ckpt: Path, emb_path: Path) -> float:
    """Greedy free selection over each test pool (``lever-train select``'s pool-only path),
    scored by the task's judge."""
    import lever_digits_env

    from lever_trainer.data import load_embeddings, load_pools
    from lever_trainer.plugins import load_plugins
    from lever_trainer.policies import policy_from_checkpoint
    from lever_trainer.select import select_demonstrations

    pools = load_pools(lever_digits_env.files()["test"])
    emb = load_embeddings(emb_path)
    model, _ = policy_from_checkpoint(load_plugins(), ckpt, emb.dim, False, lambda _: None)
    picks = select_demonstrations(model, pools, emb, 2)
    verdicts = lever_digits_env.DigitsEnvironment().judge(pools.query_ids.tolist(), picks)
    return sum(v["vqa_correct"] for v in verdicts) / len(verdicts)


def train_once(job: dict[str, Any]) -> dict[str, Any]:
    """One training run in this worker process; returns its final figure."""
    import torch

    torch.set_num_threads(1)
    from lever_trainer.cli import main

    out = Path(job["out"])
    args = [
        "--beam-data", job["data"], "--img-emb", job["emb"], "--output-dir", str(out),
        "--overwrite", "--seed", str(job["seed"]), *BUDGETS[job["budget"]], *job["flags"],
    ]  # fmt: skip
    started = time.perf_counter()
    buffer = io.StringIO()
    code: Any = 0
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        try:
            main.main(args, standalone_mode=False)
        except SystemExit as exc:
            code = exc.code
    result = {**job, "seconds": time.perf_counter() - started, "exit": code}
    lines = (out / "metrics.jsonl").read_text().splitlines() if out.is_dir() else []
    if code not in (0, None) or not lines:
        result["error"] = buffer.getvalue()[-2000:]
        return result
    last = json.loads(lines[-1])
    result["epochs"] = len(lines)
    result["kl_beta"] = last.get("kl_beta")
    result["train_kl"] = last.get("train_kl")
    if job["dataset"] == "demo":
        result["value"] = last["policy_reward@1"]
    else:
        ckpt = out / f"{last['phase']}_epoch{last['epoch']:02d}.safetensors"
        result["value"] = quality_accuracy(ckpt, Path(job["emb"]))
    shutil.rmtree(out, ignore_errors=True)
    return result


def core_lines(base: str) -> tuple[str, int, int]:
    """``git diff --stat`` of lever_trainer/ since this branch left ``base`` (the merge base,
    so changes that reached ``base`` from elsewhere are not counted)."""
    stat = subprocess.run(
        ["git", "-C", str(ROOT), "diff", "--stat", f"{base}...HEAD", "--", "lever_trainer/"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    numstat = subprocess.run(
        ["git", "-C", str(ROOT), "diff", "--numstat", f"{base}...HEAD", "--", "lever_trainer/"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    added = removed = 0
    for line in numstat.splitlines():
        a, r, _ = line.split("\t")
        added, removed = added + int(a), removed + int(r)
    return stat, added, removed


def base_hooks(base: str) -> set[str]:
    """Hook names declared in hookspecs.py where this branch left ``base``."""
    fork = subprocess.run(
        ["git", "-C", str(ROOT), "merge-base", base, "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    text = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{fork}:lever_trainer/hookspecs.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {
        line.split("(")[0][4:]
        for line in text.splitlines()
        if line.startswith("def ") and not line.startswith("def all_hook")
    }


def variant_hooks() -> dict[str, list[str]]:
    """The hooks each built-in plugin implements."""
    from lever_trainer.plugins import discover

    return {p.name: p.hooks for p in discover()}


def summarise(results: list[dict[str, Any]], base: str, budget: str) -> str:
    """The table and the core-line count."""
    out = []
    by_row: dict[str, dict[str, list[float]]] = {}
    seconds: dict[str, list[float]] = {}
    errors: dict[str, str] = {}
    for r in results:
        if "value" in r:
            by_row.setdefault(r["row"], {}).setdefault(r["dataset"], []).append(r["value"])
            seconds.setdefault(r["row"], []).append(r["seconds"])
        else:
            errors[f"{r['row']} / {r['dataset']} / seed {r['seed']}"] = r.get("error", "")

    def cell(values: list[float]) -> str:
        if not values:
            return "—"
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.4f} ± {spread:.4f} (n={len(values)})"

    out.append(
        f"budget {budget} (every row): {' '.join(BUDGETS[budget])}; "
        "seeds vary the training only (the data are fixed)"
    )
    out.append(
        f"{'row':<36} {'demo policy_reward@1':<28} {'quality accuracy (297 test)':<28} s/run"
    )
    for name in rows():
        got = by_row.get(name, {})
        secs = seconds.get(name, [])
        out.append(
            f"{name:<36} {cell(got.get('demo', [])):<28} {cell(got.get('quality', [])):<28} "
            f"{statistics.mean(secs) if secs else 0:.0f}"
        )
    for what, text in errors.items():
        out.append(f"FAILED {what}: {text.strip().splitlines()[-1] if text.strip() else '?'}")
    stat, added, removed = core_lines(base)
    known = base_hooks(base)
    hooks = variant_hooks()
    out.append("")
    out.append(f"core (lever_trainer/) changed against {base}: +{added} -{removed} lines")
    out.append(stat.rstrip())
    out.append("hooks each variant answers (* = hook added on this branch):")
    for name, flags in VARIANTS.items():
        plugin = flags[1]
        shown = ", ".join(h + ("" if h in known else "*") for h in hooks.get(plugin, []))
        out.append(f"  {name:<36} {shown}")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", default=None, help="Only these rows.")
    parser.add_argument("--datasets", nargs="+", default=["demo", "quality"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="short")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lever-variants"))
    parser.add_argument("--out", type=Path, default=None, help="Results JSON (cache).")
    parser.add_argument("--base", default="main", help="Revision the core lines count against.")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    out_path = args.out or work / f"results-{args.budget}.json"
    results: list[dict[str, Any]] = json.loads(out_path.read_text()) if out_path.is_file() else []
    done = {(r["row"], r["dataset"], r["seed"]) for r in results if "value" in r}
    results = [r for r in results if "value" in r]
    data = prepare_data(work)
    wanted = {k: v for k, v in rows().items() if args.rows is None or k in args.rows}
    jobs = [
        {
            "row": row,
            "dataset": dataset,
            "seed": seed,
            "budget": args.budget,
            "flags": list(flags),
            "data": str(data[dataset][0]),
            "emb": str(data[dataset][1]),
            "out": str(work / "runs" / f"{args.budget}-{dataset}-{seed}-{row.split()[0]}"),
        }
        for seed in args.seeds
        for dataset in args.datasets
        for row, flags in wanted.items()
        if (row, dataset, seed) not in done
    ]
    # build the prepared caches once, before the workers read them
    for dataset in args.datasets:
        prepare = [sys.executable, "-m", "lever_trainer", "prepare"]
        subprocess.run([*prepare, "--beam-data", str(data[dataset][0])], check=True)
    print(f"{len(jobs)} runs to do ({len(done)} cached in {out_path})", flush=True)
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(train_once, job) for job in jobs]
        for i, future in enumerate(as_completed(futures), 1):
            result = future.result()
            results.append(result)
            shown = f"{result['value']:.4f}" if "value" in result else "FAILED"
            print(
                f"[{i}/{len(jobs)}] {result['row']} {result['dataset']} seed {result['seed']}: "
                f"{shown} ({result['seconds']:.0f}s)",
                flush=True,
            )
            out_path.write_text(json.dumps(results, indent=1))
    print(summarise(results, args.base, args.budget))
    return 0


if __name__ == "__main__":
    sys.exit(main())

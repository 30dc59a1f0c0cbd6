"""Memory and time of loading RL data: lever_trainer's loader against ``json.load``.

    python bench/load_memory.py                    # 5,000 queries x 12 candidates
    python bench/load_memory.py --queries 20000

Generates an RL data file (RL data JSON: ``pointer_global`` encoding, pools of 64
``candidate_pool_ids``, exactly 12 logged sequences of length 2 per query, with the
fields a real file carries), then measures each of these in a fresh process:

* ``load_rl_data``      - ``load_rl_data(path, DataOptions(), registry)``, no prepared cache;
* ``json.load``         - the straightforward ``json.load`` of the whole file;
* ``prepare``           - the first ``cache=True`` call: parse and write the cache;
* ``cache read``        - the second ``cache=True`` call: read the prepared form.

For each: wall time; peak RSS growth = ``ru_maxrss`` after the load minus ``VmRSS``
before it (``ru_maxrss`` is the process's lifetime peak, so imports that peaked
higher can hide a smaller load peak; ``VmHWM`` growth, with the high-water mark
reset through ``/proc/self/clear_refs`` just before the load, is printed next to
it); RSS still held after the load; and, in a separate run so that it does not slow
the timed one, the ``tracemalloc`` peak of Python-level allocations (tensors are not
traced) and what of them is still held after the load. The ratio is peak growth /
JSON size; the target is at most 3x. Not a test.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

POOL, SHOT, BANK = 64, 2, 20000
ANSWERS = ("a book", "two", "yes", "no", "red", "a dog", "tennis", "kitchen", "3", "blue")
WORDS = ("what", "is", "the", "man", "holding", "color", "of", "how", "many", "there", "room")


# ---------------------------------------------------------------------------- data
def generate(path: Path, queries: int, candidates: int, seed: int = 0) -> Path:
    """Write an RL data file with exactly ``candidates`` logged sequences per query."""
    stamp = path.with_suffix(".params.json")
    params = {"queries": queries, "candidates": candidates, "seed": seed, "pool": POOL}
    if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == params:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with open(path, "w") as fh:
        fh.write('{"_meta": {"generator": "bench/load_memory.py"}')
        for qid in range(queries):
            pool = rng.sample(range(queries, queries + BANK), POOL)
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) + "?"
            cands = []
            for rank in range(candidates):
                pos = rng.sample(range(POOL), SHOT)
                beam = rank < 4
                correct = int(rng.random() < 0.4)
                acc = round(rng.random(), 2) if correct else 0.0
                cands.append(
                    {
                        "pointer": pos,
                        "pointer_global": [pool[p] for p in pos],
                        "gen_method": "beam" if beam else "sample",
                        "beam_rank": rank if beam else None,
                        "beam_score": round(rng.uniform(-3, 3), 4) if beam else None,
                        "logprob_score": round(rng.uniform(-6, -0.1), 4),
                        "temperature": None if beam else 1.0,
                        "vqa_pred_answer": rng.choice(ANSWERS),
                        "vqa_correct": correct,
                        "vqa_acc_score": acc,
                        "vqa_gt_prob": round(rng.random(), 4),
                        "vqa_rel_score": round(rng.uniform(-1, 1), 4),
                        "vqa_eval_mode": "official",
                        "eval_failed": False,
                    }
                )
            entry = {
                "query": {"question": question, "image_id": 100000 + qid},
                "candidate_pool_ids": pool,
                "pointer_candidates": cands,
            }
            fh.write(f', "{qid}": ')
            fh.write(json.dumps(entry))
        fh.write("}")
    stamp.write_text(json.dumps(params))
    return path


# ---------------------------------------------------------------------------- workers
def status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory figure (``VmRSS``, ``VmHWM``) in KiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_hwm() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM), where allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def measure(load: Callable[[], Any], trace: bool) -> tuple[Any, dict[str, Any]]:
    """Run ``load`` once, with the figures of the module docstring."""
    import tracemalloc

    gc.collect()
    hwm_reset = reset_hwm()
    rss_before = status_kib("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if trace:
        tracemalloc.start()
    t0 = time.perf_counter()
    obj = load()
    seconds = time.perf_counter() - t0
    traced_now, traced_peak = tracemalloc.get_traced_memory() if trace else (None, None)
    if trace:
        tracemalloc.stop()
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return obj, {
        "seconds": seconds,
        "rss_before_kib": rss_before,
        "maxrss_before_kib": maxrss_before,
        "peak_growth_kib": maxrss_after - rss_before,
        "hwm_growth_kib": status_kib("VmHWM") - rss_before if hwm_reset else None,
        "retained_kib": status_kib("VmRSS") - rss_before,
        "tracemalloc_peak_bytes": traced_peak,
        "tracemalloc_after_bytes": traced_now,
    }


def table_bytes(table: Any) -> int:
    import dataclasses

    import torch

    return sum(
        v.nbytes
        for f in dataclasses.fields(table)
        if isinstance(v := getattr(table, f.name), torch.Tensor)
    )


def worker(kind: str, path: Path, trace: bool) -> dict[str, Any]:
    if kind == "json":

        def load() -> Any:
            with open(path) as fh:
                return json.load(fh)

        doc, out = measure(load, trace)
        out["queries"] = sum(1 for k in doc if k.isdigit())
        return out

    import torch  # imported before the measurement, like the loader's own modules

    from lever_trainer.data import DataOptions, cache_path_for, load_rl_data
    from lever_trainer.plugins import load_plugins
    from lever_trainer.rewards import registry_from_plugins

    def builtin_registry() -> Any:
        return registry_from_plugins(load_plugins())

    torch.set_num_threads(1)
    cache = kind in ("prepare", "cache")
    if kind == "prepare":
        cache_path_for(path).unlink(missing_ok=True)
    registry = builtin_registry()  # plugin discovery is not part of the measurement
    (table, report), out = measure(
        lambda: load_rl_data(path, DataOptions(), registry, cache=cache), trace
    )
    if kind == "cache":
        assert report.cache.startswith("read"), report.cache
    out["queries"] = len(table)
    out["table_bytes"] = table_bytes(table)
    out["cache"] = report.cache
    return out


def run_worker(kind: str, path: Path, trace: bool = False) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, __file__, "--worker", kind, "--data", str(path)]
    proc = subprocess.run(
        args + (["--trace"] if trace else []), capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise SystemExit(f"worker {kind} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# ---------------------------------------------------------------------------- report
def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--queries", type=int, default=5000)
    ap.add_argument("--candidates", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lever-load-memory"
    )
    ap.add_argument("--no-trace", action="store_true", help="Skip the tracemalloc runs.")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.data, args.trace)))
        return

    t0 = time.perf_counter()
    path = args.workdir / f"rl_data_q{args.queries}_c{args.candidates}.json"
    generate(path, args.queries, args.candidates, args.seed)
    size = path.stat().st_size
    mib = 2**20
    print(
        f"{path}: {size / mib:.1f} MiB, {args.queries:,} queries x {args.candidates} "
        f"candidates, pools of {POOL}, S = {SHOT} (ready in {time.perf_counter() - t0:.1f}s)"
    )
    rows = [
        ("load_rl_data (no cache)", "ours"),
        ("json.load", "json"),
        ("prepare (1st cache=True)", "prepare"),
        ("cache read (2nd cache=True)", "cache"),
    ]
    results = {}
    for _, kind in rows:
        results[kind] = run_worker(kind, path)
        if not args.no_trace and kind in ("ours", "json"):
            traced = run_worker(kind, path, trace=True)
            for key in ("tracemalloc_peak_bytes", "tracemalloc_after_bytes"):
                results[kind][key] = traced[key]
            results[kind]["traced_seconds"] = traced["seconds"]

    print(
        f"\n{'':<29}{'time s':>8}{'peak growth':>13}{'/ JSON':>8}{'HWM growth':>12}"
        f"{'retained':>10}{'tracemalloc':>13}"
    )
    print(f"{'':<29}{'':>8}{'MiB':>13}{'':>8}{'MiB':>12}{'MiB':>10}{'peak MiB':>13}")
    for label, kind in rows:
        r = results[kind]
        peak = r["peak_growth_kib"] * 1024
        hwm = "n/a" if r["hwm_growth_kib"] is None else f"{r['hwm_growth_kib'] / 1024:.1f}"
        traced_peak = r.get("tracemalloc_peak_bytes")
        traced_s = "-" if traced_peak is None else f"{traced_peak / mib:.1f}"
        print(
            f"{label:<29}{r['seconds']:>8.2f}{peak / mib:>13.1f}{peak / size:>7.2f}x"
            f"{hwm:>12}{r['retained_kib'] / 1024:>10.1f}{traced_s:>13}"
        )
    ours, plain = results["ours"], results["json"]
    print(
        f"\nqueries kept: {ours['queries']:,} (json.load: {plain['queries']:,}); "
        f"table tensors: {ours['table_bytes'] / mib:.1f} MiB"
    )
    print(
        f"RSS before the load: ours {ours['rss_before_kib'] / 1024:.0f} MiB "
        f"(lifetime peak so far {ours['maxrss_before_kib'] / 1024:.0f} MiB), json.load "
        f"{plain['rss_before_kib'] / 1024:.0f} MiB "
        f"(peak so far {plain['maxrss_before_kib'] / 1024:.0f} MiB)"
    )
    ratio = ours["peak_growth_kib"] * 1024 / size
    verdict = "meets" if ratio <= 3 else "misses"
    print(
        f"load_rl_data peak growth / JSON size = {ratio:.2f}x ({verdict} the 3x target); "
        f"json.load: {plain['peak_growth_kib'] * 1024 / size:.2f}x; "
        f"cache read {ours['seconds'] / results['cache']['seconds']:.0f}x faster than parsing"
    )
    if "traced_seconds" in ours:
        print(
            f"(tracemalloc runs, timed separately: ours {ours['traced_seconds']:.2f}s, "
            f"json.load {plain['traced_seconds']:.2f}s; Python allocations still held after "
            f"the load: ours {ours['tracemalloc_after_bytes'] / mib:.1f} MiB, json.load "
            f"{plain['tracemalloc_after_bytes'] / mib:.1f} MiB)"
        )


if __name__ == "__main__":
    main()

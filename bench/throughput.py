"""Throughput benchmark: lever_trainer against the straightforward path, side by side.

    python bench/throughput.py                      # 1,000 / 10,000 / 100,000 queries
    python bench/throughput.py --sizes 1000 --threads 2

For every size it generates demo-format data (d = 768, pools of 64, 8-12 logged
sequences of length 2 per query; JSON plus a .npy embedding table), then runs, each
in its own process so that peak memory is measured separately:

* ``prepare``  - RL JSON -> prepared binary form (streaming parse);
* ``ours``     - load from the prepared form, reference log-probs, one RCE epoch,
  one GRPO epoch (top-3), greedy ``select``, batch size 32;
* ``straight`` - ``bench/straightforward.py``: ``json.load`` of the whole file, then
  one query per step with the pool re-encoded for every sequence, on the first
  ``--straight-queries`` queries (its cost per query does not depend on the file).

It prints queries/s for each figure, the ratio ours / straightforward, peak RSS, load
times, the RCE epoch's achieved GFLOP/s against this machine's fp32 matmul peak
(``torch.mm`` of 4096 x 4096 matrices, measured in the same run), and how the time
per query at the largest size compares with the next one. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
D, POOL, BANK, SHOT = 768, 64, 20000, 2


# ---------------------------------------------------------------------------- data
def generate(out: Path, queries: int, seed: int = 0) -> tuple[Path, Path]:
    """Write rl_data.json (streamed, one query at a time) and embeddings.npy."""
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    data, emb = out / "rl_data.json", out / "embeddings.npy"
    stamp = out / "params.json"
    params = {"queries": queries, "seed": seed, "d": D, "pool": POOL, "bank": BANK}
    if (
        stamp.is_file()
        and json.loads(stamp.read_text()) == params
        and data.is_file()
        and emb.is_file()
    ):
        return data, emb
    rng = random.Random(seed)
    with open(data, "w") as fh:
        fh.write('{"_meta": {"generator": "bench/throughput.py"}')
        for qid in range(queries):
            pool = rng.sample(range(queries, queries + BANK), POOL)
            cands = []
            for rank in range(rng.randint(8, 12)):
                pos = rng.sample(range(POOL), SHOT)
                correct = int(rng.random() < 0.4)
                cands.append(
                    {
                        "pointer": pos,
                        "pointer_global": [pool[p] for p in pos],
                        "gen_method": "beam" if rank < 4 else "sample",
                        "beam_rank": rank if rank < 4 else None,
                        "vqa_correct": correct,
                        "vqa_acc_score": round(rng.random(), 2),
                        "vqa_eval_mode": "official",
                        "eval_failed": False,
                    }
                )
            fh.write(f', "{qid}": ')
            fh.write(json.dumps({"candidate_pool_ids": pool, "pointer_candidates": cands}))
        fh.write("}")
    table = np.random.default_rng(seed).standard_normal((queries + BANK, D), dtype=np.float32)
    np.save(emb, table)
    stamp.write_text(json.dumps(params))
    return data, emb


# ---------------------------------------------------------------------------- workers
def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rce_flops(pool_len: torch.Tensor, group_len: torch.Tensor, steps: int, d: int, h: int) -> float:
    """Useful matmul FLOPs of one RCE epoch as lever_trainer computes it (forward + backward)."""
    k, g = pool_len.double(), group_len.double()
    input_proj = 2 * (k + 1) * d * h
    encoder = input_proj + 5 * 2 * h * h + 2 * 2 * k * h + 2 * k * h * h  # attention, projections
    decoder = steps * g * 2 * k * h + (steps - 1) * g * 2 * 2 * h * h  # pointer logits, gate
    # Backward costs twice the forward, except that input_proj needs no input gradient.
    return float((3 * (encoder + decoder) - input_proj).sum())


def builtin_registry() -> Any:
    """Reward modes and normalisers of the plugins that are on by default."""
    from lever_trainer.plugins import load_plugins
    from lever_trainer.rewards import registry_from_plugins

    return registry_from_plugins(load_plugins())


def worker_prepare(data: Path) -> dict[str, Any]:
    from lever_trainer.data import DataOptions, cache_path_for, load_rl_data

    cache_path_for(data).unlink(missing_ok=True)
    t0 = time.perf_counter()
    table, _ = load_rl_data(data, DataOptions(), builtin_registry(), cache=True)
    return {
        "prepare_s": time.perf_counter() - t0,
        "queries": len(table),
        "json_mib": data.stat().st_size / 2**20,
        "rss_mib": peak_rss_mib(),
    }


def worker_ours(data: Path, emb_path: Path, batch_size: int) -> dict[str, Any]:
    from lever_trainer.data import DataOptions, load_embeddings, load_rl_data
    from lever_trainer.plugins import load_plugins
    from lever_trainer.select import select_demonstrations
    from lever_trainer.state import TrainConfig
    from lever_trainer.trainer import Trainer
    from lever_trainer_plugins.pointer import PointerPolicy, PolicyConfig

    t0 = time.perf_counter()
    table, report = load_rl_data(data, DataOptions(), builtin_registry(), cache=True)
    emb = load_embeddings(emb_path)
    load_s = time.perf_counter() - t0
    assert report.cache.startswith("read"), report.cache
    torch.manual_seed(0)
    model = PointerPolicy(PolicyConfig(input_dim=emb.dim))
    plugins = load_plugins(disable=["console-log", "metrics-jsonl"])
    config = TrainConfig(batch_size=batch_size)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            config,
            model,
            table,
            table.select(torch.arange(0)),
            emb,
            plugins,
            Path(out),
            options={"rce_epochs": 1, "grpo_epochs": 1},
            log=lambda _: None,
        )
        trainer.resolve_rewards()
        t0 = time.perf_counter()
        trainer.start_logprobs = trainer.compute_logprobs(table)
        ref_s = time.perf_counter() - t0
        for phase in trainer.phases:  # rce, then grpo
            trainer.run_phase(phase)
        rce_s, grpo_s = (e["epoch_seconds"] for e in trainer.state.history)
    t0 = time.perf_counter()
    select_demonstrations(model, table, emb, table.seq_len)
    select_s = time.perf_counter() - t0
    q = len(table)
    flops = rce_flops(
        table.pool_len, table.group_len, table.seq_len, emb.dim, model.config.hidden_dim
    )
    return {
        "queries": q,
        "load_s": load_s,
        "rce_qps": q / rce_s,
        "grpo_qps": q / grpo_s,
        "ref_qps": q / ref_s,
        "select_qps": q / select_s,
        "rce_gflops": flops / rce_s / 1e9,
        "rss_mib": peak_rss_mib(),
    }


def worker_straight(data: Path, emb_path: Path, queries: int) -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    import straightforward as sf

    from lever_trainer.data import DataOptions, load_embeddings, parse_rl_members
    from lever_trainer_plugins.pointer import PointerPolicy, PolicyConfig

    t0 = time.perf_counter()
    with open(data) as fh:
        doc = json.load(fh)  # the reference implementation's way: the whole file as objects
    table, _ = parse_rl_members(doc.items(), data, DataOptions(), builtin_registry())
    emb = load_embeddings(emb_path)
    load_s = time.perf_counter() - t0
    del doc
    q = min(queries, len(table))
    torch.manual_seed(0)
    model = PointerPolicy(PolicyConfig(input_dim=emb.dim))
    t0 = time.perf_counter()
    ref = sf.reference_logprobs(model, table, emb, q)
    ref_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sf.rce_epoch(model, table, emb, q)
    rce_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sf.grpo_epoch(model, table, emb, q, ref)
    grpo_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sf.select(model, table, emb, q)
    select_s = time.perf_counter() - t0
    return {
        "queries": q,
        "load_s": load_s,
        "rce_qps": q / rce_s,
        "grpo_qps": q / grpo_s,
        "ref_qps": q / ref_s,
        "select_qps": q / select_s,
        "rss_mib": peak_rss_mib(),
    }


def run_worker(*args: str, threads: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", *args, "--threads", str(threads)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise SystemExit(f"worker {args[0]} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def matmul_peak_gflops(threads: int, n: int = 4096, reps: int = 5) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


# ---------------------------------------------------------------------------- report
def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--straight-queries", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lever-bench")
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        kind, *rest = args.worker
        if kind == "prepare":
            out = worker_prepare(Path(rest[0]))
        elif kind == "ours":
            out = worker_ours(Path(rest[0]), Path(rest[1]), int(rest[2]))
        else:
            out = worker_straight(Path(rest[0]), Path(rest[1]), int(rest[2]))
        print(json.dumps(out))
        return

    print(
        f"torch {torch.__version__}, {args.threads} threads, batch size {args.batch_size}, "
        f"d={D}, pool={POOL}, 8-12 sequences of length {SHOT} per query",
        flush=True,
    )
    peak = matmul_peak_gflops(args.threads)
    print(f"fp32 matmul peak (torch.mm 4096x4096): {peak:.1f} GFLOP/s", flush=True)
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        t0 = time.perf_counter()
        data, emb = generate(args.workdir / f"q{size}", size)
        gen_s = time.perf_counter() - t0
        prep = run_worker("prepare", str(data), threads=args.threads)
        ours = run_worker("ours", str(data), str(emb), str(args.batch_size), threads=args.threads)
        straight = run_worker(
            "straight", str(data), str(emb), str(args.straight_queries), threads=args.threads
        )
        results.append((size, prep, ours, straight))
        print(
            f"\n== {size:,} queries (JSON {prep['json_mib']:.0f} MiB, generated in {gen_s:.0f}s; "
            f"straightforward timed on {straight['queries']:,} queries)",
            flush=True,
        )
        print(f"{'figure':<28}{'lever_trainer':>15}{'straightforward':>17}{'ratio':>9}")
        for key, label in (
            ("rce_qps", "RCE epoch (queries/s)"),
            ("grpo_qps", "GRPO epoch (queries/s)"),
            ("ref_qps", "reference log-probs (q/s)"),
            ("select_qps", "select (queries/s)"),
        ):
            print(
                f"{label:<28}{ours[key]:>15.1f}{straight[key]:>17.1f}"
                f"{ours[key] / straight[key]:>8.1f}x"
            )
        print(
            f"{'load (s)':<28}{ours['load_s']:>15.2f}{straight['load_s']:>17.2f}"
            f"{straight['load_s'] / ours['load_s']:>8.1f}x"
        )
        print(
            f"{'peak RSS (MiB)':<28}{ours['rss_mib']:>15.0f}{straight['rss_mib']:>17.0f}"
            f"{straight['rss_mib'] / ours['rss_mib']:>8.1f}x"
        )
        print(
            f"{'prepare JSON (s, RSS MiB)':<28}{prep['prepare_s']:>15.1f}{prep['rss_mib']:>17.0f}"
        )
        print(
            f"RCE achieved {ours['rce_gflops']:.1f} GFLOP/s = "
            f"{100 * ours['rce_gflops'] / peak:.0f}% of the matmul peak",
            flush=True,
        )
    if len(results) >= 2:
        (s1, _, o1, _), (s2, _, o2, _) = results[-2], results[-1]
        print(f"\ntime per query, {s2:,} vs {s1:,} queries (1.0 = linear):")
        for key in ("rce_qps", "grpo_qps", "ref_qps", "select_qps"):
            print(f"  {key[:-4]:<8}{o1[key] / o2[key]:.2f}x")


if __name__ == "__main__":
    main()

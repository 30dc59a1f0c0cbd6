"""Peak memory of ``lever-train select`` against the number of queries: streamed (what the
command does) side by side with reading every query first (what it did before).

    python bench/select_memory.py                        # 20,000 and 200,000 queries
    python bench/select_memory.py --queries 2000 20000   # quicker

Writes one embedding table (rows for the largest query count plus a bank of 20,000
demonstrations, d = 64) and, per count, a query file in RL data form (docs/algorithm.md#rl-data:
``candidate_pool_ids`` of 64 ids and 12 logged candidates with their verdict fields, as
a real file carries them), then measures, each in a fresh process:

* ``streamed``  - ``lever-train select`` itself (``lever_trainer.cli.main``);
* ``read all``  - the previous way: ``load_pools`` of the whole file, one
  ``select_greedy`` over every query, the picks written with one ``json.dumps``.

Each process reports its peak RSS (``ru_maxrss``); the same process on a one-query file
gives the fixed cost (interpreter, torch, the embedding table, the policy), and the
growth over it is what the queries cost. Printed: peak and growth per count, and the
read-all / streamed ratio of the peaks. ``read all`` uses today's ``load_pools`` (which
packs pools into tensors as it reads), so it is a lower bound of what the command cost
before it streamed. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

D, POOL, BANK, CANDIDATES = 64, 64, 20_000, 12

CHILD = r"""
import json, resource, sys
from pathlib import Path
mode, ckpt, queries, emb, out = sys.argv[1:6]
if mode == "streamed":
    from lever_trainer.cli import main
    main(["select", "--ckpt", ckpt, "--queries", queries, "--img-emb", emb, "--output", out,
          "--device", "cpu"], standalone_mode=False)
else:
    import torch
    from lever_trainer.data import check_pool_ids, load_embeddings, load_pools
    from lever_trainer.plugins import load_plugins
    from lever_trainer.policies import policy_from_checkpoint
    from lever_trainer.select import select_greedy
    pools = load_pools(queries)
    table = load_embeddings(emb)
    check_pool_ids(pools, table, queries)
    model, _ = policy_from_checkpoint(load_plugins(), ckpt, table.dim)
    sel = select_greedy(model, pools, table, 2, 512)
    doc = {str(q): p for q, p in zip(sel.query_ids, sel.picks)}
    Path(out).write_text(json.dumps(doc) + "\n")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def write_queries(path: Path, queries: int, seed: int = 0) -> Path:
    """An RL data file of ``queries`` queries (kept when it already matches)."""
    stamp = path.with_suffix(".params.json")
    params = {"queries": queries, "seed": seed, "pool": POOL, "candidates": CANDIDATES}
    if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == params:
        return path
    rng = random.Random(seed)
    with open(path, "w") as fh:
        fh.write('{"_meta": {"generator": "bench/select_memory.py"}')
        for qid in range(queries):
            pool = rng.sample(range(BANK), POOL)
            cands = []
            for _ in range(CANDIDATES):
                pointer = rng.sample(range(POOL), 2)
                correct = rng.random() < 0.5
                cands.append(
                    {
                        "pointer": pointer,
                        "pointer_global": [pool[i] for i in pointer],
                        "gen_method": "beam",
                        "vqa_correct": int(correct),
                        "vqa_acc_score": round(rng.random(), 4),
                        "vqa_gt_prob": round(rng.random(), 4),
                        "vqa_pred_answer": "a book",
                    }
                )
            query = {"query": {"question": "what is it?", "image_id": qid}}
            value = {**query, "candidate_pool_ids": pool, "pointer_candidates": cands}
            fh.write(f', "{BANK + qid}": {json.dumps(value)}')
        fh.write("}\n")
    stamp.write_text(json.dumps(params))
    return path


def peak(mode: str, ckpt: Path, queries: Path, emb: Path, out: Path) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(ckpt), str(queries), str(emb), str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{mode} {queries.name} failed:\n{proc.stdout}{proc.stderr}")
    return int(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--queries", type=int, nargs="+", default=[20_000, 200_000])
    ap.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lever-select-mem"
    )
    args = ap.parse_args()
    import torch
    from safetensors.torch import save_file

    from lever_trainer.checkpoint import save_checkpoint
    from lever_trainer.plugins import load_plugins
    from lever_trainer.policies import build_policy

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    rows = BANK + max(args.queries)
    emb = work / "emb.safetensors"
    if not emb.is_file() or emb.stat().st_size < rows * D * 4:
        table = torch.randn(rows, D, generator=torch.Generator().manual_seed(0))
        save_file({"embeddings": table}, str(emb))
    torch.manual_seed(0)
    name = "cosine-bilinear"
    model = build_policy(load_plugins(), name, D, {"shots": 2})
    ckpt = work / "policy.safetensors"
    policy = {"name": name, "input_dim": D, "options": model.policy_options()}
    save_checkpoint(ckpt, model.state_dict(), {"policy": policy})
    one = write_queries(work / "q1.json", 1)
    modes = ("streamed", "read all")
    fixed = {m: peak(m, ckpt, one, emb, work / "out.json") for m in modes}
    print(f"{name}, d={D}, pools of {POOL}, {CANDIDATES} logged candidates per query")
    print("peak RSS in MiB (growth over the same process on a 1-query file)")
    print(f"{'queries':>9}{'file MiB':>10}{'streamed':>18}{'read all':>18}{'ratio':>8}")
    mib = 2**20
    print(
        f"{1:>9,}{one.stat().st_size / mib:>10.1f}"
        f"{fixed['streamed'] / mib:>11.0f} (+0.0){fixed['read all'] / mib:>11.0f} (+0.0)"
        f"{fixed['read all'] / fixed['streamed']:>8.2f}"
    )
    for n in args.queries:
        queries = write_queries(work / f"q{n}.json", n)
        peaks = {m: peak(m, ckpt, queries, emb, work / "out.json") for m in modes}
        cells = "".join(
            f"{peaks[m] / mib:>11.0f} ({(peaks[m] - fixed[m]) / mib:+.1f})".rjust(18) for m in modes
        )
        ratio = peaks["read all"] / peaks["streamed"]
        print(f"{n:>9,}{queries.stat().st_size / mib:>10.0f}{cells}{ratio:>8.2f}")


if __name__ == "__main__":
    main()

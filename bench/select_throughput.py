"""Selection throughput for new queries (pools only), batched against one query at a time.

    python bench/select_throughput.py                 # 10,000 queries, pools of 64, d = 768
    python bench/select_throughput.py --queries 2000 --threads 1

Writes a pools-only query file (``{query id: [64 pool ids]}``) and a random embedding
table, saves an untrained checkpoint of each policy (``pointer`` and ``cosine-bilinear``;
selection costs the same trained or not), then for each policy measures in one run:

* ``select_greedy`` over every query in batches of 512 (what ``lever-train select`` runs);
* the same greedy decode one query at a time (timed on the first 1,000 queries);
* the whole ``lever-train select`` command (a process: imports, reading the JSON,
  embeddings, the checkpoint, selection, writing the picks).

It prints queries/s of each and the batched / one-at-a-time ratio. Not a test.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

D, POOL, BANK, SHOTS = 768, 64, 20000, 2


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lever-select")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from safetensors.torch import save_file

    from lever_trainer.checkpoint import save_checkpoint
    from lever_trainer.data import load_embeddings, load_pools
    from lever_trainer.plugins import load_plugins
    from lever_trainer.policies import build_policy
    from lever_trainer.select import select_greedy

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    n = args.queries
    queries = work / "pools.json"
    queries.write_text(json.dumps({str(q): rng.sample(range(n, n + BANK), POOL) for q in range(n)}))
    emb_path = work / "emb.safetensors"
    save_file(
        {"embeddings": torch.randn(n + BANK, D, generator=torch.Generator().manual_seed(0))},
        str(emb_path),
    )
    pools, emb = load_pools(queries), load_embeddings(emb_path)
    plugins = load_plugins()
    print(
        f"torch {torch.__version__}, {args.threads} threads; {n:,} queries, pools of {POOL}, d={D}"
    )
    print(f"{'policy':<18}{'batched q/s':>14}{'one at a time':>15}{'ratio':>8}{'command q/s':>14}")
    for name in ("pointer", "cosine-bilinear"):
        torch.manual_seed(0)
        model = build_policy(plugins, name, D, {"shots": SHOTS}).eval()
        ckpt = work / f"{name}.safetensors"
        save_checkpoint(
            ckpt,
            model.state_dict(),
            {"policy": {"name": name, "input_dim": D, "options": model.policy_options()}},
        )
        select_greedy(model, pools.select(torch.arange(64)), emb, SHOTS)  # warm-up
        t0 = time.perf_counter()
        select_greedy(model, pools, emb, SHOTS, batch_size=512)
        batched = n / (time.perf_counter() - t0)
        few = min(n, 1000)
        t0 = time.perf_counter()
        for row in range(few):
            select_greedy(model, pools.select(torch.tensor([row])), emb, SHOTS, batch_size=1)
        single = few / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "lever_trainer",
                "select",
                "--ckpt",
                str(ckpt),
                "--queries",
                str(queries),
                "--img-emb",
                str(emb_path),
                "--output",
                str(work / f"picks-{name}.json"),
            ],
            check=True,
            capture_output=True,
        )
        command = n / (time.perf_counter() - t0)
        print(f"{name:<18}{batched:>14.0f}{single:>15.0f}{batched / single:>7.1f}x{command:>14.0f}")


if __name__ == "__main__":
    main()

"""A small synthetic dataset in the real RL data format, with a learnable signal.

Every item (query or demonstration) is a random unit vector. A hidden orthogonal map
``W`` decides how useful demonstration ``c`` is for query ``q``: ``u(q, c) = q . W c``.
A logged sequence's accuracy grows with the mean usefulness of its demonstrations,
so a policy that learns ``W`` picks better sequences than chance; an untrained one
cannot, because ``W`` mixes every direction. Candidates are logged the way the
upstream pipeline logs them: a few from a noisy beam search, the rest sampled.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .fileio import atomic_write_bytes

#: The demo's training settings: what `demo-data` prints and the README runs.
DEMO_TRAIN_FLAGS = (
    "--rce-epochs 20 --rce-lr 3e-2 --batch-size 16 --grpo-epochs 3 --grpo-lr 1e-3 --overwrite"
)


def demo_train_command(data_path: Path, emb_path: Path, output_dir: str = "runs/demo") -> str:
    """The command that trains on the demo dataset (the README's second half)."""
    return (
        f"lever-train --beam-data {data_path} --img-emb {emb_path} --output-dir {output_dir} "
        f"{DEMO_TRAIN_FLAGS}"
    )


@dataclass(frozen=True)
class DemoSpec:
    """Size and shape of the synthetic dataset."""

    queries: int = 400
    demos: int = 1200
    pool: int = 32
    dim: int = 64
    beams: int = 4
    samples: int = 6
    shot: int = 2
    seed: int = 0


def make_demo(spec: DemoSpec) -> tuple[dict[str, object], torch.Tensor]:
    """Build ``(rl_data, embeddings)``; embeddings [queries + demos, dim]."""
    g = torch.Generator().manual_seed(spec.seed)
    n = spec.queries + spec.demos
    emb = torch.nn.functional.normalize(torch.randn(n, spec.dim, generator=g), dim=-1)
    w, _ = torch.linalg.qr(torch.randn(spec.dim, spec.dim, generator=g))
    data: dict[str, object] = {"_meta": {"generator": "lever-train demo-data", **spec.__dict__}}
    demo_ids = torch.arange(spec.queries, n)
    scale = math.sqrt(spec.dim)
    for qid in range(spec.queries):
        pool = demo_ids[torch.randperm(spec.demos, generator=g)[: spec.pool]]
        useful = (emb[pool] @ w.T @ emb[qid]) * scale  # ~N(0, 1) per demonstration
        noisy = useful + 0.7 * torch.randn(spec.pool, generator=g)
        seqs: list[tuple[list[int], str, int | None]] = []
        top = torch.argsort(noisy, descending=True)
        for b in range(spec.beams):
            pair = [int(top[b // 2 * 2 % spec.pool]), int(top[(b + 1 + b // 2) % spec.pool])]
            if pair[0] == pair[1]:
                pair[1] = int(top[(b + 2) % spec.pool])
            seqs.append((pair, "beam", b))
        while len(seqs) < spec.beams + spec.samples:
            pair = torch.randperm(spec.pool, generator=g)[: spec.shot].tolist()
            seqs.append((pair, "sample", None))
        cands = []
        for pos, method, rank in seqs:
            quality = float(useful[pos].mean())
            prob = 1.0 / (1.0 + math.exp(-2.5 * (quality - 0.3)))
            acc = round(min(1.0, max(0.0, prob + 0.1 * float(torch.randn(1, generator=g)))), 1)
            correct = int(acc >= 0.6)
            cand: dict[str, object] = {
                "pointer": pos,
                "pointer_global": [int(pool[p]) for p in pos],
                "gen_method": method,
                "beam_rank": rank,
                "temperature": None if method == "beam" else 1.0,
                "vqa_pred_answer": "yes" if correct else "no",
                "vqa_correct": correct,
                "vqa_acc_score": acc,
                "vqa_eval_mode": "official",
                "eval_failed": False,
            }
            cands.append(cand)
        # A little of the noise real logs carry: one evaluation fell back, one failed.
        if qid % 25 == 0:
            cands[-1]["vqa_eval_mode"] = "fallback"
        if qid % 40 == 0:
            cands[-2]["eval_failed"] = True
        data[str(qid)] = {
            "query": {"question": f"synthetic question {qid}", "image_id": qid},
            "candidate_pool_ids": pool.tolist(),
            "pointer_candidates": cands,
        }
    return data, emb


def write_demo(out_dir: Path, spec: DemoSpec) -> tuple[Path, Path]:
    """Write ``rl_data.json`` and ``embeddings.safetensors`` into ``out_dir``."""
    from safetensors.torch import save

    data, emb = make_demo(spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_path = out_dir / "rl_data.json"
    emb_path = out_dir / "embeddings.safetensors"
    atomic_write_bytes(data_path, json.dumps(data).encode())
    atomic_write_bytes(emb_path, save({"embeddings": emb.contiguous()}))
    return data_path, emb_path

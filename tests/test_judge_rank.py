"""Phase judge-rank and the cosine-bilinear candidate term."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import lever_digits_env
import numpy as np
import pytest
import torch
from conftest import write_json
from safetensors.torch import load_file

from lever_trainer.api import Batch
from lever_trainer_plugins.judge_rank import JudgeRankPhase
from lever_trainer_plugins.policy_bilinear import CosineBilinearPolicy, build

FILES = lever_digits_env.files()


def test_the_ranking_loss_by_hand() -> None:
    """One query, pool of 3 items, candidates 1 and 2 behind anchor 0, rewards 1.5 and 0.5:
    one ordered pair, loss log(1 + exp(-(s1 - s2))) with s = cosine / 0.1 (untrained)."""
    torch.manual_seed(0)
    q = torch.randn(1, 4)
    c = torch.randn(1, 3, 4)
    model = CosineBilinearPolicy(4, 2, 0.1, "reverse", candidate_term=True)
    batch = Batch(
        rows=torch.tensor([0]),
        query_ids=torch.tensor([0]),
        query_emb=q,
        cand_emb=c,
        pool_mask=torch.ones(1, 3, dtype=torch.bool),
        sequences=torch.tensor([[[0, 1], [0, 2]]]),
        cand_mask=torch.ones(1, 2, dtype=torch.bool),
        rewards_raw=torch.tensor([[1.5, 0.5]]),
        rewards_norm=torch.tensor([[1.5, 0.5]]),
        correct=torch.tensor([[1.0, 0.0]]),
    )
    phase = JudgeRankPhase()
    state = SimpleNamespace(model=model, options={"rank_penalty": 0.5, "rank_loss": "pairwise"})
    phase.anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    qn, cn = q[0].numpy() / np.linalg.norm(q[0].numpy()), c[0].numpy()
    cos = [float(cn[k] @ qn / np.linalg.norm(cn[k])) for k in range(3)]
    s1, s2 = cos[1] / 0.1, cos[2] / 0.1
    out = phase.loss(state, batch)  # type: ignore[arg-type]
    assert float(out["loss"].detach()) == pytest.approx(math.log1p(math.exp(-(s1 - s2))), rel=1e-5)
    assert float(out["pair_accuracy"]) == (1.0 if s1 > s2 else 0.0)
    # moved weights pay the penalty: 0.5 * squared distance from the anchor
    with torch.no_grad():
        model.log_scale.add_(0.3)
    scale = math.exp(0.3)
    moved = phase.loss(state, batch)  # type: ignore[arg-type]
    expected = math.log1p(math.exp(-scale * (s1 - s2))) + 0.5 * 0.3**2
    assert float(moved["loss"].detach()) == pytest.approx(expected, rel=1e-5)
    # equal rewards make no pair: the ranking term is 0
    batch.rewards_raw = torch.tensor([[1.0, 1.0]])
    assert float(phase.loss(state, batch)["pair_accuracy"]) == 0.0  # type: ignore[arg-type]
    # listwise at temperature 2: target softmax([1.5, 0.5] / 2) = [sigmoid(0.5), 1 - it],
    # log-probabilities log_softmax(scale * [s1, s2]); the penalty as before
    batch.rewards_raw = torch.tensor([[1.5, 0.5]])
    state.options.update(rank_loss="listwise", rank_temperature=2.0)
    t1 = 1 / (1 + math.exp(-0.5))
    p1 = 1 / (1 + math.exp(-scale * (s1 - s2)))
    cross = -(t1 * math.log(p1) + (1 - t1) * math.log(1 - p1))
    listwise = phase.loss(state, batch)  # type: ignore[arg-type]
    assert float(listwise["loss"].detach()) == pytest.approx(cross + 0.5 * 0.3**2, rel=1e-5)


def test_the_listwise_loss_ignores_unjudged_slots_and_single_candidate_queries() -> None:
    from lever_trainer_plugins.judge_rank import listwise_loss

    score = torch.tensor([[2.0, 0.0, 9.0], [1.0, 3.0, 3.0]])
    reward = torch.tensor([[1.0, 0.0, 5.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    # query 0 only (query 1 has one judged candidate): target softmax([1, 0]) at T = 1
    t0 = math.exp(1) / (math.exp(1) + 1)
    p0 = math.exp(2) / (math.exp(2) + 1)
    expected = -(t0 * math.log(p0) + (1 - t0) * math.log(1 - p0))
    assert float(listwise_loss(score, reward, mask, 1.0)) == pytest.approx(expected, rel=1e-6)


def test_the_candidate_term_starts_at_zero_and_older_checkpoints_load_without_it() -> None:
    with_term = build(8, {"bilinear_candidate_term": "on"})
    without = build(8, {})
    assert with_term is not None and without is not None
    assert "candidate_quadratic" in dict(with_term.named_parameters())
    assert "candidate_quadratic" not in dict(without.named_parameters())
    assert without.policy_options()["bilinear_candidate_term"] == "off"
    q, c = torch.randn(3, 8), torch.randn(3, 5, 8)
    assert torch.equal(with_term.encode(q, c), without.encode(q, c))
    with torch.no_grad():
        with_term.candidate_quadratic[1].copy_(torch.eye(8))
    enc = with_term.encode(q, c)
    cn = torch.nn.functional.normalize(c, dim=-1)
    # c^T I c = 1 for a unit vector: position 1's scores rise by 1 / temperature
    assert torch.allclose(enc[:, 1] - without.encode(q, c)[:, 1], torch.full((3, 5), 10.0))
    assert torch.allclose((cn * cn).sum(-1), torch.ones(3, 5))


def test_judge_rank_asks_each_top_candidate_once_behind_the_farthest_item(cli, tmp_path) -> None:
    doc = json.loads(Path(FILES["train"]).read_text())
    keep = [k for k in doc if k.isdigit()][:30]
    data = write_json(tmp_path / "d.json", {k: doc[k] for k in keep})
    store = tmp_path / "v.sqlite"
    run = tmp_path / "run"
    args = ["--beam-data", data, "--img-emb", FILES["embeddings"], "--output-dir", run]
    args += ["--judge", "digits", "--store", store, "--plugin", "judge-rank", "--rce-epochs", "0"]
    args += ["--rank-epochs", "2", "--rank-candidates", "5", "--val-ratio", "0.2", "--seed", "3"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ranked = [h for h in history if h.get("phase") == "judge-rank"]
    assert len(ranked) == 2 and all(h["judge_calls_per_query"] == 5 for h in ranked)
    # a second run on the same store asks nothing new, yet counts the verdicts it used
    again = cli(*[str(a) if a != run else str(tmp_path / "run2") for a in args])
    assert again.exit_code == 0, again.output
    lines = (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x).get("judge_calls_per_query") for x in lines][-1] == 5
    emb = load_file(str(FILES["embeddings"]))["embeddings"].numpy()
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    with sqlite3.connect(store) as db:
        rows = db.execute("SELECT query, sequence FROM verdicts").fetchall()
    asked: dict[int, list[list[int]]] = {}
    for qid, seq in rows:
        asked.setdefault(int(qid), []).append([int(g) for g in seq.split(",")])
    judged = {q: s for q, s in asked.items() if len(s) == 5}  # validation queries: 1 each
    assert len(judged) == 24
    for qid, seqs in judged.items():
        pool = doc[str(qid)]["candidate_pool_ids"]
        far = pool[int(np.argmin(emb[pool] @ emb[qid]))]
        assert all(s[0] == far for s in seqs)
        assert len({s[1] for s in seqs}) == 5 and far not in {s[1] for s in seqs}
    # the untrained policy is cosine: the candidates are the 5 most cosine-similar
    qid, seqs = next(iter(judged.items()))
    pool = doc[str(qid)]["candidate_pool_ids"]
    top5 = [pool[i] for i in np.argsort(-(emb[pool] @ emb[qid]), kind="stable")[:5]]
    assert {s[1] for s in seqs} == set(top5)

"""RL data loading, rewards, the train/val split, embeddings and batches (docs/algorithm.md#data-format, #rewards).

Every expected value is worked out by hand in the comment beside it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import builtin_registry, candidate, write_emb, write_json
from safetensors.torch import save_file

from lever_trainer.data import (
    DataOptions,
    Embeddings,
    load_embeddings,
    load_rl_data,
    make_batch,
    split_train_val,
)
from lever_trainer.errors import LeverError


def load(tmp_path: Path, data: Any, opts: DataOptions | None = None) -> Any:
    """Write ``data`` as rl.json and load it."""
    return load_rl_data(
        write_json(tmp_path / "rl.json", data), opts or DataOptions(), builtin_registry()
    )


def row_of(table: Any, qid: int) -> int:
    """Row number of query ``qid`` in a table."""
    return int((table.query_ids == qid).nonzero()[0, 0])


def real_pool(table: Any, qid: int) -> list[int]:
    r = row_of(table, qid)
    return table.pool_ids[r, : int(table.pool_len[r])].tolist()  # type: ignore[no-any-return]


def real_seqs(table: Any, qid: int) -> list[list[int]]:
    r = row_of(table, qid)
    return table.sequences[r, : int(table.group_len[r])].tolist()  # type: ignore[no-any-return]


# ----------------------------------------------------------------- pointer encodings
def test_three_pointer_encodings(tmp_path: Path) -> None:
    data = {
        # pointer_global + candidate_pool_ids: `pointer` = positions in candidate_pool_ids
        "3": {
            "candidate_pool_ids": [50, 40, 30, 20],
            "pointer_candidates": [
                {"pointer": [2, 0], "pointer_global": [30, 50], "vqa_correct": 1},
                {"pointer": [1, 3], "pointer_global": [40, 20], "vqa_correct": 0},
            ],
        },
        # pointer_pos: global ids (a `pointer` beside it is not used)
        "5": {
            "pointer_candidates": [
                {"pointer_pos": [30, 10], "pointer": [0, 1]},
                {"pointer_pos": [20, 30], "pointer": [1, 2]},
            ],
        },
        # pointer only: global ids; pool = sorted set {101, 103, 105}
        "7": {
            "candidate_pool_ids": [999, 998],  # ignored: no candidate carries pointer_global
            "pointer_candidates": [candidate([105, 101]), candidate([103, 105])],
        },
    }
    table, report = load(tmp_path, data)
    assert table.query_ids.tolist() == [3, 5, 7]
    assert table.pool_len.tolist() == [4, 3, 3]
    assert table.group_len.tolist() == [2, 2, 2]
    assert table.seq_len == 2

    assert real_pool(table, 3) == [50, 40, 30, 20]
    assert real_seqs(table, 3) == [[2, 0], [1, 3]]
    # ids {10, 20, 30} -> positions 0, 1, 2
    assert real_pool(table, 5) == [10, 20, 30]
    assert real_seqs(table, 5) == [[2, 0], [1, 2]]
    assert real_pool(table, 7) == [101, 103, 105]
    assert real_seqs(table, 7) == [[2, 0], [1, 2]]
    # padding of the shorter pools is outside pool_len
    assert table.pool_mask().tolist() == [[True] * 4, [True] * 3 + [False], [True] * 3 + [False]]
    assert report.queries_total == 3
    assert report.candidates_total == 6


def test_pointer_global_without_pointer_reads_global_ids(tmp_path: Path) -> None:
    data = {
        "1": {
            "candidate_pool_ids": [7, 8, 9],
            "pointer_candidates": [{"pointer_global": [9, 7]}, {"pointer_global": [8, 9]}],
        }
    }
    table, _ = load(tmp_path, data)
    assert real_pool(table, 1) == [7, 8, 9]
    assert real_seqs(table, 1) == [[2, 0], [1, 2]]


def test_pointer_global_without_pool_ids_is_global(tmp_path: Path) -> None:
    # No candidate_pool_ids: `pointer` may hold local positions the loader cannot
    # resolve, so the global ids in pointer_global are the sequence. Pool = {40, 50, 60}.
    data = {
        "1": {
            "pointer_candidates": [
                {"pointer": [0, 1], "pointer_global": [60, 40]},
                {"pointer": [2, 3], "pointer_global": [50, 60]},
            ]
        }
    }
    table, _ = load(tmp_path, data)
    assert real_pool(table, 1) == [40, 50, 60]
    assert real_seqs(table, 1) == [[2, 0], [1, 2]]


# ----------------------------------------------------------------- filters
def filter_data() -> dict[str, Any]:
    return {
        "_meta": {"generator": "test", "queries": 99},
        "notes": "not a query either",
        "1": {
            "pointer_candidates": [
                candidate([1, 2], 1, 1.0),
                candidate([5, 6], eval_failed=True),
                candidate([5, 7], vqa_eval_mode="error"),
                candidate([3, 4], vqa_eval_mode="fallback"),
                candidate([2, 3], vqa_eval_mode="official", eval_failed=False),
            ]
        },
        "2": {  # nothing survives: the query is dropped
            "pointer_candidates": [
                candidate([1, 2], eval_failed=True),
                candidate([1, 3], vqa_eval_mode="error"),
            ]
        },
    }


def test_filters_default(tmp_path: Path) -> None:
    table, report = load(tmp_path, filter_data())
    assert table.query_ids.tolist() == [1]
    assert table.cand_index.tolist() == [[0, 4]]
    # kept sequences use ids {1, 2, 3}
    assert real_pool(table, 1) == [1, 2, 3]
    assert real_seqs(table, 1) == [[0, 1], [1, 2]]
    assert dict(report.dropped) == {
        "eval_failed": 2,
        "vqa_eval_mode=error": 2,
        "vqa_eval_mode=fallback": 1,
    }
    assert sum(report.queries_dropped.values()) == 1
    assert report.queries_total == 1
    assert report.candidates_total == 2
    text = "\n".join(report.lines())
    assert "dropped 2 candidates: eval_failed" in text
    assert "dropped 1 queries" in text


def test_filters_keep_fallback(tmp_path: Path) -> None:
    table, report = load(tmp_path, filter_data(), DataOptions(keep_fallback=True))
    assert table.cand_index.tolist() == [[0, 3, 4]]
    assert real_pool(table, 1) == [1, 2, 3, 4]
    assert real_seqs(table, 1) == [[0, 1], [2, 3], [1, 2]]
    assert "vqa_eval_mode=fallback" not in report.dropped
    assert sum(report.dropped.values()) == 4


def test_gen_method_and_require_positive(tmp_path: Path) -> None:
    data = {
        "1": {
            "pointer_candidates": [
                candidate([1, 2], 0, 0.5, gen_method="beam"),
                candidate([2, 3], 1, 1.0, gen_method="sample"),
                candidate([3, 4], 0, 0.0, gen_method=["not", "hashable"]),
            ]
        },
        "2": {"pointer_candidates": [candidate([1, 2], 0, 0.3), candidate([1, 3], 0, 0.1)]},
    }
    table, report = load(tmp_path, data, DataOptions(gen_methods=frozenset({"beam"})))
    assert table.query_ids.tolist() == [1]  # query 2 has no gen_method at all
    assert table.cand_index.tolist() == [[0]]
    assert report.dropped["gen_method not in --gen-methods"] == 4

    table, report = load(tmp_path, data, DataOptions(require_positive=True))
    assert table.query_ids.tolist() == [1]
    assert sum(report.queries_dropped.values()) == 1


def test_no_query_at_all_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(LeverError, match="no query"):
        load(tmp_path, {"_meta": {"x": 1}})
    with pytest.raises(LeverError, match="no query has a candidate left"):
        load(tmp_path, {"4": {"pointer_candidates": [candidate([1, 2], eval_failed=True)]}})


# ----------------------------------------------------------------- max_pool
def test_max_pool_cuts_candidate_pool_ids(tmp_path: Path) -> None:
    data = {
        "8": {
            "candidate_pool_ids": [10, 11, 12, 13, 14, 15],
            "pointer_candidates": [
                {"pointer": [0, 1], "pointer_global": [10, 11]},
                {"pointer": [3, 2], "pointer_global": [13, 12]},
            ],
        }
    }
    table, report = load(tmp_path, data, DataOptions(max_pool=4))
    assert real_pool(table, 8) == [10, 11, 12, 13]
    assert real_seqs(table, 8) == [[0, 1], [3, 2]]
    assert report.pools_cut == 1

    data["8"]["pointer_candidates"].append({"pointer": [4, 0], "pointer_global": [14, 10]})
    with pytest.raises(LeverError) as err:
        load(tmp_path, data, DataOptions(max_pool=4))
    assert "query 8" in str(err.value)
    assert "candidate 2" in str(err.value)


def test_max_pool_cuts_global_id_pool(tmp_path: Path) -> None:
    # sorted pool {1..6} cut to [1, 2, 3, 4]; candidate 2 uses 5
    data = {"9": {"pointer_candidates": [candidate([1, 2]), candidate([4, 3]), candidate([5, 6])]}}
    table, _ = load(tmp_path, {"9": {"pointer_candidates": data["9"]["pointer_candidates"][:2]}})
    assert real_pool(table, 9) == [1, 2, 3, 4]
    with pytest.raises(LeverError) as err:
        load(tmp_path, data, DataOptions(max_pool=4))
    assert "query 9" in str(err.value)
    assert "candidate 2" in str(err.value)


# ----------------------------------------------------------------- rewards
def test_rewards_raw_and_normalised(tmp_path: Path) -> None:
    data = {
        # raw = correct + acc: [0 (no fields), 1 (acc only), 2]; mean 1, unbiased std 1
        "1": {
            "pointer_candidates": [
                {"pointer": [1, 2]},
                {"pointer": [2, 3], "vqa_acc_score": 1.0},
                {"pointer": [3, 4], "vqa_correct": 1, "vqa_acc_score": 1.0},
            ]
        },
        # clip: 1 + 7 = 8 -> 5; 0 + (-9) -> -5; mean 0, std sqrt(50) -> +-1/sqrt(2)
        "2": {
            "pointer_candidates": [
                candidate([1, 2], 1, 7.0),
                {"pointer": [2, 3], "vqa_correct": None, "vqa_acc_score": -9},
            ]
        },
        # one candidate: normalised = raw = 1.5
        "3": {"pointer_candidates": [candidate([1, 2], 1, 0.5)]},
        # all equal (std 0): normalised = raw = 2
        "4": {"pointer_candidates": [candidate([1, 2], 1, 1.0), candidate([2, 1], 1, 1.0)]},
    }
    table, report = load(tmp_path, data)
    mask = table.cand_mask()

    def row(qid: int, t: torch.Tensor) -> list[float]:
        r = row_of(table, qid)
        return t[r][mask[r]].tolist()  # type: ignore[no-any-return]

    assert row(1, table.rewards_raw) == pytest.approx([0.0, 1.0, 2.0])
    assert row(1, table.rewards_norm) == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)
    assert row(1, table.correct) == [0.0, 0.0, 1.0]
    assert row(2, table.rewards_raw) == pytest.approx([5.0, -5.0])
    h = 1 / math.sqrt(2)
    assert row(2, table.rewards_norm) == pytest.approx([h, -h], abs=1e-6)
    assert row(3, table.rewards_raw) == pytest.approx([1.5])
    assert row(3, table.rewards_norm) == pytest.approx([1.5])
    assert row(4, table.rewards_norm) == pytest.approx([2.0, 2.0])
    assert report.equal_reward_groups == 2  # queries 3 and 4


def test_rewards_norm_clamped_at_three(tmp_path: Path) -> None:
    # eleven candidates, raw [1, 0 x 10]: mean 1/11, unbiased var
    # (10/121 + 100/121) / 10 = 1/11 -> std 1/sqrt(11);
    # z(1) = (10/11) * sqrt(11) = 10/sqrt(11) = 3.015 -> clamped to 3;
    # z(0) = -(1/11) * sqrt(11) = -1/sqrt(11)
    cands = [candidate([1, 2], 1, 0.0)] + [candidate([i, i + 100]) for i in range(2, 12)]
    table, _ = load(tmp_path, {"0": {"pointer_candidates": cands}})
    norm = table.rewards_norm[0, :11]
    assert norm[0].item() == pytest.approx(3.0)
    assert norm[1:].tolist() == pytest.approx([-1 / math.sqrt(11)] * 10, abs=1e-6)


# ----------------------------------------------------------------- split
def split_data(qids: list[int]) -> dict[str, Any]:
    return {str(q): {"pointer_candidates": [candidate([q + 1, q + 2], 1, 0.5)]} for q in qids}


def test_split_sorts_query_ids_numerically(tmp_path: Path) -> None:
    table, _ = load(tmp_path, split_data([10, 9, 100, 2, 33]))
    assert table.query_ids.tolist() == [2, 9, 10, 33, 100]  # numeric, not "10" < "100" < "2"
    train, val = split_train_val(table, 0.2)  # 5 * 0.8 = 4 train
    assert train.query_ids.tolist() == [2, 9, 10, 33]
    assert val.query_ids.tolist() == [100]
    # rows travel with their query
    assert train.pool_ids[1, :2].tolist() == [10, 11]
    assert val.pool_ids[0, :2].tolist() == [101, 102]

    train, val = split_train_val(table, 0.4)  # 5 * 0.6 = 3 train
    assert train.query_ids.tolist() == [2, 9, 10]
    assert val.query_ids.tolist() == [33, 100]


def test_split_is_deterministic_and_seed_independent(tmp_path: Path) -> None:
    qids = [17, 3, 250, 4, 8, 99, 1, 42, 5, 60]
    table, _ = load(tmp_path, split_data(qids))
    torch.manual_seed(0)
    a = split_train_val(table, 0.2)
    torch.manual_seed(12345)
    b = split_train_val(table, 0.2)
    assert a[0].query_ids.tolist() == b[0].query_ids.tolist() == [1, 3, 4, 5, 8, 17, 42, 60]
    assert a[1].query_ids.tolist() == b[1].query_ids.tolist() == [99, 250]


@pytest.mark.parametrize(("n", "val_ratio", "n_train"), [(20, 0.9, 2), (10, 0.7, 3), (10, 0.0, 10)])
def test_split_ratio_counts(tmp_path: Path, n: int, val_ratio: float, n_train: int) -> None:
    # 20 * (1 - 0.9) = 2 train (not 1.9999... floored to 1); 10 * 0.3 = 3
    table, _ = load(tmp_path, split_data(list(range(n))))
    train, val = split_train_val(table, val_ratio)
    assert len(train) == n_train
    assert len(val) == n - n_train


def test_split_rejects_bad_ratio(tmp_path: Path) -> None:
    table, _ = load(tmp_path, split_data([1, 2]))
    with pytest.raises(LeverError, match="--val-ratio"):
        split_train_val(table, 1.0)


# ----------------------------------------------------------------- embeddings
TABLE = torch.arange(24, dtype=torch.float32).reshape(6, 4) / 8


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".npy", ".safetensors"])
def test_embedding_formats(tmp_path: Path, suffix: str) -> None:
    path = write_emb(tmp_path / f"emb{suffix}", TABLE)
    emb = load_embeddings(path)
    assert emb.query.dtype == torch.float32
    assert torch.equal(emb.query, TABLE)
    assert torch.equal(emb.cand, TABLE)
    assert emb.dim == 4


def test_embedding_torch_saved_numpy_array(tmp_path: Path) -> None:
    path = tmp_path / "emb.pt"
    torch.save(TABLE.numpy().astype(np.float64), path)
    emb = load_embeddings(path)
    assert emb.query.dtype == torch.float32
    assert torch.equal(emb.query, TABLE)


def test_embedding_float16_upcast(tmp_path: Path) -> None:
    path = write_emb(tmp_path / "emb.safetensors", TABLE.half())
    emb = load_embeddings(path)
    assert emb.query.dtype == torch.float32
    # k/8 for k < 24 is exact in float16
    assert torch.equal(emb.query, TABLE)


def test_embedding_safetensors_key(tmp_path: Path) -> None:
    path = tmp_path / "multi.safetensors"
    save_file({"image": TABLE, "text": TABLE * 2}, str(path))
    assert torch.equal(load_embeddings(path, key="text").query, TABLE * 2)
    with pytest.raises(LeverError, match="--emb-key"):
        load_embeddings(path)
    with pytest.raises(LeverError, match="'audio'"):
        load_embeddings(path, key="audio")


def test_embedding_separate_candidate_file(tmp_path: Path) -> None:
    q = write_emb(tmp_path / "q.pt", TABLE)
    c = write_emb(tmp_path / "c.npy", -TABLE[:3])
    emb = load_embeddings(q, c)
    assert torch.equal(emb.query, TABLE)
    assert torch.equal(emb.cand, -TABLE[:3])
    assert emb.cand_path == str(c)
    bad = write_emb(tmp_path / "c5.pt", torch.zeros(3, 5))
    with pytest.raises(LeverError, match="d=5"):
        load_embeddings(q, bad)


# ----------------------------------------------------------------- batches
def test_make_batch_pads_pools_and_groups(tmp_path: Path) -> None:
    data = {
        "0": {"pointer_candidates": [candidate([11, 13]), candidate([12, 11])]},  # pool 3, G 2
        "1": {  # pool [14, 15, 16, 17, 18], G 3
            "pointer_candidates": [candidate([14, 15]), candidate([16, 17]), candidate([18, 14])]
        },
    }
    table, _ = load(tmp_path, data)
    emb_table = torch.arange(20 * 4, dtype=torch.float32).reshape(20, 4)
    emb = Embeddings(emb_table, -emb_table, "q", "c")
    batch = make_batch(table, torch.tensor([0, 1]), emb)

    assert batch.query_ids.tolist() == [0, 1]
    assert batch.query_emb.shape == (2, 4)
    assert torch.equal(batch.query_emb, emb_table[[0, 1]])
    assert batch.cand_emb.shape == (2, 5, 4)
    assert batch.pool_mask.tolist() == [[True, True, True, False, False], [True] * 5]
    assert batch.cand_mask.tolist() == [[True, True, False], [True, True, True]]
    assert batch.sequences.shape == (2, 3, 2)
    assert batch.sequences[0, :2].tolist() == [[0, 2], [1, 0]]
    assert batch.sequences[1].tolist() == [[0, 1], [2, 3], [4, 0]]
    # candidate rows come from the candidate table at the pool ids
    assert torch.equal(batch.cand_emb[0, :3], -emb_table[[11, 12, 13]])
    assert torch.equal(batch.cand_emb[1], -emb_table[[14, 15, 16, 17, 18]])

    # a batch of the small query alone is trimmed to its own sizes
    small = make_batch(
        table, torch.tensor([0]), emb, ref_logprobs=torch.tensor([[-1.0, -2.0, 0.0]])
    )
    assert small.cand_emb.shape == (1, 3, 4)
    assert small.cand_mask.tolist() == [[True, True]]
    assert small.ref_logprobs is not None
    assert small.ref_logprobs.tolist() == [[-1.0, -2.0]]


def test_metadata_of_any_shape_is_not_a_query(tmp_path: Path) -> None:
    # metadata objects of any shape sit beside the queries
    data = {"_meta": [1, 2, {"a": None}], "1": {"pointer_candidates": [candidate([1, 2])]}}
    path = tmp_path / "rl.json"
    path.write_text(json.dumps(data, indent=1))
    table, report = load_rl_data(path, DataOptions(), builtin_registry())
    assert table.query_ids.tolist() == [1]
    assert report.lines()[0].startswith(f"loaded {path}: 1 queries, 1 candidates")

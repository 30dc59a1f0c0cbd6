"""The embedding table ``lever-train embed`` writes, without a model: its bytes, the ids
its metadata lists, and the loader refusing an id whose row is padding. (The model side,
with a tiny CLIP, is tests/test_embed.py.)"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from types import MappingProxyType

import pytest
import torch
from conftest import assert_user_error, candidate, write_emb, write_json
from safetensors import safe_open
from safetensors.torch import load_file

from lever_trainer.data import (
    TABLE_FORMAT,
    format_ids,
    listed_items,
    load_embeddings,
    parse_ids,
    table_bytes,
)
from lever_trainer.embed import check_ids
from lever_trainer.errors import LeverError
from lever_trainer.manifest import ManifestItem


def test_ids_are_written_as_ranges_and_read_back() -> None:
    # runs of consecutive ids collapse to FIRST-LAST, single ids stay alone
    assert format_ids([9, 0, 1, 2, 3, 7, 10]) == "0-3,7,9-10"
    assert format_ids([5]) == "5"
    assert format_ids([]) == ""
    assert parse_ids("0-3,7,9-10", "x") == [(0, 3), (7, 7), (9, 10)]
    assert parse_ids("", "x") == []


@pytest.mark.parametrize(
    ("text", "part"),
    [("0-3,2", "'2'"), ("3-1", "'3-1'"), ("a", "'a'"), ("-1", "'-1'"), ("0,0", "'0'")],
)
def test_bad_id_ranges_are_refused(text: str, part: str) -> None:
    with pytest.raises(LeverError, match="where: ") as caught:
        parse_ids(text, "where")
    assert part in str(caught.value)


def test_table_bytes_are_a_safetensors_file_independent_of_metadata_order(tmp_path) -> None:
    table = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7
    meta = {"format": TABLE_FORMAT, "ids": "0-2", "model": "m", "modality": "image"}
    one = table_bytes(table, meta)
    two = table_bytes(table, dict(reversed(list(meta.items()))))
    assert one == two
    # the layout: 8-byte little-endian header length, the JSON header, then the data at
    # an 8-byte boundary: 3 * 4 float32 = 48 bytes
    (n,) = struct.unpack("<Q", one[:8])
    assert (8 + n) % 8 == 0 and len(one) == 8 + n + 48
    header = json.loads(one[8 : 8 + n])
    assert list(header["__metadata__"]) == sorted(meta)
    assert header["embeddings"] == {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]}
    path = tmp_path / "t.safetensors"
    path.write_bytes(one)
    assert torch.equal(load_file(str(path))["embeddings"], table)
    with safe_open(str(path), "pt") as fh:
        assert fh.metadata() == meta


def test_the_loader_knows_which_rows_are_items(tmp_path) -> None:
    table = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    table[3] = 0  # the padding row of the absent id 3
    ours = tmp_path / "ours.safetensors"
    ours.write_bytes(table_bytes(table, {"format": TABLE_FORMAT, "ids": "0-2,4-5"}))
    emb = load_embeddings(ours)
    assert emb.query_items is not None and emb.query_items.tolist() == [1, 1, 1, 0, 1, 1]
    assert emb.cand_items is emb.query_items
    # any other table holds an item in every row
    plain = write_emb(tmp_path / "plain.safetensors", table)
    assert listed_items(plain, 6) is None
    assert load_embeddings(plain).query_items is None
    # a separate candidate table brings its own list
    cand = tmp_path / "cand.safetensors"
    cand.write_bytes(table_bytes(table, {"format": TABLE_FORMAT, "ids": "1-5"}))
    both = load_embeddings(ours, cand)
    assert both.cand_items is not None and both.cand_items.tolist() == [0, 1, 1, 1, 1, 1]


def test_metadata_that_lists_ids_outside_the_table_is_refused(tmp_path) -> None:
    path = tmp_path / "t.safetensors"
    path.write_bytes(table_bytes(torch.ones(3, 2), {"format": TABLE_FORMAT, "ids": "0-3"}))
    with pytest.raises(LeverError, match="lists id 3, but the table has 3 rows"):
        load_embeddings(path)
    path.write_bytes(table_bytes(torch.ones(3, 2), {"format": TABLE_FORMAT}))
    with pytest.raises(LeverError, match="metadata field ids is missing"):
        load_embeddings(path)


def rl_data(query_ids: list[int], cands: list[int]) -> dict[str, object]:
    """Each query with two logged sequences over ``cands`` (S = 2)."""
    return {
        str(q): {
            "pointer_candidates": [
                candidate([cands[0], cands[1]], 1, 1.0),
                candidate([cands[2], cands[0]], 0, 0.2),
            ]
        }
        for q in query_ids
    }


@pytest.mark.parametrize(
    ("queries", "cands", "culprit"),
    [([0, 1, 4, 5], [6, 7, 8], "query id 4"), ([0, 1, 2, 5], [6, 4, 8], "candidate id 4")],
)
def test_training_refuses_an_id_whose_row_is_padding(
    cli, tmp_path: Path, queries, cands, culprit
) -> None:
    table = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
    table[3:5] = 0
    emb = tmp_path / "emb.safetensors"
    emb.write_bytes(table_bytes(table, {"format": TABLE_FORMAT, "ids": "0-2,5-9"}))
    data = write_json(tmp_path / "rl.json", rl_data(queries, cands))
    out = tmp_path / "run"
    result = cli("--beam-data", data, "--img-emb", emb, "--output-dir", out, "--rce-epochs", "1")
    assert_user_error(result, "emb.safetensors", culprit, "not an item of this table", "0-2,5-9")
    # the same rows in a table whose metadata lists every id train without complaint
    emb.write_bytes(table_bytes(table + 1, {"format": TABLE_FORMAT, "ids": "0-9"}))
    result = cli(
        "--beam-data", data, "--img-emb", emb, "--output-dir", out, "--rce-epochs", "1",
        "--grpo-epochs", "0", "--batch-size", "2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output


def test_select_refuses_a_pool_id_whose_row_is_padding(cli, tmp_path: Path) -> None:
    from lever_trainer.checkpoint import save_checkpoint
    from lever_trainer_plugins.policy_bilinear import CosineBilinearPolicy

    model = CosineBilinearPolicy(4, 2, 0.1, "reverse")
    ckpt = tmp_path / "c.safetensors"
    meta = {"name": "cosine-bilinear", "input_dim": 4, "options": model.policy_options()}
    save_checkpoint(ckpt, model.state_dict(), {"policy": meta})
    emb = tmp_path / "emb.safetensors"
    table = torch.randn(8, 4, generator=torch.Generator().manual_seed(2))
    emb.write_bytes(table_bytes(table, {"format": TABLE_FORMAT, "ids": "0-5,7"}))
    queries = write_json(tmp_path / "q.json", {"0": [1, 2, 6], "1": [2, 3, 4]})
    out = tmp_path / "picks.json"
    result = cli("select", "--ckpt", ckpt, "--queries", queries, "--img-emb", emb, "--output", out)
    assert_user_error(result, "candidate id 6", "q.json", "not an item of this table")
    assert not out.exists()


def item(i: int) -> ManifestItem:
    return ManifestItem(i, "/x.png", "q", (), MappingProxyType({}), i + 1)


def test_a_table_that_would_be_mostly_padding_is_refused() -> None:
    # 3 items with ids up to 10_002: 10_003 rows, 10_000 of them padding -- allowed (the
    # limit is max(10_000, 9 * 3) padding rows); one more id of padding is refused
    assert check_ids([item(0), item(1), item(10_002)], "m.jsonl") == 10_003
    with pytest.raises(LeverError, match=r"m.jsonl: ids run up to 10003 .* 10001 of its 10004"):
        check_ids([item(0), item(1), item(10_003)], "m.jsonl")
    # with many items the ratio decides: 2000 items may carry 9 * 2000 = 18_000 padding rows
    many = [item(i) for i in range(1999)]
    assert check_ids([*many, item(1999 + 18_000)], "m.jsonl") == 20_000
    with pytest.raises(LeverError, match=r"Number the items 0\.\.1999"):
        check_ids([*many, item(1999 + 18_001)], "m.jsonl")


def test_embed_without_the_extra_says_what_to_install(cli, tmp_path, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # find_spec answers None
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("")
    result = cli("embed", manifest, "--model", "m", "--output", tmp_path / "e.safetensors")
    assert_user_error(result, "needs transformers", "pip install 'lever-trainer[clip]'")
    assert not (tmp_path / "e.safetensors").exists()

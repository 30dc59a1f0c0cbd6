"""Bad input driven through the real CLI: one ``error:`` line naming the culprit, exit 2,
nothing written. Plus a property test: a mutated RL file loads or raises LeverError.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import Result
from conftest import assert_user_error, builtin_registry, candidate, write_emb, write_json
from hypothesis import given, settings
from hypothesis import strategies as st

from lever_trainer.checkpoint import read_metadata, save_checkpoint
from lever_trainer.data import DataOptions, load_rl_data
from lever_trainer.errors import LeverError
from lever_trainer_plugins.pointer import PointerPolicy, PolicyConfig

Cli = Callable[..., Result]
D = 8  # embedding width of the tiny dataset
N = 24  # rows of the tiny embedding table


class HParams:
    """A custom object that only a full (unsafe) pickle load can rebuild."""

    lr = 0.1


def tiny_data() -> dict[str, Any]:
    """Six queries (ids 0..5), candidates over global ids 10..20, S = 2."""
    data: dict[str, Any] = {"_meta": {"what": "tiny"}}
    for q in range(6):
        data[str(q)] = {
            "pointer_candidates": [
                candidate([10 + q, 11 + q], 1, 1.0),
                candidate([12 + q, 10 + q], 0, 0.3),
                candidate([13 + q, 14 + q], 0, 0.0),
            ]
        }
    return data


def tiny_emb(rows: int = N) -> torch.Tensor:
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    """A valid tiny (rl.json, emb.safetensors) pair."""
    return (
        write_json(tmp_path / "rl.json", tiny_data()),
        write_emb(tmp_path / "emb.safetensors", tiny_emb()),
    )


def train(cli: Cli, data: Path, emb: Path, out: Path, *extra: str) -> Result:
    return cli(
        "--beam-data",
        data,
        "--img-emb",
        emb,
        "--output-dir",
        out,
        "--rce-epochs",
        "1",
        "--batch-size",
        "8",
        *extra,
    )


def assert_refused(result: Result, out: Path, *fragments: str) -> None:
    """A user error naming ``fragments``, and an output dir that was never written."""
    assert_user_error(result, *fragments)
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())


# ----------------------------------------------------------------- the RL data file
def test_missing_data_file(cli: Cli, files: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = train(cli, tmp_path / "nope.json", files[1], out)
    assert_refused(result, out, "nope.json", "not found")


def test_missing_embedding_file(cli: Cli, files: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = train(cli, files[0], tmp_path / "gone.pt", out)
    assert_refused(result, out, "gone.pt", "not found")


@pytest.mark.parametrize(
    "text",
    ['{"1": {"pointer_candidates": [', "not json at all", b"\xff\xfe{}"],
    ids=["truncated", "plain-text", "not-utf8"],
)
def test_file_that_is_not_json(
    cli: Cli, files: tuple[Path, Path], tmp_path: Path, text: str | bytes
) -> None:
    bad = tmp_path / "broken.json"
    if isinstance(text, bytes):
        bad.write_bytes(text)
    else:
        bad.write_text(text)
    out = tmp_path / "out"
    assert_refused(train(cli, bad, files[1], out), out, "broken.json", "not valid JSON")


def test_json_without_query(cli: Cli, files: tuple[Path, Path], tmp_path: Path) -> None:
    bad = write_json(tmp_path / "meta_only.json", {"_meta": {"n": 3}, "version": 2})
    out = tmp_path / "out"
    assert_refused(train(cli, bad, files[1], out), out, "meta_only.json", "no query")


def test_top_level_list(cli: Cli, files: tuple[Path, Path], tmp_path: Path) -> None:
    bad = write_json(tmp_path / "list.json", [tiny_data()["0"]])
    out = tmp_path / "out"
    assert_refused(train(cli, bad, files[1], out), out, "list.json", "top level", "list")


def test_candidate_without_pointer(cli: Cli, files: tuple[Path, Path], tmp_path: Path) -> None:
    data = tiny_data()
    del data["3"]["pointer_candidates"][1]["pointer"]
    bad = write_json(tmp_path / "nopointer.json", data)
    out = tmp_path / "out"
    assert_refused(
        train(cli, bad, files[1], out),
        out,
        "nopointer.json",
        "query 3",
        "candidate 1",
        "pointer",
    )


def test_sequences_of_different_lengths(cli: Cli, files: tuple[Path, Path], tmp_path: Path) -> None:
    data = tiny_data()
    data["4"]["pointer_candidates"][2]["pointer"] = [13, 14, 15]
    bad = write_json(tmp_path / "ragged.json", data)
    out = tmp_path / "out"
    assert_refused(
        train(cli, bad, files[1], out), out, "ragged.json", "query 4", "candidate 2", "length 3"
    )


def test_pointer_outside_candidate_pool(cli: Cli, files: tuple[Path, Path], tmp_path: Path) -> None:
    data = tiny_data()
    data["2"] = {
        "candidate_pool_ids": [10, 11, 12],
        "pointer_candidates": [
            {"pointer": [0, 1], "pointer_global": [10, 11], "vqa_correct": 1},
            {"pointer": [2, 5], "pointer_global": [12, 99], "vqa_correct": 0},
        ],
    }
    bad = write_json(tmp_path / "outside.json", data)
    out = tmp_path / "out"
    assert_refused(
        train(cli, bad, files[1], out), out, "outside.json", "query 2", "candidate 1", "5"
    )


def test_pointer_outside_cut_pool(cli: Cli, files: tuple[Path, Path], tmp_path: Path) -> None:
    # query 0's pool is {10, 11, 12, 13, 14}; --max-pool 3 keeps {10, 11, 12}, and
    # candidate 2 points at 13
    out = tmp_path / "out"
    result = train(cli, files[0], files[1], out, "--max-pool", "3")
    assert_refused(result, out, "rl.json", "query 0", "candidate 2", "13", "--max-pool")


def huge_pointer_id(data: dict[str, Any]) -> str:
    data["1"]["pointer_candidates"][0]["pointer"] = [10**20, 12]
    return "10" + "0" * 19


def huge_score(data: dict[str, Any]) -> str:
    data["1"]["pointer_candidates"][0]["vqa_acc_score"] = 10**400
    return "vqa_acc_score"


def huge_query_id(data: dict[str, Any]) -> str:
    data[str(10**20)] = data.pop("1")
    return str(10**20)


def duplicate_query_id(data: dict[str, Any]) -> str:
    data[" 1"] = data["2"]
    return "query id 1"


# Cases the property test below found crashing (ValueError, OverflowError) before
# the loader checked them; kept as fixed regressions.
@pytest.mark.parametrize("mutate", [huge_pointer_id, huge_score, huge_query_id, duplicate_query_id])
def test_out_of_range_values_in_rl_json(
    cli: Cli, files: tuple[Path, Path], tmp_path: Path, mutate: Callable[[dict[str, Any]], str]
) -> None:
    data = tiny_data()
    fragment = mutate(data)
    bad = write_json(tmp_path / "huge.json", data)
    out = tmp_path / "out"
    assert_refused(train(cli, bad, files[1], out), out, "huge.json", fragment)


def test_deeply_nested_json(cli: Cli, files: tuple[Path, Path], tmp_path: Path) -> None:
    bad = tmp_path / "deep.json"
    bad.write_text('{"1": ' + "[" * 100_000 + "]" * 100_000 + "}")
    out = tmp_path / "out"
    assert_refused(train(cli, bad, files[1], out), out, "deep.json", "nested too deeply")


# ----------------------------------------------------------------- embeddings
@pytest.mark.parametrize("shape", [(N,), (N, D, 2)], ids=["1-D", "3-D"])
def test_embedding_of_wrong_rank(
    cli: Cli, files: tuple[Path, Path], tmp_path: Path, shape: tuple[int, ...]
) -> None:
    emb = write_emb(tmp_path / "rank.pt", torch.zeros(shape))
    out = tmp_path / "out"
    assert_refused(train(cli, files[0], emb, out), out, "rank.pt", "2-D", str(list(shape)))


def test_embedding_with_too_few_candidate_rows(
    cli: Cli, files: tuple[Path, Path], tmp_path: Path
) -> None:
    # candidate ids reach 19 (query 5 uses 15..19); 18 rows are too few
    emb = write_emb(tmp_path / "short.npy", tiny_emb(18))
    out = tmp_path / "out"
    assert_refused(
        train(cli, files[0], emb, out), out, "short.npy", "18 rows", "19", "too few rows"
    )


def test_embedding_with_too_few_query_rows(cli: Cli, tmp_path: Path) -> None:
    data = tiny_data()
    data["30"] = data.pop("5")
    rl = write_json(tmp_path / "rl.json", data)
    emb = write_emb(tmp_path / "emb.safetensors", tiny_emb())
    out = tmp_path / "out"
    assert_refused(train(cli, rl, emb, out), out, "emb.safetensors", "query id 30", "too few rows")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_embedding(
    cli: Cli, files: tuple[Path, Path], tmp_path: Path, value: float
) -> None:
    table = tiny_emb()
    table[7, 3] = value
    emb = write_emb(tmp_path / "nan.safetensors", table)
    out = tmp_path / "out"
    assert_refused(train(cli, files[0], emb, out), out, "nan.safetensors", "non-finite", "row 7")


def test_integer_embedding(cli: Cli, files: tuple[Path, Path], tmp_path: Path) -> None:
    emb = write_emb(tmp_path / "int.pt", torch.arange(N * D).reshape(N, D))
    out = tmp_path / "out"
    assert_refused(train(cli, files[0], emb, out), out, "int.pt", "floating point", "int64")


# ----------------------------------------------------------------- starting checkpoint
@pytest.mark.parametrize(
    ("ckpt_d", "ckpt_h", "key"),
    [
        (12, 16, "input_proj.weight"),  # a plain shape mismatch
        (12, 8, "input_proj.weight"),  # data d == h: the model has no input_proj.weight
        (16, 16, "query_proj.weight"),  # ckpt d == h: the checkpoint has no input_proj.weight
    ],
)
def test_checkpoint_for_another_embedding_width(
    cli: Cli, files: tuple[Path, Path], tmp_path: Path, ckpt_d: int, ckpt_h: int, key: str
) -> None:
    model = PointerPolicy(PolicyConfig(input_dim=ckpt_d, hidden_dim=ckpt_h))
    ckpt = tmp_path / "sft.safetensors"
    save_checkpoint(ckpt, model.state_dict(), {})
    out = tmp_path / "out"
    result = train(cli, files[0], files[1], out, "--sft-ckpt", ckpt)
    assert_refused(result, out, "sft.safetensors", key, f"d={D}")


def test_unsafe_checkpoint_names_trust_flag(
    cli: Cli, files: tuple[Path, Path], tmp_path: Path
) -> None:
    ckpt = tmp_path / "full.ckpt"
    # an instance of a class of this module is not on the weights_only allow-list
    state = PointerPolicy(PolicyConfig(input_dim=D, hidden_dim=16)).state_dict()
    torch.save({"state_dict": state, "hparams": HParams()}, ckpt)
    out = tmp_path / "out"
    result = train(cli, files[0], files[1], out, "--sft-ckpt", ckpt)
    assert_refused(result, out, "full.ckpt", "--trust-checkpoint")
    # with the flag the full load goes ahead, after a warning that names the file
    result = train(cli, files[0], files[1], out, "--sft-ckpt", ckpt, "--trust-checkpoint")
    assert result.exit_code == 0, result.output
    assert f"warning: --trust-checkpoint: loading {ckpt} with a full (unsafe) pickle load" in (
        result.output
    )
    assert "loaded starting checkpoint" in result.output


# ----------------------------------------------------------------- flags and plugins
def test_unknown_plugin(cli: Cli, files: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = train(cli, *files, out, "--plugin", "no-such-plugin")
    assert_refused(result, out, "--plugin", "no-such-plugin")


def test_both_reward_alias_flags(cli: Cli, files: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = train(cli, *files, out, "--rce_use_raw_reward", "--rce_use_normalized_reward")
    assert_refused(result, out, "--rce_use_raw_reward", "--rce_use_normalized_reward")


def test_both_reward_plugins(cli: Cli, files: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = train(cli, *files, out, "--plugin", "raw-reward", "--plugin", "normalized-reward")
    assert_refused(result, out, "raw-reward", "normalized-reward")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_an_error(
    cli: Cli, demo_files: tuple[Path, Path], tmp_path: Path, device: str
) -> None:
    out = tmp_path / "out"
    result = train(cli, *demo_files, out, "--device", device)
    assert_user_error(result, f"--device {device}", "CUDA is not available", "--device auto")
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_auto_is_cpu_without_cuda(
    cli: Cli, demo_files: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = train(cli, *demo_files, out, "--device", "auto")
    assert result.exit_code == 0, result.output
    assert "device cpu;" in result.output
    assert json.loads((out / "run_config.json").read_text())["train_config"]["device"] == "cpu"


def test_unknown_device_is_an_error(
    cli: Cli, demo_files: tuple[Path, Path], tmp_path: Path
) -> None:
    result = train(cli, *demo_files, tmp_path / "out", "--device", "tpu")
    assert_user_error(result, "--device", "tpu")


def test_output_dir_with_checkpoint(
    cli: Cli, demo_files: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    old = out / "rce_epoch01.safetensors"
    old.write_bytes(b"an earlier run's weights")
    result = train(cli, *demo_files, out)
    assert_user_error(result, "--output-dir", "rce_epoch01.safetensors", "--overwrite")
    assert old.read_bytes() == b"an earlier run's weights"
    assert sorted(p.name for p in out.iterdir()) == ["rce_epoch01.safetensors"]

    result = train(cli, *demo_files, out, "--overwrite")
    assert result.exit_code == 0, result.output
    meta = read_metadata(old)
    assert meta["phase"] == "rce"
    assert meta["epoch"] == 1


# ----------------------------------------------------------------- property test
BASE: dict[str, Any] = {
    "_meta": {"generator": "test", "n": 2},
    "1": {
        "query": {"question": "what?", "image_id": 1},
        "candidate_pool_ids": [10, 11, 12, 13],
        "pointer_candidates": [
            {
                "pointer": [0, 1],
                "pointer_global": [10, 11],
                "gen_method": "beam",
                "vqa_correct": 1,
                "vqa_acc_score": 0.8,
                "vqa_eval_mode": "official",
                "eval_failed": False,
            },
            {
                "pointer": [2, 3],
                "pointer_global": [12, 13],
                "gen_method": "sample",
                "vqa_correct": 0,
                "vqa_acc_score": 0.2,
                "vqa_eval_mode": "fallback",
            },
        ],
    },
    "2": {
        "pointer_candidates": [
            {"pointer": [3, 5], "vqa_correct": 0, "vqa_acc_score": 0.4, "vqa_gt_prob": 0.1},
            {"pointer_pos": [5, 7], "vqa_correct": 1, "vqa_acc_score": 1.0},
            {"pointer": [7, 3], "vqa_acc_score": 0.5, "eval_failed": False},
        ]
    },
}

JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**25), max_value=10**25),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
)
JSON_ANY = st.recursive(
    JSON_LEAF,
    lambda kids: st.one_of(
        st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=4), kids, max_size=3)
    ),
    max_leaves=5,
)
SPECIAL = st.sampled_from(
    [float("nan"), float("inf"), -1, -3.5, 0.5, 2.0, 10**20, 10**400, True, "7", [], {}, None]
)
KEYS = st.sampled_from(
    [
        "pointer",
        "pointer_pos",
        "pointer_global",
        "candidate_pool_ids",
        "pointer_candidates",
        "vqa_correct",
        "eval_failed",
        "vqa_eval_mode",
        "gen_method",
        "3",
        "-1",
        "x",
    ]
)


def paths(node: Any, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a node below the root."""
    out: list[tuple[Any, ...]] = []
    children = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for k, v in children:
        out.append((*here, k))
        out.extend(paths(v, (*here, k)))
    return out


def parent_of(doc: Any, path: tuple[Any, ...]) -> Any:
    node = doc
    for k in path[:-1]:
        node = node[k]
    return node


@st.composite
def mutated_documents(draw: st.DrawFn) -> tuple[str, DataOptions]:
    doc = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        targets = paths(doc)
        if not targets:
            break
        path = draw(st.sampled_from(targets))
        parent, key = parent_of(doc, path), path[-1]
        op = draw(st.sampled_from(["delete", "any", "special", "duplicate", "add_key"]))
        if op == "delete":
            del parent[key]
        elif op == "any":
            parent[key] = draw(JSON_ANY)
        elif op == "special":
            parent[key] = copy.deepcopy(draw(SPECIAL))  # [] and {} are shared objects
        elif op == "duplicate":
            value = parent[key]
            if isinstance(value, list) and value:
                value.append(copy.deepcopy(value[draw(st.integers(0, len(value) - 1))]))
            elif isinstance(parent, list):
                parent.append(copy.deepcopy(value))
        else:
            target = parent[key] if isinstance(parent[key], dict) else doc
            target[draw(KEYS)] = copy.deepcopy(draw(st.one_of(SPECIAL, JSON_ANY, st.just([1, 1]))))
    text = json.dumps(doc)
    if draw(st.integers(0, 9)) == 0:
        text = text[: draw(st.integers(0, len(text) - 1))]
    opts = DataOptions(
        max_pool=draw(st.integers(1, 6)),
        keep_fallback=draw(st.booleans()),
        gen_methods=draw(st.sampled_from([None, frozenset({"beam"})])),
        require_positive=draw(st.booleans()),
    )
    return text, opts


def test_base_document_loads(tmp_path: Path) -> None:
    table, _ = load_rl_data(
        write_json(tmp_path / "rl.json", BASE), DataOptions(), builtin_registry()
    )
    assert table.query_ids.tolist() == [1, 2]
    assert table.group_len.tolist() == [1, 3]


@settings(max_examples=60, deadline=None)
@given(case=mutated_documents())
def test_mutated_rl_json_loads_or_raises_lever_error(
    tmp_path_factory: pytest.TempPathFactory, case: tuple[str, DataOptions]
) -> None:
    text, opts = case
    path = tmp_path_factory.mktemp("fuzz") / "rl.json"
    path.write_text(text)
    try:
        table, report = load_rl_data(path, opts, builtin_registry())
    except LeverError as exc:
        message = str(exc)
        assert str(path) in message or message.startswith("--")
        assert "\n" not in message
        return
    # whatever loads is internally consistent
    mask = table.cand_mask()
    assert len(table) >= 1
    assert bool((table.group_len >= 1).all())
    assert bool((table.pool_len <= opts.max_pool).all())
    pool_len = table.pool_len[:, None, None].expand_as(table.sequences)
    assert bool((table.sequences < pool_len)[mask].all())  # every pointer inside its pool
    assert bool(torch.isfinite(table.rewards_raw).all())
    assert bool((table.rewards_raw.abs() <= 5).all())
    assert bool(torch.isfinite(table.rewards_norm).all())
    assert report.candidates_total == int(mask.sum())


# ----------------------------------------------------------------- issue 4: malformed RL data
def query_id_not_an_integer(data: dict[str, Any]) -> list[str]:
    data["12a"] = data.pop("2")
    return ["'12a'", "not an integer"]


def pointer_candidates_not_a_list(data: dict[str, Any]) -> list[str]:
    data["3"]["pointer_candidates"] = {"0": data["3"]["pointer_candidates"][0]}
    return ["query 3", "'pointer_candidates'", "must be a list"]


def pointer_holds_a_string(data: dict[str, Any]) -> list[str]:
    data["1"]["pointer_candidates"][2]["pointer"] = [14, "15"]
    return ["query 1", "candidate 2", "'pointer'", "'15'", "integer"]


def pointer_holds_a_negative_number(data: dict[str, Any]) -> list[str]:
    data["1"]["pointer_candidates"][2]["pointer"] = [-3, 14]
    return ["query 1", "candidate 2", "'pointer'", "negative", "-3"]


def pointer_holds_a_float(data: dict[str, Any]) -> list[str]:
    data["1"]["pointer_candidates"][1]["pointer"] = [13, 11.0]
    return ["query 1", "candidate 1", "'pointer'", "11.0", "integer"]


def pointer_pos_holds_a_fraction(data: dict[str, Any]) -> list[str]:
    del data["5"]["pointer_candidates"][0]["pointer"]
    data["5"]["pointer_candidates"][0]["pointer_pos"] = [15, 16.5]
    return ["query 5", "candidate 0", "'pointer_pos'", "16.5"]


def sequence_repeats_a_global_id(data: dict[str, Any]) -> list[str]:
    data["4"]["pointer_candidates"][1]["pointer"] = [16, 16]
    return ["query 4", "candidate 1", "repeats"]


def sequence_repeats_a_pool_position(data: dict[str, Any]) -> list[str]:
    data["2"] = {
        "candidate_pool_ids": [10, 11, 12],
        "pointer_candidates": [
            {"pointer": [0, 1], "pointer_global": [10, 11], "vqa_correct": 1},
            {"pointer": [2, 2], "pointer_global": [12, 12], "vqa_correct": 0},
        ],
    }
    return ["query 2", "candidate 1", "repeats"]


def candidate_pool_ids_with_duplicates(data: dict[str, Any]) -> list[str]:
    data["2"] = {
        "candidate_pool_ids": [10, 11, 12, 11],
        "pointer_candidates": [{"pointer": [0, 1], "pointer_global": [10, 11]}],
    }
    return ["query 2", "'candidate_pool_ids'", "duplicate"]


def vqa_correct_two(data: dict[str, Any]) -> list[str]:
    data["5"]["pointer_candidates"][1]["vqa_correct"] = 2
    return ["query 5", "candidate 1", "'vqa_correct'", "2", "expected 0 or 1"]


def vqa_correct_fraction(data: dict[str, Any]) -> list[str]:
    data["0"]["pointer_candidates"][2]["vqa_correct"] = 0.5
    return ["query 0", "candidate 2", "'vqa_correct'", "0.5", "expected 0 or 1"]


def vqa_correct_minus_one(data: dict[str, Any]) -> list[str]:
    data["0"]["pointer_candidates"][2]["vqa_correct"] = -1
    return ["query 0", "candidate 2", "'vqa_correct'", "-1", "expected 0 or 1"]


def vqa_correct_string(data: dict[str, Any]) -> list[str]:
    data["3"]["pointer_candidates"][0]["vqa_correct"] = "1"
    return ["query 3", "candidate 0", "'vqa_correct'", "'1'", "number"]


def vqa_correct_bool(data: dict[str, Any]) -> list[str]:
    data["3"]["pointer_candidates"][0]["vqa_correct"] = True
    return ["query 3", "candidate 0", "'vqa_correct'", "True"]


def vqa_acc_score_nan(data: dict[str, Any]) -> list[str]:
    data["0"]["pointer_candidates"][1]["vqa_acc_score"] = float("nan")  # JSON NaN
    return ["query 0", "candidate 1", "'vqa_acc_score'", "nan", "finite"]


def vqa_gt_prob_infinite(data: dict[str, Any]) -> list[str]:
    data["4"]["pointer_candidates"][0]["vqa_gt_prob"] = float("-inf")  # JSON -Infinity
    return ["query 4", "candidate 0", "'vqa_gt_prob'", "-inf", "finite"]


@pytest.mark.parametrize(
    "mutate",
    [
        query_id_not_an_integer,
        pointer_candidates_not_a_list,
        pointer_holds_a_string,
        pointer_holds_a_negative_number,
        pointer_holds_a_float,
        pointer_pos_holds_a_fraction,
        sequence_repeats_a_global_id,
        sequence_repeats_a_pool_position,
        candidate_pool_ids_with_duplicates,
        vqa_correct_two,
        vqa_correct_fraction,
        vqa_correct_minus_one,
        vqa_correct_string,
        vqa_correct_bool,
        vqa_acc_score_nan,
        vqa_gt_prob_infinite,
    ],
)
def test_malformed_rl_data(
    cli: Cli,
    files: tuple[Path, Path],
    tmp_path: Path,
    mutate: Callable[[dict[str, Any]], list[str]],
) -> None:
    data = tiny_data()
    fragments = mutate(data)
    bad = write_json(tmp_path / "malformed.json", data)
    out = tmp_path / "out"
    assert_refused(train(cli, bad, files[1], out), out, "malformed.json", *fragments)


@pytest.mark.parametrize("text", ["", "  \n"], ids=["empty", "whitespace"])
def test_empty_data_file(cli: Cli, files: tuple[Path, Path], tmp_path: Path, text: str) -> None:
    bad = tmp_path / "empty.json"
    bad.write_text(text)
    out = tmp_path / "out"
    assert_refused(train(cli, bad, files[1], out), out, "empty.json", "file is empty")
    result = cli("prepare", "--beam-data", bad)
    assert_user_error(result, "empty.json", "file is empty")


# ----------------------------------------------------------------- issue 4: embeddings
@pytest.mark.parametrize(
    ("name", "table", "dtype"),
    [
        ("int32.npy", torch.arange(N * D, dtype=torch.int32).reshape(N, D), "int32"),
        ("int16.safetensors", torch.ones(N, D, dtype=torch.int16), "int16"),
        ("bool.pt", torch.ones(N, D, dtype=torch.bool), "bool"),
    ],
)
def test_non_float_embedding_is_refused(
    cli: Cli, files: tuple[Path, Path], tmp_path: Path, name: str, table: torch.Tensor, dtype: str
) -> None:
    emb = write_emb(tmp_path / name, table)
    out = tmp_path / "out"
    assert_refused(train(cli, files[0], emb, out), out, name, "floating point", dtype)


@pytest.mark.parametrize("name", ["half.pt", "half.safetensors", "half.npy"])
def test_float16_embedding_is_accepted(
    cli: Cli, files: tuple[Path, Path], tmp_path: Path, name: str
) -> None:
    emb = write_emb(tmp_path / name, tiny_emb().half())
    out = tmp_path / "out"
    result = train(cli, files[0], emb, out, "--hidden-dim", "16")
    assert result.exit_code == 0, result.output
    assert f"d = {D}" in result.output
    assert (out / "rce_epoch01.safetensors").is_file()


def test_pt_dict_of_several_tensors_needs_emb_key(
    cli: Cli, files: tuple[Path, Path], tmp_path: Path
) -> None:
    emb = tmp_path / "multi.pt"
    torch.save({"image": tiny_emb(), "text": tiny_emb() * 2}, emb)
    out = tmp_path / "out"
    assert_refused(
        train(cli, files[0], emb, out), out, "multi.pt", "2 tensors", "image", "text", "--emb-key"
    )
    result = train(cli, files[0], emb, out, "--emb-key", "audio")
    assert_refused(result, out, "multi.pt", "'audio'", "image, text")
    result = train(cli, files[0], emb, out, "--emb-key", "text", "--hidden-dim", "16")
    assert result.exit_code == 0, result.output


# ----------------------------------------------------------------- issue 4: reward flags
@pytest.mark.parametrize(
    ("flag", "name"),
    [
        ("--reward-mode", "--reward-mode"),
        ("--reward_mode", "--reward-mode"),
        ("--normalize", "--normalize"),
    ],
)
def test_name_that_no_plugin_provides(
    cli: Cli, files: tuple[Path, Path], tmp_path: Path, flag: str, name: str
) -> None:
    out = tmp_path / "out"
    result = train(cli, *files, out, flag, "nope")
    assert_refused(result, out, name, "'nope'", "no active plugin", "available:")

"""Data formats and filters (docs/algorithm.md#data-format): the legacy beam format (built-in
``legacy-beam-format`` plugin), a reader of a new format added by a plugin through the
``read_rl_data`` hook, the embedding files, and the candidate/query filters with
their load summary, through the library and the real CLI.

Every expected value is worked out by hand in the comment beside it.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import Result
from conftest import assert_user_error, builtin_registry, candidate, write_emb, write_json
from safetensors.torch import load_file, save_file

import lever_trainer.plan as plan_module
import lever_trainer.run as run_module
from lever_trainer import hookimpl
from lever_trainer.data import (
    DataOptions,
    LoadReport,
    QueryTable,
    cache_path_for,
    load_rl_data,
    split_train_val,
)
from lever_trainer.errors import LeverError
from lever_trainer.plugins import PluginSet, load_plugins
from lever_trainer.rewards import registry_from_plugins

Cli = Callable[..., Result]


def real(table: QueryTable, qid: int) -> dict[str, Any]:
    """The real (unpadded) pool, sequences, rewards and candidate indices of query ``qid``."""
    r = int((table.query_ids == qid).nonzero()[0, 0])
    k, g = int(table.pool_len[r]), int(table.group_len[r])
    return {
        "pool": table.pool_ids[r, :k].tolist(),
        "seqs": table.sequences[r, :g].tolist(),
        "raw": table.rewards_raw[r, :g].tolist(),
        "norm": table.rewards_norm[r, :g].tolist(),
        "correct": table.correct[r, :g].tolist(),
        "index": table.cand_index[r, :g].tolist(),
    }


def load_with(plugins: PluginSet, path: Path, opts: DataOptions) -> tuple[QueryTable, LoadReport]:
    """What ``lever-train`` does: the plugins' modes, normalisers and reader."""

    def reader(p: Path) -> Iterable[tuple[str, Any]]:
        decision = plugins.call_single("read_rl_data", path=p)
        assert decision is not None, "no plugin reads the file"
        members: Iterable[tuple[str, Any]] = decision.value
        return members

    return load_rl_data(path, opts, registry=registry_from_plugins(plugins), reader=reader)


def train_args(data: Path, emb: Path, out: Path, *extra: Any) -> list[Any]:
    return [
        "--beam-data", data, "--img-emb", emb, "--output-dir", out,
        "--rce-epochs", "1", "--hidden-dim", "16", "--batch-size", "4", *extra,
    ]  # fmt: skip


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result.output


# ----------------------------------------------------------------- the legacy beam format
LEGACY: dict[str, Any] = {
    "_meta": {"source": "beam search"},
    # each beam: demonstrations, then the query id; the score is the raw reward
    "3": {"id_list": [[7, 5, 3], [9, 7, 3], [5, 9, 3]], "score_list": [0.5, 9.0, -1.25]},
    "1": {"id_list": [[4, 2, 1], [2, 6, 1]], "score_list": [1.0, 1.0]},
}


def check_legacy_table(table: QueryTable, report: LoadReport) -> None:
    assert table.query_ids.tolist() == [1, 3]
    # query 1: pool = sorted ids used {2, 4, 6}; [4, 2] -> [1, 0]; [2, 6] -> [0, 2]
    q1 = real(table, 1)
    assert q1["pool"] == [2, 4, 6]
    assert q1["seqs"] == [[1, 0], [0, 2]]
    assert q1["raw"] == [1.0, 1.0]
    assert q1["norm"] == [1.0, 1.0]  # std 0: normalised = raw
    assert q1["correct"] == [0.0, 0.0]
    # query 3: pool {5, 7, 9}; [7, 5] -> [1, 0]; [9, 7] -> [2, 1]; [5, 9] -> [0, 2]
    q3 = real(table, 3)
    assert q3["pool"] == [5, 7, 9]
    assert q3["seqs"] == [[1, 0], [2, 1], [0, 2]]
    assert q3["raw"] == [0.5, 5.0, -1.25]  # 9.0 clipped to 5
    assert q3["index"] == [0, 1, 2]
    # mean 17/12, deviations [-11, 43, -32]/12, unbiased var 2994/144/2 = 1497/144,
    # z = [-11, 43, -32]/sqrt(1497), inside the clamp of 3
    z = [v / math.sqrt(1497) for v in (-11, 43, -32)]
    assert q3["norm"] == pytest.approx(z, abs=1e-6)
    assert (report.queries_total, report.candidates_total) == (2, 5)
    assert report.equal_reward_groups == 1  # query 1
    assert not report.dropped and not report.queries_dropped


def test_legacy_format_through_the_library(tmp_path: Path) -> None:
    path = write_json(tmp_path / "legacy.json", LEGACY)
    plugins = load_plugins()
    decision = plugins.call_single("read_rl_data", path=path)
    assert decision is not None and decision.plugin == "legacy-beam-format"
    assert decision.label == "default"
    check_legacy_table(*load_with(plugins, path, DataOptions()))
    # the reward mode does not apply: the score is the raw reward
    table, _ = load_with(plugins, path, DataOptions(reward_mode="hard_only"))
    assert real(table, 3)["raw"] == [0.5, 5.0, -1.25]
    # without the plugin's reader the file is not RL data
    with pytest.raises(LeverError, match=r"query 3: field 'pointer_candidates' must be a list"):
        load_rl_data(path, DataOptions(), builtin_registry())


def test_rl_data_is_not_taken_for_legacy(tmp_path: Path) -> None:
    data = {"_meta": {"id_list": [1]}, "1": {"pointer_candidates": [candidate([2, 3], 1, 1.0)]}}
    path = write_json(tmp_path / "rl.json", data)
    assert load_plugins().call_single("read_rl_data", path=path) is None
    for text in ("[1, 2]", "", "{"):  # broken files are left to the RL data reader
        (tmp_path / "bad.json").write_text(text)
        assert load_plugins().call_single("read_rl_data", path=tmp_path / "bad.json") is None


def test_legacy_format_through_the_cli(cli: Cli, tmp_path: Path) -> None:
    path = write_json(tmp_path / "legacy.json", LEGACY)
    emb = write_emb(tmp_path / "emb.pt", torch.randn(10, 4))  # ids reach 9
    out = ok(cli("prepare", "--beam-data", path))
    assert f"reading {path} with plugin legacy-beam-format" in out
    assert f"loaded {path}: 2 queries, 5 candidates" in out
    assert "1 queries have all-equal rewards" in out
    t = load_file(str(cache_path_for(path)))
    assert t["query_ids"].tolist() == [1, 3]
    assert t["rewards_raw"].tolist() == [[1.0, 1.0, 0.0], [0.5, 5.0, -1.25]]  # padded

    out = ok(cli(*train_args(path, emb, tmp_path / "run")))
    assert "split: 1 train / 1 validation queries (drawn with seed 42), S = 2, d = 4" in out
    assert "done: 1 epochs" in out
    assert (tmp_path / "run" / "rce_epoch01.safetensors").is_file()


def test_legacy_format_off_makes_the_file_an_error(cli: Cli, tmp_path: Path) -> None:
    path = write_json(tmp_path / "legacy.json", LEGACY)
    result = cli("prepare", "--beam-data", path, "--no-plugin", "legacy-beam-format")
    assert_user_error(result, "legacy.json", "query 3", "pointer_candidates")
    emb = write_emb(tmp_path / "emb.pt", torch.randn(10, 4))
    args = train_args(path, emb, tmp_path / "run", "--no-plugin", "legacy-beam-format")
    assert_user_error(cli(*args), "legacy.json", "query 3", "pointer_candidates")


def test_legacy_format_off_is_an_error_even_with_a_prepared_cache(cli: Cli, tmp_path: Path) -> None:
    path = write_json(tmp_path / "legacy.json", LEGACY)
    ok(cli("prepare", "--beam-data", path))
    result = cli("prepare", "--beam-data", path, "--no-plugin", "legacy-beam-format")
    assert_user_error(result, "legacy.json", "query 3")


def legacy_with(**change: Any) -> dict[str, Any]:
    data = json.loads(json.dumps(LEGACY))
    data["3"].update(change)
    return data


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        # beam 1 ends with 4, not with its query id 3
        (
            legacy_with(id_list=[[7, 5, 3], [9, 7, 4], [5, 9, 3]]),
            ["query 3 candidate 1", "query id 3", "4"],
        ),
        (legacy_with(score_list=[0.5, 9.0]), ["query 3", "'id_list' has 3", "'score_list' has 2"]),
        (
            legacy_with(score_list=[0.5, "high", 1.0]),
            ["query 3 candidate 1", "'score_list'", "'high'"],
        ),
        (legacy_with(score_list=[0.5, 1.0, True]), ["query 3 candidate 2", "'score_list'"]),
        (legacy_with(id_list=[[7, 5, 3], [3], [5, 9, 3]]), ["query 3 candidate 1", "query id"]),
        (legacy_with(id_list=[[7, 5, 3], [9, 7.5, 3], [5, 9, 3]]), ["query 3 candidate 1", "7.5"]),
        (
            legacy_with(id_list=[[7, 5, 3], [9, 9, 3], [5, 9, 3]]),
            ["query 3 candidate 1", "repeats"],
        ),
        (legacy_with(id_list={"a": 1}), ["query 3", "'id_list'"]),
        ({**LEGACY, "²": LEGACY["1"]}, ["'²'", "not an integer"]),
        ({**LEGACY, "8": {"pointer_candidates": []}}, ["query 8", "id_list"]),
    ],
    ids=[
        "beam-not-ending-with-query",
        "length-mismatch",
        "score-string",
        "score-bool",
        "beam-without-demos",
        "float-id",
        "repeated-id",
        "id-list-not-a-list",
        "unicode-digit-key",
        "rl-query-in-legacy-file",
    ],
)
def test_bad_legacy_files(
    cli: Cli, tmp_path: Path, data: dict[str, Any], fragments: list[str]
) -> None:
    path = write_json(tmp_path / "legacy.json", data)
    assert_user_error(cli("prepare", "--beam-data", path), "legacy.json", *fragments)
    assert not cache_path_for(path).exists()


def test_legacy_score_nan_is_refused(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "legacy.json"
    path.write_text('{"3": {"id_list": [[7, 5, 3], [9, 7, 3]], "score_list": [0.5, NaN]}}')
    result = cli("prepare", "--beam-data", path)
    assert_user_error(result, "legacy.json", "query 3 candidate 1", "'score_list'", "nan")


# ----------------------------------------------------------------- a new format via a plugin
CSV_ROWS = [
    # qid, demonstrations, vqa_correct, vqa_acc_score, gen_method
    ("5", "1 2", "1", "1.0", "beam"),
    ("5", "2 3", "0", "0.3", "sample"),
    ("2", "3 1", "0", "0.0", "beam"),
    ("2", "1 3", "0", "0.6", "beam"),
]


class CsvReader:
    """A made-up CSV format: one row per logged candidate, grouped by query id."""

    DESCRIPTION = "reads lever CSV files"

    @hookimpl
    def read_rl_data(self, path: Path) -> Iterable[tuple[str, Any]] | None:
        if path.suffix != ".csv":
            return None
        groups: dict[str, list[dict[str, Any]]] = {}
        with path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                groups.setdefault(row["qid"], []).append(
                    {
                        "pointer": [int(i) for i in row["demos"].split()],
                        "vqa_correct": int(row["correct"]),
                        "vqa_acc_score": float(row["acc"]),
                        "gen_method": row["method"],
                    }
                )
        return [(qid, {"pointer_candidates": cands}) for qid, cands in groups.items()]


def write_csv(path: Path) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["qid", "demos", "correct", "acc", "method"])
        writer.writerows(CSV_ROWS)
    return path


def check_csv_table(table: QueryTable) -> None:
    assert table.query_ids.tolist() == [2, 5]
    # query 2: pool [1, 3]; [3, 1] -> [1, 0], [1, 3] -> [0, 1]; hard_plus_soft [0, 0.6]
    q2 = real(table, 2)
    assert (q2["pool"], q2["seqs"]) == ([1, 3], [[1, 0], [0, 1]])
    assert q2["raw"] == pytest.approx([0.0, 0.6])
    # query 5: pool [1, 2, 3]; [1, 2] -> [0, 1], [2, 3] -> [1, 2]; [1 + 1, 0 + 0.3]
    q5 = real(table, 5)
    assert (q5["pool"], q5["seqs"]) == ([1, 2, 3], [[0, 1], [1, 2]])
    assert q5["raw"] == pytest.approx([2.0, 0.3])
    assert q5["correct"] == [1.0, 0.0]


def test_reader_plugin_reads_a_new_format(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "logged.csv")
    plugins = load_plugins(enable=["csv-reader"], extra=[("csv-reader", CsvReader())])
    decision = plugins.call_single("read_rl_data", path=path)
    assert decision is not None and decision.label == "plugin csv-reader"
    table, report = load_with(plugins, path, DataOptions())
    check_csv_table(table)
    assert report.candidates_total == 4
    # the filters apply to what the reader yields: query 5's sample is dropped
    table, report = load_with(plugins, path, DataOptions(gen_methods=frozenset({"beam"})))
    assert real(table, 5)["index"] == [0]
    assert report.dropped == {"gen_method not in --gen-methods": 1}
    # JSON files are still read as before: the CSV reader does not answer
    legacy = write_json(tmp_path / "legacy.json", LEGACY)
    check_legacy_table(*load_with(plugins, legacy, DataOptions()))


@pytest.fixture
def with_csv_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``csv-reader`` an installed (off by default) plugin for the in-process CLI."""
    real_load = run_module.load_plugins

    def load(enable: Any = (), disable: Any = (), warn: Any = None) -> PluginSet:
        return real_load(enable, disable, extra=[("csv-reader", CsvReader())], warn=warn)

    monkeypatch.setattr(run_module, "load_plugins", load)
    # the names train checks before importing any plugin
    real_names = plan_module.installed_names
    monkeypatch.setattr(plan_module, "installed_names", lambda: {*real_names(), "csv-reader"})


@pytest.mark.usefixtures("with_csv_plugin")
def test_reader_plugin_through_the_cli(cli: Cli, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "logged.csv")
    emb = write_emb(tmp_path / "emb.npy", torch.randn(6, 4))
    # not enabled: the file is read as RL data JSON, and it is not JSON
    assert_user_error(cli("prepare", "--beam-data", path), "logged.csv", "not valid JSON")
    out = ok(cli("prepare", "--beam-data", path, "--plugin", "csv-reader"))
    assert f"reading {path} with plugin csv-reader" in out
    assert f"loaded {path}: 2 queries, 4 candidates" in out
    out = ok(cli(*train_args(path, emb, tmp_path / "run", "--plugin", "csv-reader", "--no-cache")))
    assert "split: 1 train / 1 validation queries" in out
    assert (tmp_path / "run" / "rce_epoch01.safetensors").is_file()
    assert f"reading {path} with plugin csv-reader" in out


# ----------------------------------------------------------------- filters and summary
FILTER_DATA: dict[str, Any] = {
    "1": {
        "pointer_candidates": [
            candidate([1, 2], 1, 1.0, gen_method="beam", vqa_eval_mode="official"),
            candidate([2, 3], 0, 0.3, gen_method="sample"),
            candidate([3, 4], 0, 0.0, gen_method="beam", vqa_eval_mode="fallback"),
        ]
    },
    "2": {
        "pointer_candidates": [
            candidate([5, 6], 0, 0.5, gen_method="sample"),
            candidate([6, 7], 0, 0.2, gen_method="beam"),
        ]
    },
    "3": {
        "pointer_candidates": [
            candidate([8, 9], 1, 1.0, gen_method="beam", eval_failed=True),
            candidate([9, 10], 0, 0.6, gen_method="beam"),
        ]
    },
    "4": {  # all-equal rewards
        "pointer_candidates": [
            candidate([11, 12], 0, 0.5, gen_method="sample"),
            candidate([12, 13], 0, 0.5, gen_method="sample"),
        ]
    },
}


@pytest.mark.parametrize(
    ("args", "opts", "kept", "dropped", "queries_dropped"),
    [
        # default: fallback (1.2) and eval_failed (3.0) dropped
        ([], DataOptions(), {1: [0, 1], 2: [0, 1], 3: [1], 4: [0, 1]},
         {"eval_failed": 1, "vqa_eval_mode=fallback": 1}, {}),
        # upstream spelling: the fallback row stays
        (["--no_skip_fallback_reward"], DataOptions(keep_fallback=True),
         {1: [0, 1, 2], 2: [0, 1], 3: [1], 4: [0, 1]}, {"eval_failed": 1}, {}),
        (["--keep-fallback"], DataOptions(keep_fallback=True),
         {1: [0, 1, 2], 2: [0, 1], 3: [1], 4: [0, 1]}, {"eval_failed": 1}, {}),
        # beam only: the samples 1.1, 2.0, 4.0, 4.1 go, and query 4 with them
        (["--gen-methods", "beam"], DataOptions(gen_methods=frozenset({"beam"})),
         {1: [0], 2: [1], 3: [1]},
         {"eval_failed": 1, "vqa_eval_mode=fallback": 1, "gen_method not in --gen-methods": 4},
         {"no candidate left after filters": 1}),
        (["--gen_methods", "beam, sample"], DataOptions(gen_methods=frozenset({"beam", "sample"})),
         {1: [0, 1], 2: [0, 1], 3: [1], 4: [0, 1]},
         {"eval_failed": 1, "vqa_eval_mode=fallback": 1}, {}),
        # a correct candidate among the kept ones: only query 1 (3.0 is correct but failed)
        (["--require-positive-query"], DataOptions(require_positive=True), {1: [0, 1]},
         {"eval_failed": 1, "vqa_eval_mode=fallback": 1},
         {"no correct candidate (--require-positive-query)": 3}),
    ],
    ids=["default", "no_skip_fallback_reward", "keep-fallback", "beam", "beam-sample", "positive"],
)  # fmt: skip
def test_filters(
    cli: Cli,
    tmp_path: Path,
    args: list[str],
    opts: DataOptions,
    kept: dict[int, list[int]],
    dropped: dict[str, int],
    queries_dropped: dict[str, int],
) -> None:
    path = write_json(tmp_path / "rl.json", FILTER_DATA)
    table, report = load_rl_data(path, opts, builtin_registry())
    assert {q: real(table, q)["index"] for q in table.query_ids.tolist()} == kept
    assert dict(report.dropped) == dropped
    assert dict(report.queries_dropped) == queries_dropped
    assert report.candidates_total == sum(map(len, kept.values()))

    out = ok(cli("prepare", "--beam-data", path, *args))
    assert f"{len(kept)} queries, {report.candidates_total} candidates" in out
    for reason, n in dropped.items():
        assert f"dropped {n} candidates: {reason}" in out
    for reason, n in queries_dropped.items():
        assert f"dropped {n} queries: {reason}" in out
    assert out.count("dropped") == len(dropped) + len(queries_dropped)
    # groups of one (3, or 1-3 with beam only) and query 4's two 0.5s
    equal = sum(len(ix) == 1 for ix in kept.values()) + (4 in kept)
    assert report.equal_reward_groups == equal
    if equal:
        assert f"{equal} queries have all-equal rewards (they teach RCE nothing)" in out
    else:
        assert "all-equal" not in out


def test_bad_gen_methods_flag(cli: Cli, tmp_path: Path) -> None:
    path = write_json(tmp_path / "rl.json", FILTER_DATA)
    assert_user_error(cli("prepare", "--beam-data", path, "--gen-methods", " , "), "--gen-methods")
    result = cli("prepare", "--beam-data", path, "--gen-methods", "greedy")
    assert_user_error(result, "rl.json", "no query has a candidate left")


def test_pools_are_whole_by_default_and_max_pool_cuts(cli: Cli, tmp_path: Path) -> None:
    pool = list(range(100, 170))  # 70 ids
    data = {
        "0": {
            "candidate_pool_ids": pool,
            "pointer_candidates": [
                {"pointer": [0, 63], "pointer_global": [100, 163], "vqa_correct": 1},
                {"pointer": [5, 6], "pointer_global": [105, 106]},
            ],
        }
    }
    path = write_json(tmp_path / "rl.json", data)
    # the default follows the data: every pool whole
    table, report = load_rl_data(path, DataOptions(), builtin_registry())
    assert int(table.pool_len[0]) == 70 and report.pools_cut == 0
    assert real(table, 0)["pool"] == pool
    assert "pools cut" not in ok(cli("prepare", "--beam-data", path))
    # an explicit --max-pool cuts
    table, report = load_rl_data(path, DataOptions(max_pool=64), builtin_registry())
    assert int(table.pool_len[0]) == 64 and report.pools_cut == 1
    assert real(table, 0)["pool"] == pool[:64]
    assert "1 pools cut to --max-pool" in ok(
        cli("prepare", "--beam-data", path, "--max-pool", "64")
    )
    # position 64 (id 164) is outside the cut pool
    data["0"]["pointer_candidates"][1]["pointer"] = [5, 64]
    write_json(path, data)
    assert_user_error(
        cli("prepare", "--beam-data", path, "--max-pool", "64"),
        "rl.json",
        "query 0",
        "candidate 1",
        "--max-pool 64",
    )
    ok(cli("prepare", "--beam-data", path, "--max_pool", "70"))
    ok(cli("prepare", "--beam-data", path))


@pytest.mark.parametrize("flag", ["--val-ratio", "--val_ratio"])
def test_val_ratio_splits_half(cli: Cli, tmp_path: Path, flag: str) -> None:
    path = write_json(tmp_path / "rl.json", FILTER_DATA)
    table, _ = load_rl_data(path, DataOptions(), builtin_registry())
    train, val = split_train_val(table, 0.5)  # 4 queries: ids 1, 2 train; 3, 4 validation
    assert (train.query_ids.tolist(), val.query_ids.tolist()) == ([1, 2], [3, 4])
    emb = write_emb(tmp_path / "emb.safetensors", torch.randn(14, 4))
    out = ok(cli(*train_args(path, emb, tmp_path / "run", flag, "0.5")))
    assert "split: 2 train / 2 validation queries (drawn with seed 42), S = 2, d = 4" in out
    out = ok(cli(*train_args(path, emb, tmp_path / "run2")))  # default 0.2: floor(3.2) = 3
    assert "split: 3 train / 1 validation queries" in out


# ----------------------------------------------------------------- embedding files
EMB = torch.arange(14 * 4, dtype=torch.float32).reshape(14, 4) / 8  # exact in float16


def emb_pt_tensor(d: Path) -> tuple[Path, list[str]]:
    return write_emb(d / "emb.pt", EMB), []


def emb_pth_numpy(d: Path) -> tuple[Path, list[str]]:
    torch.save(EMB.numpy().astype(np.float64), d / "emb.pth")
    return d / "emb.pth", []


def emb_npy(d: Path) -> tuple[Path, list[str]]:
    return write_emb(d / "emb.npy", EMB), []


def emb_safetensors(d: Path) -> tuple[Path, list[str]]:
    return write_emb(d / "emb.safetensors", EMB), []


def emb_safetensors_key(d: Path) -> tuple[Path, list[str]]:
    save_file({"text": torch.zeros(3, 2), "image": EMB}, str(d / "multi.safetensors"))
    return d / "multi.safetensors", ["--emb-key", "image"]


def emb_pt_dict_key(d: Path) -> tuple[Path, list[str]]:
    torch.save({"image": EMB, "text": torch.zeros(3, 2), "note": "x"}, d / "multi.pt")
    return d / "multi.pt", ["--emb-key", "image"]


def emb_pt_dict_single(d: Path) -> tuple[Path, list[str]]:
    torch.save({"embeddings": EMB}, d / "one.pt")  # one tensor: no key needed
    return d / "one.pt", []


def emb_float16(d: Path) -> tuple[Path, list[str]]:
    return write_emb(d / "half.safetensors", EMB.half()), []


def emb_separate_cand(d: Path) -> tuple[Path, list[str]]:
    query = write_emb(d / "query.pt", torch.randn(5, 4))  # query ids reach 4
    cand = write_emb(d / "cand.npy", EMB)
    return query, ["--cand-emb", str(cand)]


@pytest.mark.parametrize(
    "make",
    [
        emb_pt_tensor,
        emb_pth_numpy,
        emb_npy,
        emb_safetensors,
        emb_safetensors_key,
        emb_pt_dict_key,
        emb_pt_dict_single,
        emb_float16,
        emb_separate_cand,
    ],
)
def test_embedding_files_through_the_cli(
    cli: Cli, tmp_path: Path, make: Callable[[Path], tuple[Path, list[str]]]
) -> None:
    path = write_json(tmp_path / "rl.json", FILTER_DATA)
    emb, extra = make(tmp_path)
    out = ok(cli(*train_args(path, emb, tmp_path / "run", *extra)))
    assert "d = 4" in out and "done: 1 epochs" in out

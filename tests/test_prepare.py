"""The prepared (cached) form of RL data, and the streaming JSON reader under it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import builtin_registry

import lever_trainer.jsonstream as jsonstream
from lever_trainer.data import TABLE_FIELDS, DataOptions, cache_path_for, load_rl_data
from lever_trainer.errors import LeverError


def assert_same_table(a, b) -> None:
    for name in TABLE_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name


def test_prepared_round_trip_equals_json_loading(demo_files) -> None:
    data = demo_files[0]
    plain, plain_report = load_rl_data(data, DataOptions(), builtin_registry())
    built, report = load_rl_data(data, DataOptions(), builtin_registry(), cache=True)
    assert report.cache == f"wrote {cache_path_for(data)}"
    cached, cached_report = load_rl_data(data, DataOptions(), builtin_registry(), cache=True)
    assert cached_report.cache == f"read {cache_path_for(data)}"
    assert_same_table(plain, built)
    assert_same_table(plain, cached)
    assert cached_report.lines()[:-1] == plain_report.lines()  # same summary, plus the cache line
    assert cached_report.source_sha256 == report.source_sha256 != ""


def test_stale_cache_is_rebuilt(demo_files) -> None:
    data = demo_files[0]
    load_rl_data(data, DataOptions(), builtin_registry(), cache=True)
    doc = json.loads(data.read_text())
    doc["0"]["pointer_candidates"][0]["vqa_acc_score"] = 0.123  # change one reward
    data.write_text(json.dumps(doc))
    table, report = load_rl_data(data, DataOptions(), builtin_registry(), cache=True)
    assert report.cache.startswith("wrote")
    fresh, _ = load_rl_data(data, DataOptions(), builtin_registry())
    assert_same_table(table, fresh)
    assert table.rewards_raw[0, 0].item() == pytest.approx(
        doc["0"]["pointer_candidates"][0]["vqa_correct"] + 0.123
    )


def test_cache_is_rebuilt_when_options_change(demo_files) -> None:
    data = demo_files[0]
    load_rl_data(data, DataOptions(), builtin_registry(), cache=True)
    _, report = load_rl_data(data, DataOptions(keep_fallback=True), builtin_registry(), cache=True)
    assert report.cache.startswith("wrote")
    assert "vqa_eval_mode=fallback" not in report.dropped
    # val_ratio only splits the table; it does not invalidate the cache
    _, report = load_rl_data(
        data, DataOptions(keep_fallback=True, val_ratio=0.5), builtin_registry(), cache=True
    )
    assert report.cache.startswith("read")


def test_corrupt_cache_is_rebuilt(demo_files) -> None:
    data = demo_files[0]
    cache_path_for(data).write_bytes(b"not a safetensors file")
    table, report = load_rl_data(data, DataOptions(), builtin_registry(), cache=True)
    assert report.cache.startswith("wrote")
    assert_same_table(table, load_rl_data(data, DataOptions(), builtin_registry())[0])


def test_prepare_command(cli, demo_files) -> None:
    result = cli("prepare", "--beam-data", demo_files[0])
    assert result.exit_code == 0, result.output
    assert f"prepared cache: wrote {cache_path_for(demo_files[0])}" in result.output
    result = cli("prepare", "--beam-data", demo_files[0].parent / "missing.json")
    assert result.exit_code == 2 and "missing.json: file not found" in result.output


def test_training_uses_the_cache_unless_told_not_to(cli, demo_files, tmp_path) -> None:
    args = [
        "--beam-data",
        demo_files[0],
        "--img-emb",
        demo_files[1],
        "--rce-epochs",
        "0",
        "--hidden-dim",
        "16",
    ]
    first = cli(*args, "--output-dir", tmp_path / "a")
    second = cli(*args, "--output-dir", tmp_path / "b")
    third = cli(*args, "--output-dir", tmp_path / "c", "--no-cache")
    assert "prepared cache: wrote" in first.output
    assert "prepared cache: read" in second.output
    assert "prepared cache" not in third.output
    fingerprints = {
        json.loads((tmp_path / d / "run_config.json").read_text())["data_fingerprint"]
        for d in "abc"
    }
    assert len(fingerprints) == 1  # the same data fingerprint however the data was read


# -- the streaming reader -------------------------------------------------------------------
def random_value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 2 or r < 0.3:
        return rng.choice([1, -2.5e-3, 123456789, True, False, None, 'a"b\\\n', 0.1, "ü漢", 1e300])
    if r < 0.6:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {str(rng.randint(0, 99)): random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


@pytest.mark.parametrize("chunk", [1, 2, 5, 64])
def test_stream_reader_equals_json_load(tmp_path: Path, monkeypatch, chunk: int) -> None:
    """Members come out exactly as json.load gives them, whatever the read size."""
    monkeypatch.setattr(jsonstream, "_CHUNK", chunk)
    rng = random.Random(chunk)
    path = tmp_path / "x.json"
    for _ in range(60):
        doc = {str(i): random_value(rng) for i in range(rng.randint(0, 5))}
        path.write_text(
            json.dumps(doc, indent=rng.choice([None, 1]), ensure_ascii=rng.random() < 0.5),
            encoding="utf-8",
        )
        assert dict(jsonstream.iter_object_members(path)) == doc


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "file is empty"),
        ("[1, 2]", "top level must be an object of query id -> query, found a list"),
        ("3", "found int"),
        ('{"a": 1,}', "expected a string key at line 1, column 9"),
        ('{"a" 1}', "expected ':' after a key at line 1, column 6"),
        ('{"a": 1} x', "extra data after the top-level object at line 1, column 10"),
        ('{"a": 1', "the object is not closed at line 1, column 8"),
        ('{"a":\n [1,\n 2,,]}', "Expecting value at line 3, column 4"),
        ('{"a": ' + "[" * 100000 + "]" * 100000 + "}", "nested too deeply"),
    ],
)
def test_stream_reader_errors_name_the_place(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(LeverError) as err:
        list(jsonstream.iter_object_members(path))
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


def test_unwritable_prepared_cache_is_a_warning(demo_files, tmp_path: Path) -> None:
    # --cache-dir naming a regular file: the prepared form cannot be written under it.
    # The data still loads (the same table as without a cache), one warning names the
    # target and, since the user chose the directory, gives no --cache-dir hint.
    data = demo_files[0]
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    warnings: list[str] = []
    plain, _ = load_rl_data(data, DataOptions(), builtin_registry())
    table, report = load_rl_data(
        data,
        DataOptions(),
        builtin_registry(),
        cache=True,
        warn=warnings.append,
        cache_dir=blocker,
    )
    assert_same_table(plain, table)
    assert report.cache == ""  # nothing written, nothing read
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"warning: cannot write the prepared cache {report.cache_path}")
    assert "--cache-dir" not in warnings[0]


def test_unwritable_default_cache_suggests_cache_dir(demo_files, tmp_path: Path) -> None:
    # The default place (beside the data file) blocked the same way: a file where the
    # data's directory should be is impossible through load_rl_data, so the helper that
    # writes the prepared form is called with a target under a regular file.
    from lever_trainer.data.load import _write_prepared

    table, report = load_rl_data(demo_files[0], DataOptions(), builtin_registry())
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    warnings: list[str] = []
    target = blocker / "rl.prepared"
    _write_prepared(table, report, DataOptions(), target, "", False, warnings.append)
    assert report.cache == ""
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"warning: cannot write the prepared cache {target} (")
    assert warnings[0].endswith("; --cache-dir DIR puts it elsewhere")

"""Run assembly: what the seed changes (the validation split among it), and pools that
follow the data behind a memory guard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error
from safetensors.torch import load_file

from lever_trainer.data import budget
from lever_trainer.demo import DemoSpec, write_demo
from lever_trainer.errors import LeverError


def run(cli, files, out: Path, *extra: str) -> str:
    result = cli(
        "--beam-data", files[0], "--img-emb", files[1], "--output-dir", out,
        "--rce-epochs", "2", "--batch-size", "8", "--no-cache", *extra,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return result.output


def split_line(output: str) -> str:
    return next(ln for ln in output.splitlines() if ln.startswith("split: "))


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "rce_epoch02.safetensors"))


def metrics(out: Path) -> list[dict]:
    """metrics.jsonl without the wall times."""
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in rows]


def val_ids(out: Path) -> list[int]:
    """The validation query ids a run used: the queries its start validation covered are
    not recorded, so read them back from the split the options give."""
    from lever_trainer.data import DataOptions, load_rl_data, split_train_val
    from lever_trainer.plugins import load_plugins
    from lever_trainer.rewards import registry_from_plugins
    from lever_trainer.run import split_seed

    config = json.loads((out / "run_config.json").read_text())["options"]
    table, _ = load_rl_data(
        config["beam_data"], DataOptions(), registry_from_plugins(load_plugins())
    )
    _, val = split_train_val(table, config["val_ratio"], split_seed(config))
    return val.query_ids.tolist()


def test_seeds_change_the_run_and_the_same_seed_repeats_it(cli, demo_files, tmp_path) -> None:
    a = run(cli, demo_files, tmp_path / "a", "--seed", "1")
    a2 = run(cli, demo_files, tmp_path / "a2", "--seed", "1")
    b = run(cli, demo_files, tmp_path / "b", "--seed", "2")
    # the same seed: bit-identical weights and metrics, the same split
    wa, wa2, wb = (weights(tmp_path / n) for n in ("a", "a2", "b"))
    assert all(torch.equal(wa[k], wa2[k]) for k in wa)
    assert metrics(tmp_path / "a") == metrics(tmp_path / "a2")
    assert (
        split_line(a)
        == split_line(a2)
        == ("split: 32 train / 8 validation queries (drawn with seed 1), S = 2, d = 16")
    )
    # another seed: another validation split, other weights, other metrics
    assert "(drawn with seed 2)" in split_line(b)
    assert val_ids(tmp_path / "a") != val_ids(tmp_path / "b")
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
    assert metrics(tmp_path / "a")[0] != metrics(tmp_path / "b")[0]  # validated on other queries


def test_split_seed_and_last_keep_the_split_across_seeds(cli, demo_files, tmp_path) -> None:
    run(cli, demo_files, tmp_path / "a", "--seed", "1", "--split-seed", "7")
    run(cli, demo_files, tmp_path / "b", "--seed", "2", "--split-seed", "7")
    assert val_ids(tmp_path / "a") == val_ids(tmp_path / "b")
    out = run(cli, demo_files, tmp_path / "c", "--seed", "1", "--val-split", "last")
    run(cli, demo_files, tmp_path / "d", "--seed", "2", "--val-split", "last")
    assert "(highest query ids)" in split_line(out)
    ids = val_ids(tmp_path / "c")
    assert ids == val_ids(tmp_path / "d") == list(range(32, 40))  # demo ids 0..39
    # both are fixed on --resume: the split is part of the run's data
    result = cli("--resume", tmp_path / "c", "--val-split", "random")
    assert_user_error(result, "--resume: cannot change --val-split random")


def test_the_upstream_preset_keeps_the_highest_ids(cli, demo_files, tmp_path) -> None:
    out = run(
        cli, demo_files, tmp_path / "u", "--preset", "upstream", "--hidden-dim", "16",
        "--rce-epochs", "1",
    )  # fmt: skip
    assert "(highest query ids)" in split_line(out)


# ------------------------------------------------------------------ --max-pool
@pytest.fixture
def pools_of_128(tmp_path: Path) -> tuple[Path, Path]:
    return write_demo(
        tmp_path / "wide", DemoSpec(queries=12, demos=300, pool=128, dim=8, beams=2, samples=2)
    )


def test_a_pool_of_128_runs_with_the_defaults(cli, pools_of_128, tmp_path) -> None:
    out = tmp_path / "run"
    output = run(cli, pools_of_128, out, "--rce-epochs", "1")
    assert "pools cut" not in output
    assert (out / "best.safetensors").is_file()
    sel = tmp_path / "sel.json"
    result = cli(
        "select", "--ckpt", out / "best.safetensors", "--queries", pools_of_128[0],
        "--img-emb", pools_of_128[1], "--output", sel,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    # an explicit cap cuts as before: a logged sequence then points outside the pool
    result = cli(
        "--beam-data", pools_of_128[0], "--img-emb", pools_of_128[1], "--output-dir",
        tmp_path / "cut", "--no-cache", "--max-pool", "64",
    )  # fmt: skip
    assert_user_error(result, "is outside the pool of 64 ids (--max-pool 64)")


def test_the_memory_guard_names_the_flags_and_its_estimate(
    cli, pools_of_128, tmp_path, monkeypatch
) -> None:
    # padding 12 pools of 128 ids: 12 * 128 * 9 bytes = 13,824 bytes
    assert budget.table_bytes(12, 128) == 13_824
    with pytest.raises(LeverError, match=r"x\.json: the largest pool holds 128 ids"):
        budget.check_table(12, 128, "x.json", budget=13_823)
    budget.check_table(12, 128, "x.json", budget=13_824)
    # a batch: 128 queries (the evaluation batch) * 128 ids * (8 + 2 * 2 + 1) floats * 4
    # bytes * 8 copies = 6,815,744 bytes
    assert budget.batch_bytes(128, 128, 8, 2, 2) == 6_815_744
    monkeypatch.setattr(budget, "memory_budget", lambda device="cpu": 6_815_743)
    result = cli(
        "--beam-data", pools_of_128[0], "--img-emb", pools_of_128[1], "--output-dir",
        tmp_path / "run", "--no-cache",
    )  # fmt: skip
    assert_user_error(result, "--max-pool / --batch-size", "128 queries", "128 ids", "GiB")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    monkeypatch.setattr(budget, "memory_budget", lambda device="cpu": 1000)
    result = cli("prepare", "--beam-data", pools_of_128[0])
    assert_user_error(result, "rl_data.json: the largest pool holds 128 ids", "--max-pool N")

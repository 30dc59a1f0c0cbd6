"""End to end through the real ``lever-train`` command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from lever_trainer import __version__
from lever_trainer.checkpoint import read_metadata


def train_args(files: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    return [
        "--beam-data",
        str(files[0]),
        "--img-emb",
        str(files[1]),
        "--output-dir",
        str(out),
        "--batch-size",
        "8",
        "--policy",
        "pointer",
        "--hidden-dim",
        "32",
        *extra,
    ]


def test_full_run_writes_checkpoints_metrics_and_log(cli, demo_files, tmp_path) -> None:
    out = tmp_path / "run"
    result = cli(
        *train_args(
            demo_files,
            out,
            "--rce-epochs",
            "2",
            "--grpo-epochs",
            "1",
            "--plugin",
            "freeze-backbone",
        )
    )
    assert result.exit_code == 0, result.output
    log = result.output
    assert "RCE reward: raw (beam_rewards_raw) [default]" in log
    assert "GRPO reward: normalized (beam_rewards) [default]" in log
    assert "freeze-backbone: frozen modules: input_proj, query_proj, cand_proj" in log
    assert "trainable params: 6,368 / 8,928 (71.3%)" in log
    for phase, epoch in (("rce", 1), ("rce", 2), ("grpo", 1)):
        line = next(ln for ln in log.splitlines() if ln.startswith(f"{phase} epoch {epoch}/"))
        for key in (
            "train_loss",
            "val_loss",
            "policy_reward@1",
            "random_reward",
            "normalized_gain",
        ):
            assert key in line
        assert (out / f"{phase}_epoch{epoch:02d}.safetensors").is_file()
    assert "kl_beta" in next(ln for ln in log.splitlines() if ln.startswith("grpo epoch 1/"))
    entries = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(e["phase"], e["epoch"]) for e in entries] == [
        ("start", 0),
        ("rce", 1),
        ("rce", 2),
        ("grpo", 1),
    ]
    config = json.loads((out / "run_config.json").read_text())
    assert config["options"]["grpo_epochs"] == 1 and "freeze-backbone" in config["plugins"]
    meta = read_metadata(out / "grpo_epoch01.safetensors")
    assert (
        meta["data_fingerprint"] == config["data_fingerprint"]
        and len(config["data_fingerprint"]) == 64
    )
    assert not list(out.glob(".*.tmp"))


def test_seed_script_spellings(cli, demo_files, tmp_path) -> None:
    args = [
        "--beam_data",
        str(demo_files[0]),
        "--img_emb",
        str(demo_files[1]),
        "--output_dir",
        str(tmp_path / "a"),
        "--grpo_epochs",
        "1",
        "--rce_epochs",
        "1",
        "--device",
        "cpu",
        "--rce_use_normalized_reward",
        "--freeze_backbone_in_grpo",
        "--policy",
        "pointer",
        "--hidden-dim",
        "32",
    ]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert "RCE reward: normalized (beam_rewards) [plugin normalized-reward]" in result.output
    assert "trainable params:" in result.output
    result = cli(
        *train_args(demo_files, tmp_path / "b", "--rce-epochs", "1", "--rce_use_raw_reward")
    )
    assert result.exit_code == 0, result.output
    assert "RCE reward: raw (beam_rewards_raw) [explicit]" in result.output


def test_train_subcommand_and_default_are_the_same(cli, demo_files, tmp_path) -> None:
    a = cli(*train_args(demo_files, tmp_path / "a", "--rce-epochs", "1"))
    b = cli("train", *train_args(demo_files, tmp_path / "b", "--rce-epochs", "1"))
    assert a.exit_code == b.exit_code == 0
    wa = load_file(str(tmp_path / "a" / "rce_epoch01.safetensors"))
    wb = load_file(str(tmp_path / "b" / "rce_epoch01.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_from_own_checkpoint_as_sft(cli, demo_files, tmp_path) -> None:
    first = tmp_path / "first"
    assert cli(*train_args(demo_files, first, "--rce-epochs", "1")).exit_code == 0
    result = cli(
        *train_args(
            demo_files,
            tmp_path / "second",
            "--rce-epochs",
            "0",
            "--sft-ckpt",
            str(first / "rce_epoch01.safetensors"),
        )
    )
    assert result.exit_code == 0, result.output
    assert "loaded starting checkpoint" in result.output
    start_line = next(ln for ln in result.output.splitlines() if ln.startswith("start:"))
    meta = read_metadata(first / "rce_epoch01.safetensors")
    assert f"val_loss {meta['metrics']['val_loss']:.4f}" in start_line


def test_plugins_command_lists_builtins(cli) -> None:
    result = cli("plugins")
    assert result.exit_code == 0
    assert f"freeze-backbone  [lever-trainer {__version__}]  off by default" in result.output
    assert f"raw-reward  [lever-trainer {__version__}]  on by default" in result.output
    assert "hooks: configure_trainable_params" in result.output


def test_demo_learns_above_random(tmp_path) -> None:
    """The README's demo, smaller: validation policy_reward@1 ends above random_reward."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lever_trainer",
            "demo-data",
            str(tmp_path / "d"),
            "--queries",
            "300",
        ],
        check=True,
        capture_output=True,
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "lever_trainer",
            "--beam-data",
            str(tmp_path / "d" / "rl_data.json"),
            "--img-emb",
            str(tmp_path / "d" / "embeddings.safetensors"),
            "--output-dir",
            str(tmp_path / "run"),
            "--rce-epochs",
            "12",
            "--rce-lr",
            "1e-3",
            "--batch-size",
            "16",
            "--policy",
            "pointer",
            "--hidden-dim",
            "64",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["policy_reward@1"] > last["random_reward"] + 0.1, run.stdout
    assert last["normalized_gain"] > 0.1


def test_select_command_picks_from_each_pool(cli, demo_files, tmp_path) -> None:
    run = tmp_path / "run"
    assert cli(*train_args(demo_files, run, "--rce-epochs", "1")).exit_code == 0
    out = tmp_path / "sel.json"
    result = cli(
        "select",
        "--ckpt",
        run / "rce_epoch01.safetensors",
        "--beam-data",
        demo_files[0],
        "--img-emb",
        demo_files[1],
        "--output",
        out,
    )
    assert result.exit_code == 0, result.output
    picks = json.loads(out.read_text())
    doc = json.loads(demo_files[0].read_text())
    queries = [k for k in doc if k.isdigit()]
    assert sorted(picks) == sorted(queries)
    for qid, ids in picks.items():
        assert len(ids) == 2 and len(set(ids)) == 2
        assert set(ids) <= set(doc[qid]["candidate_pool_ids"])

"""Policies are plugins: --policy, and checkpoints that rebuild the module they came from."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import assert_user_error

from lever_trainer.checkpoint import read_metadata, save_checkpoint
from lever_trainer.data import DataOptions, load_embeddings, load_rl_data
from lever_trainer.plugins import load_plugins
from lever_trainer.policies import policy_from_checkpoint
from lever_trainer.rewards import registry_from_plugins
from lever_trainer.select import select_demonstrations
from lever_trainer_plugins.pointer import PointerPolicy, PolicyConfig


def train(cli, files: tuple[Path, Path], out: Path, *extra: str):
    return cli(
        "--beam-data",
        files[0],
        "--img-emb",
        files[1],
        "--output-dir",
        out,
        "--no-cache",
        "--hidden-dim",
        "16",
        "--rce-epochs",
        "1",
        "--batch-size",
        "8",
        *extra,
    )


def test_policy_option_trains_and_select_rebuilds_it(cli, demo_files, tmp_path) -> None:
    out = tmp_path / "run"
    result = train(cli, demo_files, out, "--policy", "pointer-mmr", "--mmr-reduction", "mean")
    assert result.exit_code == 0, result.output
    assert "policy pointer-mmr" in result.output
    meta = read_metadata(out / "rce_epoch01.safetensors")
    assert meta["policy"]["name"] == "pointer-mmr"
    assert meta["policy"]["options"]["mmr_reduction"] == "mean"
    assert meta["policy"]["options"]["hidden_dim"] == 16
    picks = tmp_path / "picks.json"
    result = cli(
        "select",
        "--ckpt",
        out / "rce_epoch01.safetensors",
        "--beam-data",
        demo_files[0],
        "--img-emb",
        demo_files[1],
        "--output",
        picks,
        "--no-plugin",
        "legacy-beam-format",
    )
    assert result.exit_code == 0, result.output
    chosen = json.loads(picks.read_text())
    # the same picks from the module rebuilt in-process from the checkpoint's record
    plugins = load_plugins()
    model, _ = policy_from_checkpoint(plugins, out / "rce_epoch01.safetensors", 16)
    assert model.policy_name == "pointer-mmr"
    table, _ = load_rl_data(demo_files[0], DataOptions(), registry_from_plugins(plugins))
    emb = load_embeddings(demo_files[1])
    expected = select_demonstrations(model, table, emb, table.seq_len)
    assert chosen == {str(q): p for q, p in zip(table.query_ids.tolist(), expected, strict=True)}


def test_unknown_policy_lists_the_available_ones(cli, demo_files, tmp_path) -> None:
    out = tmp_path / "run"
    result = train(cli, demo_files, out, "--policy", "pointer-nope")
    assert_user_error(result, "--policy", "'pointer-nope'", "pointer-gru", "pointer-stop")
    assert not out.exists()


def test_variant_starts_from_a_pointer_checkpoint(cli, demo_files, tmp_path) -> None:
    torch.manual_seed(1)
    base = PointerPolicy(PolicyConfig(input_dim=16, hidden_dim=16))
    ckpt = tmp_path / "base.safetensors"
    save_checkpoint(ckpt, base.state_dict(), {"model": base.config.to_dict()})
    out = tmp_path / "run"
    result = train(
        cli, demo_files, out, "--policy", "pointer-gru", "--sft-ckpt", ckpt, "--rce-epochs", "0"
    )
    assert result.exit_code == 0, result.output
    # the gate of the base policy is ignored; the GRU and step embedding start fresh
    assert "ignored 2 keys the policy does not have" in result.output
    missing = next(ln for ln in result.output.splitlines() if "policy keys missing" in ln)
    for key in ("decoder_gru.weight_ih", "step_emb.weight"):
        assert key in missing


def test_num_heads_recorded_by_convert_checkpoint_is_honoured(cli, demo_files, tmp_path) -> None:
    torch.manual_seed(2)
    src = tmp_path / "old.pt"
    torch.save(
        {"model_state_dict": PointerPolicy(PolicyConfig(input_dim=16, hidden_dim=16)).state_dict()},
        src,
    )
    dst = tmp_path / "sft.safetensors"
    result = cli("convert-checkpoint", src, dst, "--num-heads", "4")
    assert result.exit_code == 0, result.output
    assert read_metadata(dst)["policy"]["options"]["num_heads"] == 4
    out = tmp_path / "run"
    result = train(cli, demo_files, out, "--sft-ckpt", dst)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "run_config.json").read_text())
    assert config["policy"]["options"]["num_heads"] == 4
    result = train(cli, demo_files, tmp_path / "run2", "--sft-ckpt", dst, "--num-heads", "2")
    assert_user_error(result, "--num-heads 2 disagrees with --sft-ckpt", "num heads 4")

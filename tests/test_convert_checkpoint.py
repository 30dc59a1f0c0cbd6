"""``lever-train convert-checkpoint``: foreign starting checkpoints into this project's format."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error

from lever_trainer import __version__
from lever_trainer.checkpoint import read_metadata, read_state_dict, save_checkpoint
from lever_trainer_plugins.pointer import PointerPolicy, PolicyConfig


class NotATensor:
    """A custom object that only a full (unsafe) pickle load can rebuild."""

    def __init__(self, value: int) -> None:
        self.value = value


def policy_state(seed: int = 1, **kw: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    config = PolicyConfig(**{"input_dim": 16, "hidden_dim": 32, **kw})
    return PointerPolicy(config).state_dict()


def old_name(key: str) -> str:
    return key.replace("cross_attn_layers.0.", "cross_attn.").replace("attn_norms.0.", "attn_norm.")


def write_foreign(path: Path, kind: str, sd: dict[str, torch.Tensor]) -> int:
    """Write ``sd`` as checkpoint format ``kind``; returns how many extra keys it carries."""
    if kind == "model_state_dict":
        torch.save({"model_state_dict": sd, "epoch": 3, "optimizer": {"lr": 0.1}}, path)
        return 0
    if kind == "lightning":
        foreign = {"lever_lm.pointer_selector." + old_name(k): v.clone() for k, v in sd.items()}
        foreign["lever_lm.encoder.weight"] = torch.ones(3, 3)
        foreign["lever_lm.encoder.bias"] = torch.ones(3)
        torch.save({"state_dict": foreign, "epoch": 7, "global_step": 70}, path)
        return 2
    if kind == "bare":
        torch.save({**sd, "num_batches_tracked": torch.tensor(5)}, path)
        return 1
    assert kind == "safetensors"
    save_checkpoint(path, sd, {"phase": "rce", "epoch": 2, "model": {"num_heads": 2}})
    return 0


SUFFIX = {
    "model_state_dict": ".pt",
    "lightning": ".ckpt",
    "bare": ".pth",
    "safetensors": ".safetensors",
}


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype, k
        assert torch.equal(got[k], v), k


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", sorted(SUFFIX))
def test_round_trip_each_format(cli, tmp_path: Path, kind: str) -> None:
    sd = policy_state()
    src = tmp_path / f"foreign{SUFFIX[kind]}"
    extra = write_foreign(src, kind, sd)
    dst = tmp_path / "out" / "converted.safetensors"

    result = cli("convert-checkpoint", src, dst)
    assert result.exit_code == 0, result.output
    assert f"loaded {len(sd)} policy tensors" in result.output
    assert f"wrote {dst}" in result.output
    if extra:
        assert f"ignored {extra} keys the policy does not have" in result.output
    assert "missing" not in result.output

    assert_same_tensors(read_state_dict(dst), sd)
    meta = read_metadata(dst)
    heads = 2 if kind == "safetensors" else 1  # ours carries num_heads in its metadata
    assert meta["model"] == PolicyConfig(input_dim=16, hidden_dim=32, num_heads=heads).to_dict()
    assert meta["converted_from"] == os.path.abspath(src)
    assert meta["source_sha256"] == sha256(src)
    assert meta["ignored_keys"] == extra
    assert meta["missing_keys"] == []
    assert meta["lever_trainer_version"] == __version__
    assert meta["format_version"] == 1


def test_identity_projection_missing_keys_and_half_precision(cli, tmp_path: Path) -> None:
    # d == hidden: no input_proj, so d is the hidden dim; fp16 weights stay fp16.
    sd = {k: v.half() for k, v in policy_state(input_dim=32, num_layers=2).items()}
    assert "input_proj.weight" not in sd
    partial = {k: v for k, v in sd.items() if not k.startswith("query_update_gate.")}
    src = tmp_path / "partial.pt"
    torch.save(partial, src)
    dst = tmp_path / "converted.safetensors"

    result = cli("convert-checkpoint", src, dst, "--input-dim", "32")
    assert result.exit_code == 0, result.output
    assert "input_dim 32 (no input_proj.weight" in result.output
    assert "missing 2 policy keys" in result.output
    assert "query_update_gate.weight" in result.output
    assert_same_tensors(read_state_dict(dst), partial)
    meta = read_metadata(dst)
    assert meta["model"] == PolicyConfig(input_dim=32, hidden_dim=32, num_layers=2).to_dict()
    assert meta["missing_keys"] == ["query_update_gate.bias", "query_update_gate.weight"]
    assert meta["ignored_keys"] == 0

    result = cli("convert-checkpoint", src, tmp_path / "other.safetensors", "--input-dim", "16")
    assert_user_error(result, "--input-dim 16", "partial.pt", "identity", "hidden dim 32")
    assert not (tmp_path / "other.safetensors").exists()


def test_existing_destination_refused_unless_overwrite(cli, tmp_path: Path) -> None:
    src = tmp_path / "sft.pt"
    write_foreign(src, "model_state_dict", policy_state())
    dst = tmp_path / "converted.safetensors"
    dst.write_bytes(b"precious")

    result = cli("convert-checkpoint", src, dst)
    assert_user_error(result, str(dst), "already exists", "--overwrite")
    assert dst.read_bytes() == b"precious"

    result = cli("convert-checkpoint", src, dst, "--overwrite")
    assert result.exit_code == 0, result.output
    assert_same_tensors(read_state_dict(dst), policy_state())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted.safetensors", "sft.pt"]


def test_unsafe_pickle_refused_then_trusted(cli, tmp_path: Path) -> None:
    sd = policy_state()
    src = tmp_path / "full.pt"
    torch.save({"model_state_dict": sd, "hparams": NotATensor(5)}, src)
    dst = tmp_path / "converted.safetensors"

    result = cli("convert-checkpoint", src, dst)
    assert_user_error(result, "full.pt", "weights_only", "--trust-checkpoint")
    assert not dst.exists()

    result = cli("convert-checkpoint", src, dst, "--trust-checkpoint")
    assert result.exit_code == 0, result.output
    warnings = [ln for ln in result.output.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1, result.output
    assert "full (unsafe)" in warnings[0] and "full.pt" in warnings[0]
    assert_same_tensors(read_state_dict(dst), sd)


def test_input_dim_must_agree(cli, tmp_path: Path) -> None:
    src = tmp_path / "sft.pt"
    write_foreign(src, "model_state_dict", policy_state())
    dst = tmp_path / "converted.safetensors"

    result = cli("convert-checkpoint", src, dst, "--input-dim", "20")
    assert_user_error(result, "--input-dim 20", "sft.pt", "input_proj.weight", "[32, 16]", "d=16")
    assert not dst.exists()

    result = cli("convert-checkpoint", src, dst, "--input-dim", "16")
    assert result.exit_code == 0, result.output
    assert read_metadata(dst)["model"]["input_dim"] == 16


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("no_policy", ["query_proj.weight", "no pointer policy"]),
        ("bad_suffix", ["converted.pt", ".safetensors"]),
        ("bad_heads", ["--num-heads 3", "hidden dim 32"]),
        ("missing_src", ["nope.pt", "file not found"]),
        ("bad_shape", ["'query_update_gate.weight'", "[32, 63]", "[32, 64]"]),
    ],
)
def test_user_errors_write_nothing(cli, tmp_path: Path, case: str, fragments: list[str]) -> None:
    src = tmp_path / "sft.pt"
    sd = policy_state()
    dst = tmp_path / "converted.safetensors"
    args: list[str] = []
    if case == "no_policy":
        torch.save({"encoder.weight": torch.ones(2, 2)}, src)
    elif case == "bad_suffix":
        torch.save(sd, src)
        dst = tmp_path / "converted.pt"
    elif case == "bad_heads":
        torch.save(sd, src)
        args = ["--num-heads", "3"]
    elif case == "missing_src":
        src = tmp_path / "nope.pt"
    else:
        torch.save({**sd, "query_update_gate.weight": torch.zeros(32, 63)}, src)
    result = cli("convert-checkpoint", src, dst, *args)
    assert_user_error(result, *fragments)
    assert not dst.exists()


def train_start(cli, files: tuple[Path, Path], out: Path, ckpt: Path) -> str:
    result = cli(
        "--beam-data",
        files[0],
        "--img-emb",
        files[1],
        "--output-dir",
        out,
        "--batch-size",
        "8",
        "--rce-epochs",
        "1",
        "--sft-ckpt",
        ckpt,
    )
    assert result.exit_code == 0, result.output
    assert "loaded starting checkpoint" in result.output
    return next(ln for ln in result.output.splitlines() if ln.startswith("start:"))


def test_converted_checkpoint_starts_training_like_the_original(
    cli, demo_files, tmp_path: Path
) -> None:
    src = tmp_path / "last.ckpt"
    write_foreign(src, "lightning", policy_state())  # d = 16 like demo_files, hidden 32
    dst = tmp_path / "converted.safetensors"
    assert cli("convert-checkpoint", src, dst).exit_code == 0
    model = read_metadata(dst)["model"]
    assert (model["input_dim"], model["hidden_dim"], model["num_layers"]) == (16, 32, 1)

    start_foreign = train_start(cli, demo_files, tmp_path / "a", src)
    start_converted = train_start(cli, demo_files, tmp_path / "b", dst)
    assert start_converted == start_foreign
    wa = read_state_dict(tmp_path / "a" / "rce_epoch01.safetensors")
    wb = read_state_dict(tmp_path / "b" / "rce_epoch01.safetensors")
    assert_same_tensors(wb, wa)


def test_square_input_projection_is_dropped_with_a_warning(cli, tmp_path: Path) -> None:
    # A source that kept a [h, h] input projection although d == h: this project's
    # policy has the identity there, so the weight cannot be carried over.
    sd = policy_state(input_dim=32)
    src = tmp_path / "square.pt"
    torch.save({**sd, "input_proj.weight": torch.randn(32, 32)}, src)
    dst = tmp_path / "converted.safetensors"
    result = cli("convert-checkpoint", src, dst)
    assert result.exit_code == 0, result.output
    assert "'input_proj.weight' is dropped" in result.output
    assert read_metadata(dst)["ignored_keys"] == 1
    assert_same_tensors(read_state_dict(dst), sd)

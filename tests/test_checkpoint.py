"""Saving checkpoints and importing starting checkpoints in every supported format (docs/algorithm.md#checkpoints)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lever_trainer.checkpoint import (
    ImportReport,
    infer_policy_shape,
    load_into_model,
    read_metadata,
    read_state_dict,
    save_checkpoint,
)
from lever_trainer.errors import LeverError
from lever_trainer_plugins.pointer import PointerPolicy, PolicyConfig


class NotATensor:
    """A custom object that only a full (unsafe) pickle load can rebuild."""

    def __init__(self, value: int) -> None:
        self.value = value


def policy(seed: int = 0, **kw: int) -> PointerPolicy:
    torch.manual_seed(seed)
    return PointerPolicy(PolicyConfig(**{"input_dim": 16, "hidden_dim": 8, **kw}))


def assert_same_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


# ----------------------------------------------------------------- save / read
def test_save_read_round_trip(tmp_path: Path) -> None:
    sd = policy().state_dict()
    metadata = {
        "phase": "rce",
        "epoch": 2,
        "kl_beta": 0.15,
        "metrics": {"val_loss": 1.25, "spearman": -0.5},
        "model": {"input_dim": 16, "hidden_dim": 8},
        "plugins": {"raw-reward": "0.1.0"},
        "data_fingerprint": "0123456789",  # a string that looks like a number stays a string
        "flag": "true",
    }
    path = tmp_path / "ckpts" / "rce_epoch02.safetensors"
    save_checkpoint(path, sd, metadata)

    # nothing but the checkpoint in its directory: the temp file was renamed, not left
    assert sorted(p.name for p in path.parent.iterdir()) == ["rce_epoch02.safetensors"]
    loaded = read_state_dict(path)
    assert set(loaded) == set(sd)
    for k, v in sd.items():
        assert torch.equal(loaded[k], v), k

    meta = read_metadata(path)
    for k, v in metadata.items():
        assert meta[k] == v, k
        assert type(meta[k]) is type(v), k
    assert meta["format_version"] == 1  # stored as the JSON text "1"

    # writing again replaces the file atomically, still leaving no temp file behind
    save_checkpoint(path, sd, {**metadata, "epoch": 3})
    assert read_metadata(path)["epoch"] == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["rce_epoch02.safetensors"]


def test_save_into_unwritable_place_is_user_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LeverError, match="cannot write checkpoint"):
        save_checkpoint(blocker / "sub" / "a.safetensors", {"w": torch.zeros(1)}, {})


# ----------------------------------------------------------------- foreign formats
def test_torch_save_model_state_dict(tmp_path: Path) -> None:
    sd = policy(1).state_dict()
    path = tmp_path / "sft.pt"
    torch.save({"model_state_dict": sd, "epoch": 3, "optimizer": {"lr": 0.1}}, path)
    model = policy(2)
    report = load_into_model(model, read_state_dict(path), str(path))
    assert_same_weights(model, sd)
    assert report.loaded == len(sd)
    assert report.ignored == []
    assert report.missing == []


@pytest.mark.parametrize("prefix", ["lever_lm.", "pointer_selector.", "lever_lm.pointer_selector."])
def test_lightning_ckpt_prefixes_and_old_names(tmp_path: Path, prefix: str) -> None:
    sd = policy(1).state_dict()

    def old_name(key: str) -> str:
        return key.replace("cross_attn_layers.0.", "cross_attn.").replace(
            "attn_norms.0.", "attn_norm."
        )

    foreign = {prefix + old_name(k): v.clone() for k, v in sd.items()}
    assert f"{prefix}cross_attn.in_proj_weight" in foreign
    assert f"{prefix}attn_norm.weight" in foreign
    foreign["lever_lm.encoder.weight"] = torch.ones(3, 3)
    foreign["lever_lm.encoder.bias"] = torch.ones(3)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": foreign, "epoch": 7, "global_step": 70}, path)

    model = policy(2)
    report = load_into_model(model, read_state_dict(path), str(path))
    assert_same_weights(model, sd)
    assert sorted(report.ignored) == ["encoder.bias", "encoder.weight"]
    assert report.missing == []
    assert report.loaded == len(sd)
    assert "ignored 2 keys" in "\n".join(report.lines())


def test_missing_keys_are_listed(tmp_path: Path) -> None:
    sd = policy(1).state_dict()
    partial = {k: v for k, v in sd.items() if not k.startswith("query_update_gate.")}
    path = tmp_path / "partial.pt"
    torch.save(partial, path)
    model = policy(2)
    before = model.state_dict()["query_update_gate.bias"].clone()
    report = load_into_model(model, read_state_dict(path), str(path))
    assert report.missing == ["query_update_gate.bias", "query_update_gate.weight"]
    assert torch.equal(model.state_dict()["query_update_gate.bias"], before)
    assert torch.equal(model.state_dict()["query_proj.weight"], sd["query_proj.weight"])
    assert "query_update_gate.weight" in "\n".join(report.lines())


def test_shape_mismatch_names_the_key(tmp_path: Path) -> None:
    sd = policy(1).state_dict()
    sd["query_update_gate.weight"] = torch.zeros(8, 15)  # the policy has [8, 16]
    path = tmp_path / "bad_gate.safetensors"
    save_checkpoint(path, sd, {})
    model = policy(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LeverError) as err:
        load_into_model(model, read_state_dict(path), str(path))
    msg = str(err.value)
    assert "bad_gate.safetensors" in msg
    assert "'query_update_gate.weight'" in msg
    assert "[8, 15]" in msg
    assert "[8, 16]" in msg
    assert_same_weights(model, before)  # nothing was half-loaded


@pytest.mark.parametrize(("ckpt_d", "ckpt_h", "data_d"), [(12, 8, 8), (8, 8, 16)])
def test_embedding_width_mismatch_is_refused(
    tmp_path: Path, ckpt_d: int, ckpt_h: int, data_d: int
) -> None:
    # With d == h the input projection is the identity and has no weight, so the
    # mismatch does not show up as a shape mismatch of a shared key.
    sd = policy(1, input_dim=ckpt_d, hidden_dim=ckpt_h).state_dict()
    path = tmp_path / "sft.safetensors"
    save_checkpoint(path, sd, {})
    model = policy(2, input_dim=data_d, hidden_dim=ckpt_h)
    with pytest.raises(LeverError) as err:
        load_into_model(model, read_state_dict(path), str(path), " (from --img-emb)")
    msg = str(err.value)
    assert "sft.safetensors" in msg
    assert f"d={ckpt_d}" in msg
    assert f"d={data_d}" in msg


def test_unsafe_pickle_refused_then_trusted(tmp_path: Path) -> None:
    sd = policy(1).state_dict()
    path = tmp_path / "full.pt"
    torch.save({"model_state_dict": sd, "hparams": NotATensor(5)}, path)
    with pytest.raises(LeverError) as err:
        read_state_dict(path)
    assert "--trust-checkpoint" in str(err.value)
    assert "full.pt" in str(err.value)

    loaded = read_state_dict(path, trust=True)
    model = policy(2)
    load_into_model(model, loaded, str(path))
    assert_same_weights(model, sd)


def test_unreadable_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(LeverError, match="file not found"):
        read_state_dict(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a pickle")
    with pytest.raises(LeverError, match=r"junk\.pt"):
        read_state_dict(junk)
    junk_st = tmp_path / "junk.safetensors"
    junk_st.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(LeverError, match=r"junk\.safetensors"):
        read_state_dict(junk_st)
    no_tensors = tmp_path / "none.pt"
    torch.save({"epoch": 3}, no_tensors)
    with pytest.raises(LeverError, match="no tensors"):
        read_state_dict(no_tensors)
    foreign = tmp_path / "foreign.pt"
    torch.save({"encoder.weight": torch.ones(2)}, foreign)
    with pytest.raises(LeverError, match="none of its 1 keys"):
        load_into_model(policy(), read_state_dict(foreign), str(foreign))


def test_infer_policy_shape() -> None:
    sd = policy(input_dim=16, hidden_dim=8, num_layers=3).state_dict()
    assert infer_policy_shape(sd) == {"hidden_dim": 8, "num_layers": 3}
    assert infer_policy_shape({"lever_lm.other": torch.zeros(1)}) == {}


def test_import_report_lines() -> None:
    report = ImportReport("x.ckpt", loaded=3, ignored=["a", "b"], missing=["c"])
    text = "\n".join(report.lines())
    assert "x.ckpt: 3 tensors" in text
    assert "ignored 2 keys" in text
    assert "1 policy keys missing" in text

"""A careless or hostile user (issue "Nothing lost, nothing silently wrong"): every case
ends with one clear ``error:`` line and exit status 2 (or works correctly), and nothing
already written is lost. Sections follow the issue's numbered cases.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import Result
from conftest import assert_user_error, builtin_registry, candidate, write_emb, write_json
from safetensors.torch import load_file, save_file
from test_trainer import make_trainer

from lever_trainer import RewardChoice, hookimpl
from lever_trainer.checkpoint import infer_policy_shape, read_metadata, save_checkpoint
from lever_trainer.cli import installed_plugins, main
from lever_trainer.data import DataOptions, load_rl_data
from lever_trainer.errors import LeverError, PluginError
from lever_trainer.plugins import load_plugins
from lever_trainer.rewards import RewardRegistry
from lever_trainer.trainer import SNAPSHOT_NAME
from lever_trainer_plugins.pointer import PointerPolicy, PolicyConfig

Cli = Callable[..., Result]
Files = tuple[Path, Path]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train(cli: Cli, files: Files, out: Path, *extra: Any) -> Result:
    """``lever-train`` on the demo files with a small, fast policy (1 RCE epoch)."""
    return cli(
        "--beam-data", files[0], "--img-emb", files[1], "--output-dir", out,
        "--policy", "pointer", "--hidden-dim", "16", "--batch-size", "8", "--rce-epochs", "1", *extra,
    )  # fmt: skip


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.output


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def pointer_state(seed: int = 1, **config: Any) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    cfg = {"input_dim": 16, "hidden_dim": 16, **config}
    return dict(PointerPolicy(PolicyConfig(**cfg)).state_dict())


def start_cli(*args: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "lever_trainer", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


# ======================================================= 1. an occupied output directory
RUN_FILES = [
    "run_config.json",
    "resume.pt",
    "metrics.jsonl",
    "steps.jsonl",
    "best.safetensors",
    "rce_epoch03.safetensors",
]


@pytest.mark.parametrize("name", RUN_FILES)
def test_a_directory_holding_any_run_file_is_occupied(
    cli: Cli, demo_files: Files, tmp_path: Path, name: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_bytes(b"the earlier run's")
    result = train(cli, demo_files, out, "--rce-epochs", "0", "--seed", "7")
    assert_user_error(result, "--output-dir", name, "--overwrite", "--resume")
    assert os.listdir(out) == [name]
    assert (out / name).read_bytes() == b"the earlier run's"


def test_a_stopped_run_keeps_its_options(cli: Cli, demo_files: Files, tmp_path: Path) -> None:
    """The issue's case: a run stopped in epoch 1 left resume.pt and run_config.json."""
    out = tmp_path / "out"
    ok(train(cli, demo_files, out, "--rce-epochs", "2"))
    for path in out.glob("*.safetensors"):
        path.unlink()
    (out / "metrics.jsonl").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["resume.pt", "run_config.json", "steps.jsonl"]
    result = train(cli, demo_files, out, "--rce-epochs", "0", "--seed", "7")
    assert_user_error(result, "--output-dir", "run_config.json")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_other_files_do_not_occupy_a_directory(cli: Cli, demo_files: Files, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / ".lock").write_text('{"pid": 999999}')  # left by a run that was killed
    ok(train(cli, demo_files, out))
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "rce_epoch01.safetensors").is_file()


# ============================================ 2. two runs, one directory: the run lock
HOLD_LOCK = (
    "import sys, time; from pathlib import Path; from lever_trainer.rundir import RunLock; "
    "RunLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(120)"
)


def test_a_held_directory_is_refused_naming_the_holder_until_it_dies(
    cli: Cli, demo_files: Files, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True, env=ENV
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        result = train(cli, demo_files, out)
        assert_user_error(
            result, "--output-dir", "in use by another lever-train run", f"pid {holder.pid}"
        )
        assert socket.gethostname() in result.output
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / ".lock").exists()  # the killed holder could not clean up
    ok(train(cli, demo_files, out))  # ... and its lock does not block
    assert not (out / ".lock").exists()  # a finished run removes its lock
    assert (out / "rce_epoch01.safetensors").is_file()


def test_two_runs_started_together_do_not_mix_their_files(
    demo_files: Files, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    common = ["--beam-data", demo_files[0], "--img-emb", demo_files[1], "--output-dir", out]
    common += ["--hidden-dim", "16", "--batch-size", "4", "--no-cache"]
    procs = [
        start_cli(*common, "--seed", "1", "--rce-epochs", "3"),
        start_cli(*common, "--seed", "2", "--rce-epochs", "2"),
    ]
    results = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "error: --output-dir" in loser
    assert "in use by another lever-train run" in loser or "already holds" in loser
    config = json.loads((out / "run_config.json").read_text())
    seed, epochs = config["options"]["seed"], config["options"]["rce_epochs"]
    names = sorted(p.name for p in out.glob("*.safetensors"))
    epoch_names = [f"rce_epoch{e:02d}.safetensors" for e in range(1, epochs + 1)]
    assert names == ["best.safetensors", *epoch_names]
    for name in names:
        assert read_metadata(out / name)["train_config"]["seed"] == seed


# ================================== issue 12: --overwrite removes the previous run's files
def test_overwrite_removes_the_previous_runs_files_and_nothing_else(
    cli: Cli, demo_files: Files, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    ok(train(cli, demo_files, out, "--rce-epochs", "3", "--best-metric", "val_loss"))
    (out / "notes.txt").write_text("mine")
    (out / "plots").mkdir()
    (out / ".resume.pt.abc123.tmp").write_bytes(b"a killed write")
    output = ok(train(cli, demo_files, out, "--overwrite", "--seed", "9"))
    assert "--overwrite: removed 9 files of the previous run" in output
    assert sorted(p.name for p in out.iterdir()) == [
        "best.safetensors",
        "metrics.jsonl",
        "notes.txt",
        "plots",
        "rce_epoch01.safetensors",
        "resume.pt",
        "run_config.json",
        "steps.jsonl",
    ]
    assert json.loads((out / "run_config.json").read_text())["options"]["seed"] == 9
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # the start, epoch 1


# =============================================== 3. the bytes hashed are the bytes parsed
def tiny_data(correct: int) -> dict[str, Any]:
    return {
        str(q): {
            "pointer_candidates": [
                candidate([10 + q, 11 + q], correct, 0.5),
                candidate([12 + q, 10 + q], 0, 0.25),
            ]
        }
        for q in range(4)
    }


def test_the_cache_records_the_bytes_it_parsed(tmp_path: Path, monkeypatch) -> None:
    import lever_trainer.data.load as load_module

    path = write_json(tmp_path / "rl.json", tiny_data(correct=1))
    original = path.read_bytes()
    # a prepared form (of other options) exists, so the next load hashes to look it up
    load_rl_data(path, DataOptions(max_pool=63), builtin_registry(), cache=True)
    real = load_module.file_fingerprint
    raced: list[bool] = []

    def fingerprint_then_rewrite(*paths: Any) -> str:
        digest = real(*paths)
        if not raced:  # another process rewrites the file between hash and parse
            raced.append(True)
            write_json(path, tiny_data(correct=0))
        return digest

    monkeypatch.setattr(load_module, "file_fingerprint", fingerprint_then_rewrite)
    warnings: list[str] = []
    _, first = load_rl_data(
        path, DataOptions(), builtin_registry(), cache=True, warn=warnings.append
    )
    assert raced
    assert first.source_sha256 == sha256(path)  # the rewritten bytes, which were parsed
    assert warnings == [f"warning: {path} changed while it was being read; this run uses "
                        "the content it parsed (its sha256 is the one recorded)"]  # fmt: skip
    monkeypatch.undo()
    path.write_bytes(original)  # the correct file again
    table, report = load_rl_data(path, DataOptions(), builtin_registry(), cache=True)
    assert report.source_sha256 == hashlib.sha256(original).hexdigest()
    # hard_plus_soft: vqa_correct 1 + acc 0.5 = 1.5 for every query's first candidate
    assert table.rewards_raw[:, 0].tolist() == [1.5] * 4


def test_the_runs_fingerprint_is_of_the_bytes_parsed(
    cli: Cli, demo_files: Files, tmp_path: Path, monkeypatch
) -> None:
    import lever_trainer.run as run_module

    data = tmp_path / "rl.json"
    data.write_bytes(demo_files[0].read_bytes())
    original = hashlib.sha256(data.read_bytes()).hexdigest()
    real = run_module.load_rl_data

    def load_then_rewrite(*args: Any, **kwargs: Any) -> Any:
        loaded = real(*args, **kwargs)
        data.write_bytes(data.read_bytes().replace(b'"vqa_correct": 1', b'"vqa_correct": 0'))
        return loaded

    monkeypatch.setattr(run_module, "load_rl_data", load_then_rewrite)
    out = tmp_path / "out"
    ok(train(cli, (data, demo_files[1]), out, "--rce-epochs", "0", "--no-cache"))
    expected = hashlib.sha256(f"{original}:{sha256(demo_files[1])}".encode()).hexdigest()
    assert json.loads((out / "run_config.json").read_text())["data_fingerprint"] == expected


def test_embeddings_rewritten_while_loaded_are_refused(
    cli: Cli, demo_files: Files, tmp_path: Path, monkeypatch
) -> None:
    import lever_trainer.run as run_module

    emb = write_emb(tmp_path / "emb.safetensors", load_file(str(demo_files[1]))["embeddings"])
    real = run_module.load_embeddings

    def load_then_rewrite(*args: Any, **kwargs: Any) -> Any:
        loaded = real(*args, **kwargs)
        write_emb(emb, loaded.query * 2)
        return loaded

    monkeypatch.setattr(run_module, "load_embeddings", load_then_rewrite)
    out = tmp_path / "out"
    result = train(cli, (demo_files[0], emb), out)
    assert_user_error(result, "emb.safetensors", "changed while being read")
    assert not out.exists()


def test_a_file_rewritten_under_a_plugin_reader_is_refused(tmp_path: Path) -> None:
    path = write_json(tmp_path / "rl.json", tiny_data(correct=1))

    def rewriting_reader(p: Path) -> Iterator[tuple[str, Any]]:
        for key, value in json.loads(p.read_text()).items():
            yield key, value
            write_json(p, tiny_data(correct=0))

    with pytest.raises(LeverError, match=r"rl\.json: the file changed while it was being read"):
        load_rl_data(path, DataOptions(), builtin_registry(), reader=rewriting_reader)


# ============================================================= 4. a plugin's state
class StatePlugin:
    """Counts steps; ``kind`` decides what its state looks like."""

    def __init__(self, kind: str) -> None:
        self.kind, self.count, self.loaded = kind, 0, None

    @hookimpl
    def on_step_end(self, state) -> None:
        self.count += 1

    @hookimpl
    def plugin_state_dict(self, state) -> dict[str, Any]:
        import numpy as np

        if self.kind == "numpy":
            return {"mean": np.float32(0.25), "count": np.int64(self.count), "ok": np.bool_(1)}
        if self.kind == "lambda" and state.epoch == 2:
            return {"schedule": [1, {"fn": lambda x: x}]}
        return {"count": self.count}

    @hookimpl
    def load_plugin_state(self, state, saved) -> None:
        self.loaded = saved


def test_numpy_scalars_in_a_plugin_state_are_stored_as_numbers(
    demo_files: Files, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    plugin = StatePlugin("numpy")
    make_trainer(demo_files, out, extra=(("stateful", plugin),), enable=("stateful",)).fit()
    snap = torch.load(out / SNAPSHOT_NAME, weights_only=True)  # the safe loader reads it
    state = snap["plugins"]["stateful"]
    assert state == {"mean": 0.25, "count": plugin.count, "ok": True}
    assert [type(v) for v in state.values()] == [float, int, bool]


def test_a_state_the_safe_loader_would_refuse_names_the_plugin(
    demo_files: Files, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    plugin = StatePlugin("lambda")
    trainer = make_trainer(
        demo_files, out, extra=(("stateful", plugin),), enable=("stateful",), rce_epochs=2
    )
    with pytest.raises(PluginError) as err:
        trainer.fit()
    message = str(err.value)
    assert message.startswith("plugin stateful: hook plugin_state_dict:")
    assert "['schedule'][1]['fn']" in message and "function" in message
    snap = torch.load(out / SNAPSHOT_NAME, weights_only=True)  # epoch 1's, still readable
    assert (snap["phase"], snap["epoch"], snap["epoch_closed"]) == ("rce", 1, True)


# ================================================================ 5. non-finite weights
def test_an_exploding_learning_rate_writes_no_broken_checkpoint(
    cli: Cli, demo_files: Files, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = train(cli, demo_files, out, "--rce-lr", "1e30", "--rce-epochs", "2")
    assert_user_error(result, "phase rce epoch 1", "not finite", "--rce-lr 1e+30")
    assert not list(out.glob("*.safetensors"))
    assert "rce epoch 1/2:" not in result.output  # no epoch reported as if it were fine


def test_a_step_that_makes_a_weight_non_finite_stops_the_run(
    demo_files: Files, tmp_path: Path
) -> None:
    from lever_trainer_plugins.rce import RCEPhase

    class PoisonedRCE(RCEPhase):
        """RCE whose optimiser writes a NaN into ``query_proj.weight`` at its third step."""

        def make_optimizer(self, state, params):
            optimizer = super().make_optimizer(state, params)
            step, calls = optimizer.step, []

            def poisoned_step(*args: Any, **kwargs: Any) -> Any:
                out = step(*args, **kwargs)
                calls.append(1)
                if len(calls) == 3:
                    with torch.no_grad():
                        state.model.query_proj.weight[0, 0] = float("nan")
                return out

            optimizer.step = poisoned_step  # type: ignore[method-assign]
            return optimizer

    class Poison:
        @hookimpl
        def phases(self):
            return [PoisonedRCE()]

    out = tmp_path / "run"
    trainer = make_trainer(
        demo_files, out, disable=("rce",), extra=(("poison", Poison()),), enable=("poison",),
        rce_epochs=2, rce_lr=1e-3, rce_temp_start=2.0, rce_temp_end=0.5,
    )  # fmt: skip
    with pytest.raises(LeverError) as err:
        trainer.fit()
    assert str(err.value).startswith(
        "phase rce epoch 1 step 3: the optimiser step made 1 weights non-finite "
        "(query_proj.weight); is the learning rate too high (rce_lr 0.001)?"
    )
    assert not list(out.glob("*.safetensors")) and not (out / SNAPSHOT_NAME).exists()


def test_checkpoints_with_non_finite_weights_are_never_written(tmp_path: Path) -> None:
    sd = pointer_state()
    sd["query_proj.weight"][0, 0] = float("nan")
    with pytest.raises(LeverError, match=r"'query_proj\.weight' holds non-finite values"):
        save_checkpoint(tmp_path / "x.safetensors", sd, {})
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("damage", ["nan", "huge"])
def test_select_refuses_a_policy_that_is_not_finite(
    cli: Cli, demo_files: Files, tmp_path: Path, damage: str
) -> None:
    sd = pointer_state()
    if damage == "nan":
        sd = {k: torch.full_like(v, float("nan")) for k, v in sd.items()}
    else:  # finite weights whose scores overflow
        sd = {k: v * 1e30 for k, v in sd.items()}
    ckpt = tmp_path / "broken.pt"
    torch.save(sd, ckpt)
    picks = tmp_path / "picks.json"
    result = cli(
        "select", "--ckpt", ckpt, "--beam-data", demo_files[0], "--img-emb", demo_files[1],
        "--output", picks,
    )  # fmt: skip
    assert_user_error(result, "broken.pt", "finite")
    assert not picks.exists()


# ========================================================= 6. layer counts from junk keys
def test_a_huge_layer_index_is_refused_before_anything_is_built() -> None:
    sd = pointer_state()
    sd["cross_attn_layers.100000000.x"] = torch.zeros(1)
    with pytest.raises(LeverError, match=r"'cross_attn_layers\.100000000\.x'.* 64 layers"):
        infer_policy_shape(sd, "junk.pt")


def test_layer_counts_come_from_consistent_keys() -> None:
    two = pointer_state(num_layers=2)
    assert infer_policy_shape(two)["num_layers"] == 2
    gap = {k.replace("layers.1.", "layers.39.").replace("norms.1.", "norms.39."): v
           for k, v in two.items()}  # fmt: skip
    with pytest.raises(LeverError, match="no layer 1"):
        infer_policy_shape(gap)
    odd = dict(two)
    del odd["cross_attn_layers.1.out_proj.bias"]
    with pytest.raises(LeverError, match="not consistent"):
        infer_policy_shape(odd)
    uneven = {k: v for k, v in two.items() if not k.startswith("attn_norms.1.")}
    with pytest.raises(LeverError, match="disagree on the number of layers"):
        infer_policy_shape(uneven)


@pytest.mark.parametrize("command", ["train", "select"])
def test_a_stray_layer_key_is_refused_by_train_and_select(
    cli: Cli, demo_files: Files, tmp_path: Path, command: str
) -> None:
    sd = pointer_state()
    sd["cross_attn_layers.39.in_proj_weight"] = torch.zeros(48, 16)
    ckpt = tmp_path / "stray.pt"
    torch.save(sd, ckpt)
    out = tmp_path / "out"
    if command == "train":
        result = train(cli, demo_files, out, "--sft-ckpt", ckpt)
    else:
        result = cli(
            "select", "--ckpt", ckpt, "--beam-data", demo_files[0], "--img-emb", demo_files[1],
            "--output", out / "picks.json",
        )  # fmt: skip
    assert_user_error(result, "stray.pt", "no layer 1")
    assert not out.exists()


# ================================================ 7. a checkpoint that is not the model
def test_missing_weights_need_partial_load_and_then_start_seeded(
    cli: Cli, demo_files: Files, tmp_path: Path
) -> None:
    full = pointer_state()
    # d = h = 16: the input projection is the identity, so the policy has 10 tensors
    kept = {"query_proj.weight": full["query_proj.weight"]}
    ckpt = tmp_path / "partial.safetensors"
    save_file(kept, str(ckpt))
    out = tmp_path / "a"
    result = train(cli, demo_files, out, "--sft-ckpt", ckpt, "--rce-epochs", "0")
    assert_user_error(result, "partial.safetensors", "9 of the policy's 10", "--partial-load")
    assert not out.exists()
    runs = []
    for name in ("a", "b"):
        output = ok(
            train(cli, demo_files, tmp_path / name, "--sft-ckpt", ckpt, "--partial-load",
                  "--rce-epochs", "1", "--seed", "3")
        )  # fmt: skip
        line = next(ln for ln in output.splitlines() if "policy keys missing" in ln)
        assert "9 policy keys missing, initialised from --seed 3" in line
        assert "cand_proj.weight" in line and "query_update_gate.bias" in line
        runs.append(weights(tmp_path / name / "rce_epoch01.safetensors"))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])  # seeded: reproducible


def test_select_refuses_an_incomplete_checkpoint(
    cli: Cli, demo_files: Files, tmp_path: Path
) -> None:
    sd = pointer_state()
    del sd["query_update_gate.weight"]
    ckpt = tmp_path / "partial.pt"
    torch.save(sd, ckpt)
    picks = tmp_path / "picks.json"
    result = cli(
        "select", "--ckpt", ckpt, "--beam-data", demo_files[0], "--img-emb", demo_files[1],
        "--output", picks,
    )  # fmt: skip
    assert_user_error(result, "partial.pt", "1 of the policy's 10 weights are missing")
    assert not picks.exists()


def test_colliding_keys_are_refused(cli: Cli, demo_files: Files, tmp_path: Path) -> None:
    sd = pointer_state()
    both = {**sd, "lever_lm.query_proj.weight": sd["query_proj.weight"] + 1}
    ckpt = tmp_path / "twice.pt"
    torch.save({"state_dict": both}, ckpt)
    out = tmp_path / "out"
    result = train(cli, demo_files, out, "--sft-ckpt", ckpt)
    assert_user_error(result, "twice.pt", "'query_proj.weight'", "'lever_lm.query_proj.weight'")
    same = {**sd, "lever_lm.query_proj.weight": sd["query_proj.weight"].clone()}
    torch.save({"state_dict": same}, ckpt)  # the same tensor twice is not ambiguous
    ok(train(cli, demo_files, out, "--sft-ckpt", ckpt, "--rce-epochs", "0"))


def test_extra_keys_inside_the_policy_are_refused(
    cli: Cli, demo_files: Files, tmp_path: Path
) -> None:
    sd = {**pointer_state(), "query_proj.bias": torch.zeros(16), "encoder.weight": torch.ones(2)}
    ckpt = tmp_path / "extra.pt"
    torch.save(sd, ckpt)
    result = train(cli, demo_files, tmp_path / "a", "--sft-ckpt", ckpt)
    assert_user_error(result, "extra.pt", "query_proj.bias", "another model")
    output = ok(train(cli, demo_files, tmp_path / "b", "--sft-ckpt", ckpt, "--partial-load"))
    assert "ignored 2 keys the policy does not have" in output
    assert "--partial-load: ignored 1 keys inside the policy's modules" in output


def test_another_policys_checkpoint_must_be_complete_for_its_own_policy(
    cli: Cli, demo_files: Files, tmp_path: Path
) -> None:
    sd = pointer_state()
    del sd["cand_proj.weight"]  # a trunk weight that pointer-gru shares with pointer
    ckpt = tmp_path / "base.safetensors"
    save_checkpoint(ckpt, sd, {"model": {"hidden_dim": 16}})
    result = train(cli, demo_files, tmp_path / "a", "--policy", "pointer-gru", "--sft-ckpt", ckpt)
    assert_user_error(result, "base.safetensors", "cand_proj.weight", "--partial-load")


# ================================================================= 8. numeric options
BAD_NUMBERS = [
    ("--rce-lr", "-1"), ("--rce-lr", "nan"), ("--rce-lr", "0"), ("--grpo-lr", "-1e-3"),
    ("--grpo-lr", "nan"), ("--weight-decay", "-0.01"), ("--weight-decay", "inf"),
    ("--seed", "1e23"), ("--seed", "-1"), ("--seed", str(2**63)), ("--grad-clip", "-1"),
    ("--grad-clip", "0"), ("--clip-epsilon", "-1"), ("--clip-epsilon", "0"),
    ("--kl-beta", "-0.1"), ("--kl-beta", "nan"), ("--rce-temp-start", "0"),
    ("--rce-temp-start", "-2"), ("--rce-temp-end", "-0.5"), ("--advantage-clip", "0"),
    ("--normalize-clamp-value", "-3"), ("--early-top-k", "0"), ("--late-top-k", "-1"),
    ("--early-epochs", "-1"), ("--rce-epochs", "-1"), ("--grpo-epochs", "1.5"),
    ("--batch-size", "0"), ("--max-bad-steps", "0"), ("--keep-last", "0"),
    ("--val-ratio", "1"), ("--val-ratio", "-0.1"), ("--max-pool", "0"), ("--hidden-dim", "0"),
    ("--num-layers", "0"), ("--num-layers", "65"), ("--num-heads", "0"), ("--dropout", "1"),
    ("--attn-dropout", "-0.1"), ("--policy-temperature", "0"), ("--hard-weight", "inf"),
    ("--soft-weight", "nan"), ("--reward-alpha", "nan"), ("--two-stage-top-m", "0"),
]  # fmt: skip


@pytest.mark.parametrize(("flag", "value"), BAD_NUMBERS, ids=[f"{f}={v}" for f, v in BAD_NUMBERS])
def test_numeric_options_out_of_range_are_refused_before_anything_is_written(
    cli: Cli, demo_files: Files, tmp_path: Path, flag: str, value: str
) -> None:
    out = tmp_path / "out"
    result = train(cli, demo_files, out, "--grpo-epochs", "1", flag, value)
    assert_user_error(result, flag)
    assert not out.exists()


#: Numeric options where every finite value means something (reward weights may be
#: negative: a penalty); every other numeric option declares a range.
UNBOUNDED = {"hard_weight", "soft_weight", "rel_weight", "reward_alpha", "reward_beta"}


def test_every_numeric_option_has_a_range() -> None:
    from lever_trainer.cli import Number

    installed_plugins.cache_clear()
    for name in ("train", "select", "prepare"):
        command = main.get_command(None, name)  # type: ignore[arg-type]
        assert command is not None
        for param in command.params:
            if isinstance(param.type, Number) and param.name not in UNBOUNDED:
                assert param.type.min is not None or param.type.max is not None, param.name
    for info in installed_plugins():
        for option in info.options:
            if option.type in ("int", "float") and option.dest not in UNBOUNDED:
                assert option.min is not None or option.max is not None, (info.name, option)


# =========================================================== 9. --resume and its options
@pytest.fixture
def finished(cli: Cli, demo_files: Files, tmp_path: Path) -> Path:
    """A finished run: two RCE epochs, no GRPO."""
    out = tmp_path / "run"
    ok(train(cli, demo_files, out, "--rce-epochs", "2"))
    return out


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (("--beam-data", "/nonexistent.json"), ("--beam-data", "data is fixed")),
        (("--seed", "7"), ("--seed 7", "steps are computed", "--sft-ckpt")),
        (("--hidden-dim", "32"), ("--hidden-dim 32", "policy is fixed")),
        (("--plugin", "normalized-reward"), ("--plugin", "plugins are fixed")),
        (("--normalize-clamp-value", "2"), ("--normalize-clamp-value 2", "data")),
        (("--late-top-k", "2"), ("--late-top-k 2", "plugin grpo-curriculum")),
        (("--best-metric", "val_loss"), ("--best-metric val_loss", "best checkpoint")),
        (("--overwrite",), ("--overwrite", "remove the run being resumed")),
        (("--output-dir", "/tmp/elsewhere"), ("--output-dir", "its own directory")),
        (("--rce-epochs", "1"), ("--rce-epochs 1", "reached epoch 2 of phase rce")),
    ],
    ids=lambda v: v[0] if isinstance(v, tuple) and v and v[0].startswith("--") else None,
)
def test_resume_refuses_what_it_cannot_apply(
    cli: Cli, finished: Path, extra: tuple[str, ...], fragments: tuple[str, ...]
) -> None:
    before = {p.name: p.read_bytes() for p in finished.iterdir()}
    assert_user_error(cli("--resume", finished, *extra), "--resume", *fragments)
    assert {p.name: p.read_bytes() for p in finished.iterdir()} == before


def test_resume_of_a_finished_run_says_it_is_complete(
    cli: Cli, demo_files: Files, finished: Path
) -> None:
    # the recorded values may be repeated: they change nothing
    result = cli("--resume", finished, "--beam-data", demo_files[0], "--seed", "42")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"the run in {finished} is complete (epochs: rce 2, grpo 0); nothing to resume "
        f"(to train more: lever-train --resume {finished} --grpo-epochs N)"
    ]


def test_more_epochs_extend_a_finished_phase_at_its_final_temperature(
    cli: Cli, finished: Path
) -> None:
    output = ok(cli("--resume", finished, "--rce-epochs", "3", "--keep-last", "1"))
    assert "resume: --rce-epochs 2 -> 3" in output
    lines = (finished / "metrics.jsonl").read_text().splitlines()
    epochs = [e for e in map(json.loads, lines) if e["phase"] != "start"]
    assert [(e["phase"], e["epoch"]) for e in epochs] == [("rce", 1), ("rce", 2), ("rce", 3)]
    # the schedule kept the 2 epochs it was planned for: epoch 3 runs at --rce-temp-end
    assert epochs[2]["train_tau"] == pytest.approx(0.1)  # the default --rce-temp-end
    assert sorted(p.name for p in finished.glob("*.safetensors")) == [
        "best.safetensors",
        "rce_epoch03.safetensors",
    ]
    config = json.loads((finished / "run_config.json").read_text())
    assert config["options"]["rce_epochs"] == 3 and config["options"]["keep_last"] == 1
    assert config["resumes"][0]["changed"] == {"rce_epochs": [2, 3], "keep_last": [None, 1]}
    assert "is complete" in ok(cli("--resume", finished))  # the new length is the run's


@pytest.mark.parametrize(
    ("reference", "line"),
    [
        # the reference implementation's: the starting model, recomputed from the weights the snapshot kept
        (("--no-plugin", "grpo-reference-refresh"), "computed from the run's starting weights"),
        ((), "GRPO reference log-probs: [default]"),  # the policy as GRPO starts
    ],
)
def test_extending_grpo_from_zero_equals_running_it_from_the_start(
    cli: Cli, demo_files: Files, tmp_path: Path, reference: tuple[str, ...], line: str
) -> None:
    finished, straight = tmp_path / "run", tmp_path / "straight"
    ok(train(cli, demo_files, finished, "--rce-epochs", "2", *reference))
    ok(train(cli, demo_files, straight, "--rce-epochs", "2", "--grpo-epochs", "2", *reference))
    output = ok(cli("--resume", finished, "--grpo-epochs", "2"))
    assert line in output
    a, b = (
        weights(finished / "grpo_epoch02.safetensors"),
        weights(straight / "grpo_epoch02.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in b)
    # GRPO has started now: its options are fixed, and RCE is over
    assert_user_error(cli("--resume", finished, "--kl-beta", "0.5"), "phase grpo has started")
    assert_user_error(cli("--resume", finished, "--rce-epochs", "4"), "phase rce is over")


def test_a_phase_that_has_not_started_takes_new_options(cli: Cli, finished: Path) -> None:
    output = ok(cli("--resume", finished, "--grpo-epochs", "1", "--kl-beta", "0.05"))
    assert "resume: --kl-beta 0.1 -> 0.05" in output
    meta = read_metadata(finished / "grpo_epoch01.safetensors")
    assert meta["options"]["kl_beta"] == 0.05


def test_a_snapshot_of_another_format_is_refused(cli: Cli, finished: Path) -> None:
    snap = torch.load(finished / SNAPSHOT_NAME, weights_only=True)
    snap["format"] = 1
    torch.save(snap, finished / SNAPSHOT_NAME)
    assert_user_error(cli("--resume", finished), "resume.pt", "snapshot format 1", "reads format 2")


# ===================================================== 10. tracebacks where a line is due
def tamper_snapshot(path: Path, how: str) -> None:
    snap = torch.load(path, weights_only=True)
    if how == "a-list":
        torch.save([1, 2], path)
        return
    if how == "no-model":
        del snap["model"]
    elif how == "epoch-as-text":
        snap["epoch"] = "two"
    elif how == "unknown-phase":
        snap["phase"] = "warmup"
    elif how == "wrong-shape":
        snap["model"]["query_proj.weight"] = torch.zeros(3, 3)
    elif how == "rng":
        snap["rng_python"] = [3, [1, 2], None]
    elif how == "bad-optimizer":
        snap["optimizer"] = {"state": {}, "param_groups": "x"}
    torch.save(snap, path)


@pytest.mark.parametrize(
    ("how", "fragment"),
    [
        ("a-list", "snapshot format 'list'"),
        ("no-model", "entry 'model' is missing"),
        ("epoch-as-text", "entry 'epoch' should be an epoch number"),
        ("unknown-phase", "phase 'warmup'"),
        ("wrong-shape", "'query_proj.weight' has shape [3, 3]"),
        ("rng", "entry 'rng_python'"),
        ("bad-optimizer", "optimiser state does not fit phase rce"),
    ],
)
def test_a_tampered_snapshot_is_one_line(
    cli: Cli, demo_files: Files, tmp_path: Path, how: str, fragment: str
) -> None:
    out = tmp_path / "run"
    ok(train(cli, demo_files, out, "--rce-epochs", "2"))
    tamper_snapshot(out / SNAPSHOT_NAME, how)
    result = cli("--resume", out, "--rce-epochs", "3")
    assert_user_error(result, fragment)


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda c: [c], "expected a JSON object, found list"),
        (lambda c: {**c, "options": None}, "entry 'options'"),
        (lambda c: {**c, "options": {**c["options"], "batch_size": "x"}}, "options.batch_size"),
        (lambda c: {**c, "options": {**c["options"], "seed": -4}}, "options.seed"),
        (lambda c: {**c, "options": {**c["options"], "rce_lr": -1}}, "options.rce_lr"),
        (lambda c: {**c, "policy": "pointer"}, "entry 'policy'"),
        (lambda c: {k: v for k, v in c.items() if k != "data_fingerprint"}, "data_fingerprint"),
    ],
    ids=["list", "no-options", "batch-size", "seed", "plugin-option", "policy", "fingerprint"],
)
def test_a_tampered_run_config_is_one_line(
    cli: Cli, finished: Path, edit: Callable[[dict[str, Any]], Any], fragment: str
) -> None:
    path = finished / "run_config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    assert_user_error(cli("--resume", finished), "run_config.json", fragment)


@pytest.mark.parametrize("where", ["a-directory", "under-a-file"])
def test_select_output_that_cannot_be_written(
    cli: Cli, demo_files: Files, finished: Path, tmp_path: Path, where: str
) -> None:
    output = tmp_path / "picks" if where == "a-directory" else finished / "resume.pt" / "x.json"
    if where == "a-directory":
        output.mkdir()
    result = cli(
        "select", "--ckpt", finished / "rce_epoch02.safetensors", "--beam-data", demo_files[0],
        "--img-emb", demo_files[1], "--output", output,
    )  # fmt: skip
    assert_user_error(result, "--output", str(output.parent if where != "a-directory" else output))


def test_sparse_embeddings_are_read_as_dense(cli: Cli, demo_files: Files, tmp_path: Path) -> None:
    dense = load_file(str(demo_files[1]))["embeddings"]
    sparse = tmp_path / "emb.pt"
    torch.save(dense.to_sparse(), sparse)
    out = tmp_path / "out"
    ok(train(cli, (demo_files[0], sparse), out))
    a = weights(out / "rce_epoch01.safetensors")
    ok(train(cli, demo_files, tmp_path / "dense"))
    b = weights(tmp_path / "dense" / "rce_epoch01.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)


class BadReward:
    """An RCE reward that fails (``raise``) or has the wrong shape (``shape``) at step 3."""

    def __init__(self, how: str) -> None:
        self.how, self.calls = how, 0

    @hookimpl
    def select_reward(self, phase: str) -> RewardChoice | None:
        def compute(batch):
            self.calls += 1
            if self.calls >= 3:
                if self.how == "raise":
                    raise ZeroDivisionError("division by zero")
                return batch.rewards_raw[:, 0]
            return batch.rewards_raw

        return RewardChoice("bad", "test", compute) if phase == "rce" else None


@pytest.mark.parametrize(("how", "fragment"), [("raise", "ZeroDivisionError"), ("shape", "[8]")])
def test_a_failing_reward_names_its_plugin_and_keeps_the_last_step(
    demo_files: Files, tmp_path: Path, how: str, fragment: str
) -> None:
    out = tmp_path / "run"
    trainer = make_trainer(demo_files, out, extra=(("bad-reward", BadReward(how)),),
                           enable=("bad-reward",))  # fmt: skip
    with pytest.raises(PluginError) as err:
        trainer.fit()
    assert str(err.value).startswith("plugin bad-reward: the reward chosen by its select_reward")
    assert fragment in str(err.value)
    snap = torch.load(out / SNAPSHOT_NAME, weights_only=True)
    assert (snap["phase"], snap["epoch"], snap["step_in_epoch"]) == ("rce", 1, 2)


class BadKL:
    """adapt_kl_beta answers a string (``type``) or raises (``raise``) at GRPO step 2."""

    def __init__(self, how: str) -> None:
        self.how, self.calls = how, 0

    @hookimpl
    def adapt_kl_beta(self, state, kl: float, beta: float) -> Any:
        self.calls += 1
        if self.calls < 2:
            return beta
        if self.how == "type":
            return "0.1"
        raise RuntimeError("kl hook broke")


@pytest.mark.parametrize(
    ("how", "fragment"), [("type", "returned str"), ("raise", "kl hook broke")]
)
def test_a_failing_kl_hook_names_its_plugin_and_leaves_a_consistent_snapshot(
    demo_files: Files, tmp_path: Path, how: str, fragment: str
) -> None:
    out = tmp_path / "run"
    trainer = make_trainer(
        demo_files, out, extra=(("bad-kl", BadKL(how)),), enable=("bad-kl",), grpo_epochs=1
    )
    with pytest.raises(PluginError) as err:
        trainer.fit()
    assert "plugin bad-kl" in str(err.value) and fragment in str(err.value)
    # the failure came after the step's update: the snapshot on disk is the last one that
    # matches a completed step (the end of RCE), not a half-done GRPO step
    snap = torch.load(out / SNAPSHOT_NAME, weights_only=True)
    assert (snap["phase"], snap["epoch"], snap["epoch_closed"]) == ("rce", 1, True)


@pytest.fixture
def hostile_dist(tmp_path: Path, monkeypatch) -> Iterator[Path]:
    """An installed distribution with misbehaving data readers, on this process's path."""
    root = tmp_path / "site"
    (root / "hostile_readers-1.0.dist-info").mkdir(parents=True)
    (root / "hostile_readers-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: hostile-readers\nVersion: 1.0\n"
    )
    (root / "hostile_readers-1.0.dist-info" / "entry_points.txt").write_text(
        "[lever_trainer]\nraising-reader = hostile_readers:raising\n"
        "shapeless-reader = hostile_readers:shapeless\n"
    )
    (root / "hostile_readers.py").write_text(
        "import json\n"
        "from lever_trainer.api import hookimpl\n"
        "class Reader:\n"
        "    def __init__(self, how):\n"
        "        self.how = how\n"
        "    @hookimpl\n"
        "    def read_rl_data(self, path):\n"
        "        members = json.loads(path.read_text())\n"
        "        for i, (key, value) in enumerate(members.items()):\n"
        "            if i == 2 and self.how == 'raise':\n"
        "                raise KeyError('pointer_candidates')\n"
        "            yield (key, value) if self.how == 'raise' else [key, value]\n"
        "raising = Reader('raise')\n"
        "shapeless = Reader('shape')\n"
    )
    monkeypatch.syspath_prepend(str(root))
    installed_plugins.cache_clear()
    yield root
    installed_plugins.cache_clear()


@pytest.mark.parametrize(
    ("plugin", "fragment"),
    [
        ("raising-reader", "failed while reading"),
        ("shapeless-reader", "expected a (query id string, query) pair"),
    ],
)
def test_a_failing_data_reader_names_its_plugin(
    cli: Cli, demo_files: Files, tmp_path: Path, hostile_dist: Path, plugin: str, fragment: str
) -> None:
    out = tmp_path / "out"
    result = train(cli, demo_files, out, "--plugin", plugin, "--no-cache")
    assert_user_error(result, f"plugin {plugin}: hook read_rl_data", fragment)
    assert not out.exists()


# ======================================================================= 11. quiet wrongness
def test_embeddings_of_width_zero_are_refused(cli: Cli, demo_files: Files, tmp_path: Path) -> None:
    emb = write_emb(tmp_path / "emb.pt", torch.zeros(200, 0))
    out = tmp_path / "out"
    assert_user_error(train(cli, (demo_files[0], emb), out), "emb.pt", "[200, 0]", "d >= 1")
    assert not out.exists()


def test_all_zero_embeddings_are_a_warning(cli: Cli, demo_files: Files, tmp_path: Path) -> None:
    emb = write_emb(tmp_path / "emb.safetensors", torch.zeros(200, 16))
    output = ok(train(cli, (demo_files[0], emb), tmp_path / "out"))
    assert "warning: " in output and "every candidate embedding the data uses is zero" in output
    assert "every query embedding the data uses is zero" in output


def test_best_metric_without_validation_is_refused_before_writing(
    cli: Cli, demo_files: Files, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = train(cli, demo_files, out, "--best-metric", "val_loss", "--val-ratio", "0")
    assert_user_error(result, "--best-metric val_loss", "no validation queries")
    assert not out.exists()
    ok(train(cli, demo_files, out, "--best-metric", "train_loss", "--val-ratio", "0",
             "--best-mode", "min"))  # fmt: skip
    assert read_metadata(out / "best.safetensors")["best_metric"] == "train_loss"


def test_an_unknown_best_metric_is_refused_before_writing(
    cli: Cli, demo_files: Files, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = train(cli, demo_files, out, "--best-metric", "accuracy")
    assert_user_error(result, "--best-metric: no metric named 'accuracy'", "val_loss")
    assert not out.exists()


def test_a_metric_of_a_later_phase_is_the_best_only_among_its_epochs(
    cli: Cli, demo_files: Files, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    output = ok(train(cli, demo_files, out, "--grpo-epochs", "2", "--best-metric", "kl_beta",
                      "--best-mode", "min"))  # fmt: skip
    assert "note: --best-metric kl_beta is not measured in phase rce" in output
    assert read_metadata(out / "best.safetensors")["phase"] == "grpo"


def test_resuming_after_an_epoch_end_failure_records_the_epoch_once(
    demo_files: Files, tmp_path: Path
) -> None:
    class FailsOnce:
        failed = False

        @hookimpl
        def on_epoch_end(self, state, metrics) -> None:
            if not FailsOnce.failed:
                FailsOnce.failed = True
                raise OSError("disk full")

    out = tmp_path / "run"
    first = make_trainer(demo_files, out, extra=(("flaky", FailsOnce()),), enable=("flaky",),
                         rce_epochs=2)  # fmt: skip
    with pytest.raises(PluginError, match="plugin flaky failed in hook on_epoch_end"):
        first.fit()
    snap = torch.load(out / SNAPSHOT_NAME, weights_only=True)
    second = make_trainer(demo_files, out, rce_epochs=2)
    second.fit(resume=snap)
    assert [(h["phase"], h["epoch"]) for h in second.state.history] == [("rce", 1), ("rce", 2)]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1, 2]  # epoch 0: the start


def test_metrics_jsonl_is_strict_json(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from lever_trainer_plugins import metrics_jsonl

    history = [{"phase": "rce", "epoch": 1, "val_loss": float("nan"), "spearman": float("inf")}]
    state = SimpleNamespace(history=history, output_dir=tmp_path, start_metrics=None)
    metrics_jsonl.on_epoch_end(state, history[0])  # type: ignore[arg-type]

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    line = (tmp_path / "metrics.jsonl").read_text().strip()
    assert json.loads(line, parse_constant=refuse) == {
        "phase": "rce", "epoch": 1, "val_loss": None, "spearman": None,
    }  # fmt: skip


def test_a_normaliser_must_answer_one_value_per_candidate(tmp_path: Path) -> None:
    registry = builtin_registry()
    extra = RewardRegistry()
    extra.add("normalizer", "lazy-norm", {"mean-only": lambda r, p: r.mean()})
    registry.normalizers.update(extra.normalizers)
    registry.providers.update(extra.providers)
    path = write_json(tmp_path / "rl.json", tiny_data(correct=1))
    with pytest.raises(PluginError) as err:
        load_rl_data(path, DataOptions(normalize="mean-only"), registry)
    message = str(err.value)
    assert "normaliser 'mean-only' (plugin lazy-norm)" in message
    assert "shape []" in message and "shape [2]" in message


def test_a_wrong_select_reward_answer_names_the_plugin(demo_files: Files, tmp_path: Path) -> None:
    class Wrong:
        @hookimpl
        def select_reward(self, phase: str) -> Any:
            return "rewards_raw" if phase == "rce" else None

    trainer = make_trainer(demo_files, tmp_path / "run", extra=(("wrong", Wrong()),),
                           enable=("wrong",))  # fmt: skip
    with pytest.raises(PluginError, match="plugin wrong: hook select_reward returned str"):
        trainer.fit()


@pytest.fixture
def clashing_dist(tmp_path: Path, monkeypatch) -> Iterator[Path]:
    """A third-party distribution that registers a plugin under the built-in name ``rce``."""
    root = tmp_path / "clash"
    info = root / "evil_rce-6.6.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: evil-rce\nVersion: 6.6\n")
    (info / "entry_points.txt").write_text("[lever_trainer]\nrce = evil_rce\n")
    (root / "evil_rce.py").write_text("DESCRIPTION = 'not the real rce'\n")
    monkeypatch.syspath_prepend(str(root))
    installed_plugins.cache_clear()
    yield root
    installed_plugins.cache_clear()


def test_a_package_claiming_a_builtin_name_is_an_error_naming_both(
    cli: Cli, demo_files: Files, tmp_path: Path, clashing_dist: Path
) -> None:
    with pytest.raises(PluginError) as err:
        load_plugins()
    message = str(err.value)
    assert message.startswith("plugin rce: plugin name 'rce' is claimed by two installed")
    assert "lever-trainer" in message and "evil-rce 6.6" in message
    out = tmp_path / "out"
    assert_user_error(train(cli, demo_files, out), "plugin rce", "evil-rce", "lever-trainer")
    assert not out.exists()
    listing = cli("plugins").output
    assert "BROKEN: plugin name 'rce' is claimed by two installed distributions" in listing


# ======================================================= 12. files others can read
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_are_created_with_the_umask(
    cli: Cli, demo_files: Files, tmp_path: Path, umask: int
) -> None:
    old = os.umask(umask)
    try:
        out = tmp_path / "out"
        ok(train(cli, demo_files, out, "--best-metric", "val_loss"))
        picks = tmp_path / "picks.json"
        ok(cli("select", "--ckpt", out / "rce_epoch01.safetensors", "--beam-data", demo_files[0],
               "--img-emb", demo_files[1], "--output", picks))  # fmt: skip
    finally:
        os.umask(old)
    files = [*out.iterdir(), picks, Path(str(demo_files[0]) + ".lever-cache.safetensors")]
    assert len(files) == 8  # 6 run files (steps.jsonl among them), the picks, the cache
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


# ============================================================== --cache-dir
def test_cache_dir_keeps_the_prepared_form_away_from_the_data(
    cli: Cli, demo_files: Files, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    data = demo_files[0]
    digest = sha256(data)
    out = ok(cli("prepare", "--beam-data", data, "--cache-dir", cache))
    prepared = cache / f"rl_data.json.{digest[:16]}.lever-cache.safetensors"
    assert f"prepared cache: wrote {prepared}" in out
    assert sorted(p.name for p in data.parent.iterdir()) == sorted(
        [data.name, demo_files[1].name]
    )  # nothing beside the data
    output = ok(train(cli, demo_files, tmp_path / "run", "--cache-dir", cache))
    assert f"prepared cache: read {prepared}" in output
    assert os.listdir(cache) == [prepared.name]


# ============================================ a relative path option repeated on --resume
class PathOptionPlugin:
    """Declares one option of type ``path``."""

    @hookimpl
    def add_options(self) -> list[Any]:
        from lever_trainer.options import Option

        return [Option(("--ref-file",), type="path")]


def test_a_relative_path_option_repeated_on_resume_is_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lever_trainer.phase import Phase
    from lever_trainer.resuming import path_options, plan_resume

    class Rce(Phase):
        name = "rce"

        def epochs(self, state: Any) -> int:
            return 2

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ref.json").write_text("{}")
    plugins = load_plugins(enable=("pathy",), extra=(("pathy", PathOptionPlugin()),))
    assert {"ref_file", "cache_dir", "beam_data"} <= path_options(plugins)
    recorded = {"ref_file": str(tmp_path / "ref.json"), "cache_dir": str(tmp_path / "cache")}
    now = {"ref_file": "ref.json", "cache_dir": "cache"}
    given = {"ref_file": "--ref-file", "cache_dir": "--cache-dir"}
    snap = {"phase": "rce", "epoch": 1, "epoch_closed": True}
    plan = plan_resume(recorded, now, given, plugins, [Rce()], snap, tmp_path)
    assert plan.changed == {} and plan.lines == [] and plan.complete is None
    assert plan.options == recorded

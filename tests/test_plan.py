"""Planning a run is pure: settings in, a description out, without torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing

import pytest

from lever_trainer.coreoptions import CORE_OPTIONS, DEFAULT_POLICY, RUN_COMMANDS
from lever_trainer.errors import LeverError
from lever_trainer.plan import POLICY_OPTIONS, Settings, core_dests, plan_run

REQUIRED = {"beam_data": "d.json", "img_emb": "e.npy", "output_dir": "out"}


def test_planning_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "from lever_trainer.plan import Settings, plan_run\n"
        "s = Settings.from_options('train', {'beam_data': 'd.json', 'img_emb': 'e.npy',"
        " 'output_dir': 'out', 'seed': 3})\n"
        "plan = plan_run(s, {'seed': '--seed'})\n"
        "assert plan.split_seed == 3, plan\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_settings_fields_are_the_tables_dests_with_their_types() -> None:
    hints = typing.get_type_hints(Settings)
    fields = [f.name for f in dataclasses.fields(Settings) if f.name != "plugin_values"]
    assert fields == core_dests()
    kinds = {"int": int, "float": float, "str": str, "bool": bool, "choice": str, "path": str}
    for option in CORE_OPTIONS:
        if not set(option.commands) & set(RUN_COMMANDS):
            continue  # the smaller commands (plot, demo-data, ...) take their own
        hint = hints[option.dest]
        if option.multiple:
            assert hint == tuple[str, ...], option.dest
            continue
        allowed = set(typing.get_args(hint)) or {hint}
        assert kinds[option.type] in allowed, (option.dest, hint)
        if option.default is None and option.type != "bool":
            assert type(None) in allowed, f"{option.dest} may be unset but is typed {hint}"


def test_from_options_fills_each_commands_defaults() -> None:
    train = Settings.from_options("train", {})
    select = Settings.from_options("select", {})
    assert (train.batch_size, select.batch_size) == (32, 512)  # per optimiser step / pass
    assert train.device == select.device == "auto"
    assert train.policy == DEFAULT_POLICY
    given = Settings.from_options("train", {"plugins_on": ["a"], "rce_epochs": 3})
    assert given.plugins_on == ("a",)
    assert given.plugin_values == {"rce_epochs": 3}
    with pytest.raises(dataclasses.FrozenInstanceError):
        given.seed = 1  # type: ignore[misc]


def test_plan_checks_required_options_and_lists() -> None:
    with pytest.raises(LeverError, match="missing option --img-emb"):
        plan_run(Settings.from_options("train", {"beam_data": "d.json"}), {})
    with pytest.raises(LeverError, match="--gen-methods"):
        plan_run(Settings.from_options("train", {**REQUIRED, "gen_methods": " , "}), {})


def test_plan_describes_the_run() -> None:
    s = Settings.from_options(
        "train",
        {**REQUIRED, "plugins_on": ["rloo", "rloo"], "hidden_dim": 8},
    )
    plan = plan_run(s, {"hidden_dim": "--hidden-dim"})
    assert plan.enable == ("rloo",)
    assert plan.policy == DEFAULT_POLICY
    assert dict(plan.policy_given) == {"hidden_dim": "--hidden-dim"}
    assert plan.split_seed == 42  # --val-split random, no --split-seed: --seed
    # from a checkpoint without --policy: the checkpoint's own policy (decided later)
    sft = plan_run(s.replace(sft_ckpt="a.safetensors"), {})
    assert sft.policy is None
    assert plan_run(s.replace(val_split="last"), {}).split_seed is None
    assert plan.train_config("cpu").batch_size == 32


def test_policy_options_are_the_trunks() -> None:
    from lever_trainer.policy import TrunkConfig

    assert set(POLICY_OPTIONS) == set(TrunkConfig.field_names()) - {"input_dim"}

"""Config files, presets, environment variables and --print-config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomllib
from conftest import assert_user_error

from lever_trainer.config import merge_lists, preset_names

#: The settings of the reference algorithm (docs/algorithm.md#reference-settings), written out by hand.
REFERENCE_VALUES = {
    # RCE
    "rce_epochs": 5,
    "rce_lr": 1e-4,
    "rce_temp_start": 2.0,
    "rce_temp_end": 0.5,
    "weight_decay": 0.01,
    "grad_clip": 1.0,
    # GRPO
    "grpo_lr": 1e-5,
    "clip_epsilon": 0.2,
    "kl_beta": 0.1,
    "advantage_clip": 5.0,
    "early_epochs": 1,
    "early_top_k": 3,
    "late_top_k": 5,
    # "a batch of one query is exactly the reference implementation"
    "batch_size": 1,
    # the pointer policy
    "policy": "pointer",
    "hidden_dim": 256,
    "num_layers": 1,
    "num_heads": 1,
    "dropout": 0.5,
    "attn_dropout": 0.1,
    "temperature": 0.1,
    # data and rewards
    "max_pool": 64,
    "val_ratio": 0.2,
    # the reference validates on the last ids in numeric order, independent of the seed
    "val_split": "last",
    "reward_mode": "hard_plus_soft",
    "hard_weight": 1.0,
    "soft_weight": 1.0,
    "rel_weight": 0.1,
    "normalize": "z_score_clamp",
    "normalize_clamp": 3.0,
}
#: The plugins that are reference behaviour, and the variants the reference does not use.
REFERENCE_PLUGINS_ON = {
    "rce",
    "grpo",
    "raw-reward",
    "grpo-normalized-reward",
    "grpo-curriculum",
    "group-zscore",
    "adaptive-kl",
}
REFERENCE_PLUGINS_OFF = {"grpo-reference-refresh", "normalized-reward", "freeze-backbone"}
PRESET = Path(__file__).resolve().parents[1] / "lever_trainer" / "presets" / "upstream.toml"


def printed(result) -> dict:
    """The TOML that --print-config printed."""
    assert result.exit_code == 0, result.output
    return tomllib.loads(result.output)


def data_args(files: tuple[Path, Path]) -> list[str]:
    return ["--beam-data", str(files[0]), "--img-emb", str(files[1])]


def small_run(files: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    return [
        *data_args(files),
        "--output-dir",
        str(out),
        "--rce-epochs",
        "1",
        "--batch-size",
        "8",
        "--hidden-dim",
        "16",
        *extra,
    ]


def test_upstream_preset_pins_every_spec_setting_in_the_file() -> None:
    """Pinned in the file itself, so a change of the project's defaults cannot move it."""
    data = tomllib.loads(PRESET.read_text())
    spelled = {k.replace("-", "_") for k in data}
    spelled |= {"temperature"} if "policy-temperature" in data else set()
    spelled |= {"normalize_clamp"} if "normalize-clamp-value" in data else set()
    assert set(REFERENCE_VALUES) <= spelled, set(REFERENCE_VALUES) - spelled
    assert REFERENCE_PLUGINS_ON <= set(data["plugin"])
    assert REFERENCE_PLUGINS_OFF <= set(data["no-plugin"])
    assert "upstream" in preset_names()


def test_preset_upstream_resolves_to_the_spec_values(cli, demo_files) -> None:
    shown = printed(cli("--preset", "upstream", "--print-config", *data_args(demo_files)))
    flags = {
        "temperature": "policy-temperature",
        "normalize_clamp": "normalize-clamp-value",
    }
    for dest, value in REFERENCE_VALUES.items():
        key = flags.get(dest, dest.replace("_", "-"))
        assert shown[key] == value, (key, shown.get(key), value)
    assert REFERENCE_PLUGINS_ON <= set(shown["plugin"])
    assert REFERENCE_PLUGINS_OFF <= set(shown["no-plugin"])


def test_a_run_with_the_preset_records_the_spec_values(cli, demo_files, tmp_path) -> None:
    out = tmp_path / "run"
    result = cli("--preset", "upstream", *small_run(demo_files, out, "--hidden-dim", "256"))
    assert result.exit_code == 0, result.output
    config = json.loads((out / "run_config.json").read_text())
    expected = {**REFERENCE_VALUES, "rce_epochs": 1, "batch_size": 8}  # the two given here
    for dest, value in expected.items():
        assert config["options"][dest] == value, dest
    assert config["policy"]["options"]["dropout"] == 0.5
    assert "grpo-reference-refresh" not in config["plugins"]
    assert "RCE reward: raw (beam_rewards_raw) [explicit]" in result.output
    # preset values are not "given": only the command line's options are
    assert set(config["given"]) == {
        "beam_data",
        "img_emb",
        "output_dir",
        "rce_epochs",
        "batch_size",
        "hidden_dim",
    }


def test_precedence_command_line_env_config_preset_default(
    cli, demo_files, tmp_path, monkeypatch
) -> None:
    config = tmp_path / "c.toml"
    config.write_text("rce-lr = 2e-4\nrce_temp_end = 0.25\nseed = 7\nkl-beta = 0.3\n")
    base = ["--preset", "upstream", "--config", str(config), "--print-config"]
    monkeypatch.setenv("LEVER_TRAIN_RCE_LR", "3e-4")
    monkeypatch.setenv("LEVER_TRAIN_SEED", "8")
    result = cli(*base, *data_args(demo_files), "--rce-lr", "4e-4")
    shown = printed(result)
    assert shown["rce-lr"] == 4e-4  # command line over environment
    assert shown["seed"] == 8  # environment over config
    assert shown["rce-temp-end"] == 0.25  # config over preset (0.5)
    assert shown["grpo-lr"] == 1e-5  # preset
    assert shown["kl-beta"] == 0.3
    assert shown["max-bad-steps"] == 10  # default
    lines = {ln.split(" = ")[0]: ln for ln in result.output.splitlines() if " = " in ln}
    assert lines["rce-lr"].endswith("# command line")
    assert lines["seed"].endswith("# environment LEVER_TRAIN_SEED")
    assert lines["rce-temp-end"].endswith(f"# --config {config}")
    assert lines["grpo-lr"].endswith("# --preset upstream")
    assert lines["max-bad-steps"].endswith("# default")


def test_plugin_options_from_the_environment(cli, demo_files, monkeypatch) -> None:
    monkeypatch.setenv("LEVER_TRAIN_LATE_TOP_K", "4")
    monkeypatch.setenv("LEVER_TRAIN_PLUGINS_ON", "freeze-backbone grpo-reference-refresh")
    shown = printed(cli("--print-config", *data_args(demo_files)))
    assert shown["late-top-k"] == 4
    assert shown["plugin"] == ["freeze-backbone", "grpo-reference-refresh"]


def test_print_config_is_a_config_that_gives_the_same_configuration(
    cli, demo_files, tmp_path
) -> None:
    args = ["--preset", "upstream", "--rce-lr", "5e-4", "--plugin", "freeze-backbone"]
    first = cli(*args, *data_args(demo_files), "--print-config")
    saved = tmp_path / "printed.toml"
    saved.write_text(first.output)
    again = cli("--config", str(saved), "--print-config")
    assert printed(again) == printed(first)


def test_config_tables_json_and_a_preset_key(cli, demo_files, tmp_path) -> None:
    toml = tmp_path / "a.toml"
    toml.write_text(
        'preset = "upstream"\n[rce]\nlr = 1e-3\nrce-epochs = 7\n[grpo]\nkl-beta = 0.2\n'
    )
    shown = printed(cli("--config", str(toml), "--print-config", *data_args(demo_files)))
    assert (shown["rce-lr"], shown["rce-epochs"], shown["kl-beta"]) == (1e-3, 7, 0.2)
    assert shown["batch-size"] == 1  # from the preset the config names
    js = tmp_path / "a.json"
    js.write_text(json.dumps({"rce_lr": 2e-3, "plugin": ["freeze-backbone"], "no-cache": True}))
    shown = printed(cli("--config", str(js), "--print-config", *data_args(demo_files)))
    assert (shown["rce-lr"], shown["plugin"], shown["no-cache"]) == (
        2e-3,
        ["freeze-backbone"],
        True,
    )


@pytest.mark.parametrize(
    ("text", "suffix", "fragments"),
    [
        ("rce_lrr = 1e-3\n", ".toml", ["unknown option 'rce_lrr'", "did you mean 'rce_lr'"]),
        (
            '{"grpo-epoch": 2}',
            ".json",
            ["unknown option 'grpo-epoch'", "did you mean 'grpo-epochs'"],
        ),
        ("[rce]\nlrate = 1\n", ".toml", ["unknown option 'rce.lrate'"]),
        ("rce-lr = \n", ".toml", ["invalid TOML"]),
        ('{"rce_lr": }', ".json", ["invalid JSON at line 1"]),
        ("[1, 2]", ".json", ["expected a table of option names"]),
        ('rce-lr = "fast"\n', ".toml", ["rce-lr", "'fast' is not a valid float"]),
        ("rce-epochs = -1\n", ".toml", ["rce-epochs", "-1 is not in"]),
        ("plugin = [[1]]\n", ".toml", ["plugin", "expected a list of names"]),
        ('config = "other.toml"\n', ".toml", ["a config file cannot set 'config'"]),
        (
            'preset = "upstreem"\n',
            ".toml",
            ["unknown preset 'upstreem'", "did you mean 'upstream'"],
        ),
    ],
)
def test_bad_config_is_one_error_naming_file_and_key(
    cli, demo_files, tmp_path, text, suffix, fragments
) -> None:
    config = tmp_path / f"bad{suffix}"
    config.write_text(text)
    out = tmp_path / "run"
    result = cli("--config", str(config), *small_run(demo_files, out))
    assert_user_error(result, *fragments)
    if "preset" not in text:
        assert str(config) in result.output
    assert not out.exists()


def test_missing_config_and_unknown_preset(cli, demo_files, tmp_path) -> None:
    result = cli("--config", str(tmp_path / "none.toml"), *small_run(demo_files, tmp_path / "r"))
    assert_user_error(result, "--config", "none.toml", "does not exist")
    result = cli("--preset", "nope", *small_run(demo_files, tmp_path / "r"))
    assert_user_error(result, "--preset", "unknown preset 'nope'", "upstream")


def test_relative_paths_in_a_config_are_relative_to_the_file(
    cli, demo_files, tmp_path, monkeypatch
) -> None:
    folder = tmp_path / "configs"
    folder.mkdir()
    data, emb = demo_files
    (folder / "run.toml").write_text(
        f'beam-data = "../{data.relative_to(tmp_path)}"\n'
        f'img-emb = "../{emb.relative_to(tmp_path)}"\n'
        'output-dir = "../runs/a"\nrce-epochs = 1\nbatch-size = 8\nhidden-dim = 16\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = cli("--config", str(folder / "run.toml"))
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "runs" / "a" / "run_config.json").read_text())
    assert config["options"]["beam_data"] == str(data)  # stored absolute
    assert config["options"]["output_dir"] == str(tmp_path / "runs" / "a")
    assert not (elsewhere / "runs").exists()


def test_run_config_repeats_a_run_with_one_change(cli, demo_files, tmp_path, monkeypatch) -> None:
    first = tmp_path / "a"
    result = cli(*small_run(demo_files, first, "--plugin", "freeze-backbone", "--rce-lr", "3e-3"))
    assert result.exit_code == 0, result.output
    monkeypatch.chdir(tmp_path.parent)  # paths in it are absolute: any folder works
    recorded = first / "run_config.json"
    result = cli("--config", str(recorded), "--seed", "2")
    assert_user_error(result, "missing option --output-dir")  # never the first run's folder
    second = tmp_path / "b"
    result = cli("--config", str(recorded), "--seed", "2", "--output-dir", str(second))
    assert result.exit_code == 0, result.output
    a = json.loads(recorded.read_text())
    b = json.loads((second / "run_config.json").read_text())
    changed = {k for k in a["options"] if a["options"][k] != b["options"].get(k)}
    assert changed == {"seed", "output_dir", "config"}
    assert b["options"]["rce_lr"] == 3e-3 and "freeze-backbone" in b["plugins"]
    assert set(b["given"]) >= {"seed", "output_dir", "rce_lr", "plugins_on"}
    assert "seed" not in a["given"] and "max_pool" not in b["given"]


def test_plugin_lists_add_up_over_preset_config_and_command_line(cli, demo_files, tmp_path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('plugin = ["freeze-backbone"]\n')
    shown = printed(
        cli(
            "--preset",
            "upstream",
            "--config",
            str(config),
            "--plugin",
            "grpo-reference-refresh",
            "--print-config",
            *data_args(demo_files),
        )
    )
    assert {"freeze-backbone", "grpo-reference-refresh", "raw-reward"} <= set(shown["plugin"])
    assert "grpo-reference-refresh" not in shown["no-plugin"]
    assert "freeze-backbone" not in shown["no-plugin"]


def test_merge_lists_later_layers_cancel_earlier_ones() -> None:
    on, off = merge_lists([(["a", "b"], ["c"]), (["c"], ["a"]), (None, None)])
    assert (on, off) == (["b", "c"], ["a"])

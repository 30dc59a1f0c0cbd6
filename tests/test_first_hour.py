"""The first hour of a new user: mistakes are one line, early, and say what to do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lever_digits_env
import pytest
from conftest import assert_user_error, write_json

from lever_trainer.checkpoint import save_checkpoint

FILES = lever_digits_env.files()


def lever_train(*args: str, env: dict[str, str]) -> tuple[int, str, set[str]]:
    """``lever-train ARGS`` in a fresh process: exit status, stderr, imported modules."""
    code = (
        "import sys\nfrom lever_trainer.cli import main\n"
        "try:\n    main(prog_name='lever-train')\nexcept SystemExit as e:\n"
        "    sys.stderr.write('\\nMODULES ' + ' '.join(sorted(sys.modules)))\n    raise\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    err, _, modules = done.stderr.rpartition("\nMODULES ")
    return done.returncode, err, set(modules.split())


def test_option_mistakes_are_one_line_before_torch_is_imported(tmp_path, demo_files) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    rc, _, _ = lever_train("plugins", env=env)  # any command that discovers writes the cache
    data, emb = map(str, demo_files)
    run = ["--beam-data", data, "--img-emb", emb, "--output-dir", str(tmp_path / "out")]
    cases = [
        (["--rce-epochs", "x"], "error: --rce-epochs: 'x' is not a valid int"),
        ([*run, "--plugin", "nope"], "error: --plugin: unknown plugin 'nope'"),
        ([*run, "--no-plugin", "nope"], "error: --no-plugin: unknown plugin 'nope'"),
        (
            [*run, "--rce_use_raw_reward", "--rce_use_normalized_reward"],
            "error: --plugin normalized-reward or --rce_use_normalized_reward and --plugin "
            "raw-reward or --rce_use_raw_reward both choose the RCE reward; give only one",
        ),
        (
            ["--beam-data", str(tmp_path / "missing.json"), *run[2:]],
            f"error: {tmp_path / 'missing.json'}: file not found",
        ),
        (["--beam-data", data, "--output-dir", "x"], "error: missing option --img-emb"),
    ]
    for args, expected in cases:
        rc, err, modules = lever_train(*args, env=env)
        assert rc == 2, (args, err)
        assert err.strip().splitlines() == [err.strip().splitlines()[0]], err  # one line
        assert err.strip().startswith(expected), (args, err)
        assert "torch" not in modules, args
        # no plugin module (the package itself is found, not run: its __init__ holds only a docstring)
        assert not any(m.startswith("lever_trainer_plugins.") for m in modules), args
    assert not (tmp_path / "out").exists()
    rc, err, modules = lever_train(*run, env={**env, "LEVER_TRAIN_RCE_EPOCHS": "x"})
    assert rc == 2 and "torch" not in modules
    assert err.strip() == (
        "error: environment variable LEVER_TRAIN_RCE_EPOCHS (--rce-epochs): 'x' is not a valid int"
    )


@pytest.mark.parametrize(
    ("first", "second", "hook"),
    [
        ("group-center", "rloo", "compute_advantages"),
        ("clip-higher", "dual-clip", "policy_objective"),  # both read options from state
    ],
)
def test_conflicting_plugins_are_refused_before_training(
    cli, demo_files, tmp_path, first, second, hook
) -> None:
    data, emb = demo_files
    out = tmp_path / "out"
    result = cli(
        "--beam-data", data, "--img-emb", emb, "--output-dir", out,
        "--plugin", first, "--plugin", second, "--rce-epochs", "2", "--grpo-epochs", "1",
    )  # fmt: skip
    assert_user_error(result, first, second, f"both answer hook {hook}")
    assert "rce epoch" not in result.output  # nothing trained
    assert "resume with" not in result.output  # there is nothing to resume
    assert not (out / "resume.pt").exists() and not list(out.glob("*.safetensors"))
    # one of them named, over the default one: fine
    result = cli(
        "--beam-data", data, "--img-emb", emb, "--output-dir", out, "--plugin", second,
        "--rce-epochs", "1", "--grpo-epochs", "1", "--overwrite",
    )  # fmt: skip
    assert result.exit_code == 0, result.output


def test_select_says_a_snapshot_is_not_a_checkpoint(cli, tmp_path) -> None:
    snapshot = tmp_path / "run" / "resume.pt"
    snapshot.parent.mkdir()
    snapshot.write_bytes(b"not read")
    queries = write_json(tmp_path / "q.json", {"1": [2, 3, 4]})
    result = cli(
        "select", "--ckpt", snapshot, "--queries", queries, "--img-emb", FILES["embeddings"],
        "--output", tmp_path / "picks.json",
    )  # fmt: skip
    assert_user_error(result, "--ckpt", "resume snapshot", "not a checkpoint", "best.safetensors")


def test_evaluate_on_pools_only_needs_a_judge(cli, tmp_path) -> None:
    from lever_trainer_plugins.policy_bilinear import CosineBilinearPolicy

    model = CosineBilinearPolicy(32, 2, 0.1, "reverse")
    ckpt = tmp_path / "c.safetensors"
    meta = {"name": "cosine-bilinear", "input_dim": 32, "options": model.policy_options()}
    save_checkpoint(ckpt, model.state_dict(), {"policy": meta})
    test = json.loads(Path(FILES["test"]).read_text())
    qids = sorted(k for k in test if k.isdigit())[:4]
    queries = write_json(tmp_path / "q.json", {q: test[q]["candidate_pool_ids"] for q in qids})
    result = cli("evaluate", ckpt, "--queries", queries, "--img-emb", FILES["embeddings"])
    assert_user_error(result, "pools only", "--judge")


def test_completion_of_plugin_options_survives_a_training_run(tmp_path, demo_files) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    lever_train("plugins", env=env)
    data, emb = map(str, demo_files)
    rc, err, _ = lever_train(
        "--beam-data", data, "--img-emb", emb, "--output-dir", str(tmp_path / "out"),
        "--rce-epochs", "1", "--grpo-epochs", "0", env={**env, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert rc == 0, err
    words = {"COMP_WORDS": "lever-train train --rce-e", "COMP_CWORD": "2"}
    done = subprocess.run(
        [sys.executable, "-c", "from lever_trainer.cli import main; main(prog_name='lever-train')"],
        env={**os.environ, **env, **words, "_LEVER_TRAIN_COMPLETE": "bash_complete"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.stdout.split() == ["plain,--rce-epochs"], done.stderr


def test_the_option_cache_goes_stale_when_any_module_of_a_plugins_package_changes(
    tmp_path, monkeypatch
) -> None:
    """Commands trust the cache for their flags, so it must not outlive an edit to a
    module a plugin takes its options from."""
    import importlib.metadata as md

    from lever_trainer import completion, entrypoints

    package = tmp_path / "site" / "somepkg"
    package.mkdir(parents=True)
    for name in ("__init__.py", "plugin.py", "shared.py"):
        (package / name).write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    ep = md.EntryPoint("some", "somepkg.plugin:obj", entrypoints.ENTRY_POINT_GROUP)
    monkeypatch.setattr(entrypoints, "installed", lambda: [entrypoints.Installed(ep, "d", "1")])
    before = completion.fingerprint()
    assert completion.fingerprint() == before  # stable while nothing changes
    shared = package / "shared.py"
    stat = shared.stat()
    os.utime(shared, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # edited a second later
    assert completion.fingerprint() != before

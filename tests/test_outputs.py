"""Files the user names for output, and files inside a run directory: a pipe or a device is
written in place (never replaced by a file), ``-`` is standard output, a name ending in
``/`` is a directory, and nothing is ever written through a symbolic link."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import lever_digits_env
import pytest
from conftest import assert_user_error, write_json
from test_select_evaluate import QIDS, cosine_pair, pools_of

from lever_trainer.checkpoint import save_checkpoint
from lever_trainer.errors import LeverError
from lever_trainer.fileio import STDOUT, STREAM, append_text, output_kind, write_output
from lever_trainer.rundir import RunLock
from lever_trainer_plugins.policy_bilinear import CosineBilinearPolicy

FILES = lever_digits_env.files()


@pytest.fixture
def untrained(tmp_path: Path) -> Path:
    model = CosineBilinearPolicy(32, 2, 0.1, "reverse")
    path = tmp_path / "untrained.safetensors"
    save_checkpoint(
        path,
        model.state_dict(),
        {"policy": {"name": "cosine-bilinear", "input_dim": 32, "options": model.policy_options()}},
    )
    return path


def select_args(untrained: Path, queries: Path, output: str) -> list[str]:
    return [
        "select",
        "--ckpt",
        str(untrained),
        "--queries",
        str(queries),
        "--img-emb",
        str(FILES["embeddings"]),
        "--output",
        output,
    ]


def expected_picks() -> dict[str, list[int]]:
    return {q: cosine_pair(int(q), p)[::-1] for q, p in pools_of(QIDS).items()}


def test_select_into_a_fifo_feeds_its_reader_and_leaves_it_a_fifo(cli, tmp_path, untrained) -> None:
    queries = write_json(tmp_path / "q.json", pools_of(QIDS))
    fifo = tmp_path / "picks.pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    result = cli(*select_args(untrained, queries, str(fifo)))
    reader.join(timeout=30)
    assert result.exit_code == 0, result.output
    assert fifo.is_fifo()  # not replaced by a regular file
    assert json.loads(received[0]) == expected_picks()


def test_output_to_a_character_device_is_written_in_place(cli, tmp_path, untrained) -> None:
    """``/dev/null`` stays the device (the atomic writer would rename a file over it)."""
    assert output_kind("/dev/null", "--output") == STREAM
    before = os.stat("/dev/null")
    write_output("/dev/null", b"{}\n", "--output")
    after = os.stat("/dev/null")
    assert (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)
    queries = write_json(tmp_path / "q.json", pools_of(QIDS))
    result = cli(*select_args(untrained, queries, "/dev/null"))
    assert result.exit_code == 0, result.output
    assert os.stat("/dev/null").st_ino == before.st_ino


def test_dash_is_standard_output_and_messages_go_to_stderr(tmp_path, untrained) -> None:
    import inspect

    from click.testing import CliRunner

    from lever_trainer.cli import main

    # click < 8.2 mixes stderr into stdout unless told not to; 8.2 keeps them apart
    apart = {"mix_stderr": False} if "mix_stderr" in inspect.signature(CliRunner).parameters else {}
    queries = write_json(tmp_path / "q.json", pools_of(QIDS))
    result = CliRunner(**apart).invoke(main, select_args(untrained, queries, "-"))
    assert result.exit_code == 0, result.output + result.stderr
    assert json.loads(result.stdout) == expected_picks()
    assert "wrote 6 selections to standard output" in result.stderr
    assert not (Path.cwd() / "-").exists() and not (tmp_path / "-").exists()
    assert output_kind("-", "--output") == STDOUT


def test_select_jsonl_streams_in_file_order(cli, tmp_path, untrained) -> None:
    pools = pools_of(QIDS[::-1])
    queries = tmp_path / "q.jsonl"
    queries.write_text(
        "".join(json.dumps({"query_id": int(q), "pool": p}) + "\n" for q, p in pools.items())
    )
    out = tmp_path / "picks.jsonl"
    result = cli(*select_args(untrained, queries, str(out)))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["query_id"] for r in rows] == [int(q) for q in pools]
    assert {str(r["query_id"]): r["ids"] for r in rows} == expected_picks()


def test_a_failure_midway_keeps_the_previous_output(cli, tmp_path, untrained) -> None:
    """A bad query after the first piece: one line, and the old file is untouched."""
    pools = {str(q): list(range(1000, 1010)) for q in range(1100)}
    pools["1099"] = [1000]  # too short for 2 shots, met only in the second piece
    queries = write_json(tmp_path / "q.json", pools)
    out = tmp_path / "picks.json"
    out.write_text("previous\n")
    result = cli(*select_args(untrained, queries, str(out)))
    assert_user_error(result, "--shots 2", "query 1099")
    assert out.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".picks")] == []


@pytest.mark.parametrize("command", ["select", "evaluate", "export-verdicts"])
def test_output_naming_a_directory_is_refused(cli, tmp_path, untrained, command) -> None:
    queries = write_json(tmp_path / "q.json", pools_of(QIDS))
    target = str(tmp_path / "newdir") + "/"
    if command == "select":
        args = select_args(untrained, queries, target)
    elif command == "evaluate":
        args = [
            "evaluate",
            str(untrained),
            "--queries",
            str(queries),
            "--img-emb",
            str(FILES["embeddings"]),
            "--baselines",
            "",
            "--output",
            target,
        ]
    else:
        from lever_trainer.judge import VERDICT_FIELDS, VerdictStore

        store = VerdictStore(tmp_path / "v.sqlite")
        store.put("digits", "1", [(1, "2,3", dict.fromkeys(VERDICT_FIELDS, 1.0))])
        store.close()
        args = ["export-verdicts", "--store", str(tmp_path / "v.sqlite"), "--judge", "digits"]
        args += ["--output", target]
    result = cli(*args)
    assert_user_error(result, "--output", "newdir/", "names a directory")
    assert not (tmp_path / "newdir").exists()


def test_output_through_a_symbolic_link_is_refused(cli, tmp_path, untrained) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me\n")
    link = tmp_path / "picks.json"
    link.symlink_to(precious)
    queries = write_json(tmp_path / "q.json", pools_of(QIDS))
    result = cli(*select_args(untrained, queries, str(link)))
    assert_user_error(result, "--output", "symbolic link", "precious.txt")
    assert precious.read_text() == "keep me\n" and link.is_symlink()
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "nowhere.json")
    with pytest.raises(LeverError, match="does not exist"):
        output_kind(dangling, "--output")
    assert not (tmp_path / "nowhere.json").exists()


def test_a_socket_is_refused(tmp_path) -> None:
    import socket

    path = tmp_path / "s.sock"
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(path))
        with pytest.raises(LeverError, match=r"--output: .*s\.sock is a socket"):
            output_kind(path, "--output")
    finally:
        sock.close()


def test_run_lock_never_writes_through_a_link(tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me\n")
    (run / ".lock").symlink_to(precious)
    with pytest.raises(LeverError, match=r"--output-dir: .*\.lock is a symbolic link"):
        RunLock(run).acquire()
    assert precious.read_text() == "keep me\n"
    assert (run / ".lock").is_symlink()


def test_run_lock_release_leaves_a_file_that_replaced_it(tmp_path) -> None:
    lock = RunLock(tmp_path / "run").acquire()
    (tmp_path / "run" / ".lock").unlink()
    (tmp_path / "run" / ".lock").symlink_to(tmp_path / "elsewhere")
    lock.release()
    assert (tmp_path / "run" / ".lock").is_symlink()


def test_run_files_are_never_appended_through_a_link(tmp_path) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me\n")
    link = tmp_path / "steps.jsonl"
    link.symlink_to(precious)
    with pytest.raises(LeverError, match=r"steps\.jsonl is a symbolic link"):
        append_text(link, "{}\n")
    assert precious.read_text() == "keep me\n"


def test_training_refuses_a_planted_steps_link(cli, demo_files, tmp_path) -> None:
    data, emb = demo_files
    run = tmp_path / "run"
    run.mkdir()
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me\n")
    (run / "steps.jsonl").symlink_to(precious)
    result = cli(
        "--beam-data", data, "--img-emb", emb, "--output-dir", run, "--rce-epochs", "1",
        "--grpo-epochs", "0", "--device", "cpu", "--overwrite",
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "steps.jsonl is a symbolic link" in result.output and "Traceback" not in result.output
    assert precious.read_text() == "keep me\n"


def test_a_write_that_fails_is_one_line_naming_the_output(cli, tmp_path, untrained) -> None:
    """``/dev/full`` answers every write with ENOSPC."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    queries = write_json(tmp_path / "q.json", pools_of(QIDS))
    result = cli(*select_args(untrained, queries, "/dev/full"))
    assert_user_error(result, "--output: cannot write /dev/full", "No space left on device")


def test_an_unreadable_query_file_is_named_as_the_input(cli, tmp_path, untrained, monkeypatch):
    import lever_trainer.data.pools as pools_module

    def unreadable(path):
        raise PermissionError(13, "Permission denied")
        yield  # a generator, as the real reader

    monkeypatch.setattr(pools_module, "_jsonl_members", unreadable)
    queries = tmp_path / "q.jsonl"
    queries.write_text("[1, [2, 3]]\n")
    out = tmp_path / "picks.json"
    out.write_text("previous\n")
    result = cli(*select_args(untrained, queries, str(out)))
    assert_user_error(result, "q.jsonl: cannot read (Permission denied)")
    assert out.read_text() == "previous\n"

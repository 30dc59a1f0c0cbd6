"""``--judge-backend ray`` against a Ray cluster of its own, as on a GPU machine.

A head node is started with ``ray start --head --block`` on 127.0.0.1, declaring two
GPUs (Ray schedules on the GPUs a node declares; no CUDA is touched), and a training run
in another process joins it with ``--ray-address``: each of its two actors must hold one
GPU of its own, and the run must end as the same run judged in its own process. The
head is stopped by terminating the process that started it (not ``ray stop``, which
would stop every cluster of the machine). Marked ``ray``: ``tox -e ray`` runs them.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import lever_digits_env
import pytest
import torch
from conftest import write_json
from safetensors.torch import load_file

pytestmark = pytest.mark.ray

FILES = lever_digits_env.files()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ray_cli() -> str:
    pytest.importorskip("ray")
    return str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The address of a Ray head node with 2 CPUs and 2 declared GPUs."""
    port = free_port()
    logs = tmp_path_factory.mktemp("ray-head")
    # token authentication off: the cluster listens on 127.0.0.1 only, for this test
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    out = open(logs / "out.log", "w")
    proc = subprocess.Popen(
        [
            ray_cli(), "start", "--head", "--block", f"--port={port}",
            "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=2",
            "--include-dashboard=false", "--disable-usage-stats",
        ],
        stdout=out,
        stderr=subprocess.STDOUT,
        env=env,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out.close()
            pytest.fail(f"ray head did not start: {(logs / 'out.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield address
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    out.close()


def train(tmp_path: Path, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """A short judged run (judge-rank on 30 digits queries) in its own process."""
    doc = json.loads(Path(FILES["train"]).read_text())
    keep = {k: doc[k] for k in [k for k in doc if k.isdigit()][:30]}
    data = write_json(tmp_path / "d.json", keep)
    args = ["--beam-data", data, "--img-emb", FILES["embeddings"], "--output-dir", tmp_path / name]
    args += ["--judge", "digits", "--store", tmp_path / f"{name}.sqlite"]
    args += ["--plugin", "judge-rank", "--rce-epochs", "0", "--rank-epochs", "2"]
    args += ["--rank-candidates", "5", "--val-ratio", "0.2", "--seed", "3"]
    args += ["--judge-batch-size", "8", "--deterministic", *extra]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "lever_trainer", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_a_run_joins_a_cluster_and_each_actor_holds_a_gpu_of_its_own(head, tmp_path) -> None:
    local = train(tmp_path, "local")
    assert local.returncode == 0, local.stderr
    remote = train(
        tmp_path, "ray", "--judge-backend", "ray", "--ray-address", head,
        "--judge-workers", "2", "--judge-gpus-per-worker", "1",
    )  # fmt: skip
    assert remote.returncode == 0, remote.stderr
    placed = re.search(
        r"judge on Ray: 2 actor\(s\) on 1 node\(s\); GPU ids (\S+) \| (\S+)", remote.stderr
    )
    assert placed, remote.stderr
    assert sorted(placed.groups()) == ["0", "1"]
    weights = sorted(p.name for p in (tmp_path / "local").rglob("*.safetensors"))
    assert weights == sorted(p.name for p in (tmp_path / "ray").rglob("*.safetensors"))
    for name in weights:
        a = load_file(str(next((tmp_path / "local").rglob(name))))
        b = load_file(str(next((tmp_path / "ray").rglob(name))))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_more_gpus_than_a_joined_cluster_has_is_a_warning_then_one_line(head, tmp_path) -> None:
    # 3 workers x 1 GPU on a cluster of 2: the run warns, waits, then stops with one line
    done = train(
        tmp_path, "short", "--judge-backend", "ray", "--ray-address", head,
        "--judge-workers", "3", "--judge-gpus-per-worker", "1", "--ray-start-timeout", "5",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "need 3 GPUs; the Ray cluster offers 2 now" in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "1 of the Ray actors did not start within 5 s (--ray-start-timeout" in last, last
    assert not (tmp_path / "short" / "final.safetensors").exists()


def test_gpus_a_local_cluster_lacks_stop_the_run_at_once(tmp_path) -> None:
    ray_cli()
    started = time.monotonic()
    done = train(tmp_path, "nogpu", "--judge-backend", "ray", "--judge-gpus-per-worker", "1")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.endswith(
        "--judge-workers 1 with --judge-gpus-per-worker 1 need 1 GPUs; the local Ray "
        "cluster has 0 (join a cluster with GPUs with --ray-address, or give fewer "
        "workers or GPUs)"
    ), done.stderr
    assert time.monotonic() - started < 120

"""Judge throughput over HTTP: verdicts/s against the ideal, at 1, 2, 4 and 8 batches in flight.

    python bench/judge_throughput.py                       # batch 64, 50 ms, 12 rounds
    python bench/judge_throughput.py --latency 0.2 --batch 256 --concurrency 1,4,16

Needs the ``serve`` extra. A judge with a fixed latency (it sleeps ``--latency`` seconds
per batch, whatever the batch holds, like a GPU forward pass of a batch) is served by
``lever_trainer.serve`` (starlette + uvicorn, ``--threads`` worker threads) in a process of
its own on 127.0.0.1; the ``remote`` environment judges ``rounds x concurrency`` batches
of ``--batch`` pairs with ``--remote-concurrency`` = concurrency. Each row prints the
measured verdicts/s, the ideal ``concurrency x batch / latency`` (every batch in flight
all the time, zero overhead) and their ratio; the best of ``--repeats`` runs counts.
Not a test: the numbers depend on the machine.

Then the same judge over Ray (needs the ``ray`` extra; ``--ray-workers ""`` skips it):
``--judge-backend ray`` with 1, 2 and 4 workers, one judge per Ray actor, on a local
Ray cluster started here with one CPU slot per worker (the judge only sleeps). Each row
judges ``--rounds x workers`` batches of ``--batch`` unseen pairs through the run's own
path (a :class:`~lever_trainer.judge.Judge` and its driver, concurrency = workers, no
store), after the actors started and judged a warm-up round; the ideal is
``workers x batch / latency``. It ends with the 4-worker / 1-worker speed-up.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from lever_trainer.api import Environment


class SleepEnv(Environment):
    """A judge that takes ``latency`` seconds per batch; the verdicts are a cheap formula."""

    name, version = "sleep", "1"

    def __init__(self, latency: float) -> None:
        self.latency = latency

    def judge(self, query_ids: Sequence[int], sequences: Sequence[Sequence[int]]) -> Any:
        time.sleep(self.latency)
        return [
            {
                "vqa_correct": float(q % 2),
                "vqa_acc_score": (sum(s) % 10) / 10,
                "vqa_gt_prob": 0.5,
                "vqa_rel_score": 0.25,
            }
            for q, s in zip(query_ids, sequences, strict=True)
        ]


def serve(port: int, latency: float, threads: int) -> None:
    """The server process: the sleeping judge on 127.0.0.1:port."""
    import uvicorn

    from lever_trainer.serve import Limits, make_app

    app = make_app(SleepEnv(latency), "bench", Limits(threads=threads))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def measure(url: str, batch: int, concurrency: int, rounds: int) -> float:
    """Verdicts/s of one judge call over ``rounds x concurrency`` batches."""
    from lever_trainer_plugins.remote import RemoteEnvironment

    env = RemoteEnvironment()
    env.configure(
        {
            "judge_url": (url,),
            "remote_timeout": 60.0,
            "remote_retries": 0,
            "remote_batch_size": batch,
            "remote_concurrency": concurrency,
        }
    )
    n = rounds * concurrency * batch
    query_ids = list(range(n))
    sequences = [[q % 997, (q * 7) % 991] for q in range(n)]
    started = time.perf_counter()
    verdicts = env.judge(query_ids, sequences)
    seconds = time.perf_counter() - started
    assert len(verdicts) == n
    return n / seconds


class BuildSleepEnv:
    """Builds a :class:`SleepEnv` inside a Ray actor (this script travels by value)."""

    def __init__(self, latency: float) -> None:
        self.latency = latency

    def __call__(self) -> Environment:
        return SleepEnv(self.latency)


def measure_ray(env: Environment, batch: int, workers: int, rounds: int, start: int) -> float:
    """Verdicts/s of ``rounds x workers`` batches through a Judge over ``env``."""
    from lever_trainer.judge import Judge
    from lever_trainer.judge_driver import DriverSettings

    settings = DriverSettings(batch_size=batch, concurrency=workers)
    judge = Judge(env, "bench", None, lambda v: v["vqa_acc_score"], driver=settings)
    judge._bar = lambda total: None  # type: ignore[method-assign]  # no progress bar
    n = rounds * workers * batch
    query_ids = list(range(start, start + n))
    sequences = [[q % 997, (q * 7) % 991] for q in query_ids]
    started = time.perf_counter()
    verdicts = judge.verdicts(query_ids, sequences)
    seconds = time.perf_counter() - started
    assert len(verdicts) == n
    return n / seconds


def ray_rows(args: argparse.Namespace) -> None:
    """The Ray table (see the module docstring)."""
    workers = [int(x) for x in args.ray_workers.split(",") if x]
    if not workers:
        return
    try:
        import ray
    except ImportError:
        print("ray rows skipped: Ray is not installed (pip install 'lever-trainer[ray]')")
        return
    from lever_trainer.ray_judge import RayEnvironment

    ray.init(num_cpus=max(workers), include_dashboard=False, log_to_driver=False)
    rates: dict[int, float] = {}
    try:
        print(
            f"judge over Ray: {args.latency * 1000:g} ms per batch of {args.batch}, "
            f"{args.rounds} batches per worker, best of {args.repeats}"
        )
        print(f"{'workers':>11}  {'verdicts/s':>10}  {'ideal':>8}  {'of ideal':>8}")
        for w in workers:
            local = SleepEnv(args.latency)
            env = RayEnvironment(local, "bench", BuildSleepEnv(args.latency), workers=w)
            try:
                measure_ray(env, args.batch, w, 1, 0)  # warm-up
                got = max(
                    measure_ray(env, args.batch, w, args.rounds, 10_000_000 * (i + 1))
                    for i in range(args.repeats)
                )
            finally:
                env.close()
            rates[w] = got
            ideal = w * args.batch / args.latency
            print(f"{w:>11}  {got:>10.0f}  {ideal:>8.0f}  {got / ideal:>8.1%}")
    finally:
        ray.shutdown()
    if 1 in rates and 4 in rates:
        print(f"ray: 4 workers judge {rates[4] / rates[1]:.2f}x as fast as 1")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--latency", type=float, default=0.05, help="seconds per batch")
    ap.add_argument("--batch", type=int, default=64, help="pairs per request")
    ap.add_argument("--concurrency", default="1,2,4,8", help="batches in flight, a list")
    ap.add_argument("--rounds", type=int, default=12, help="batches per request slot")
    ap.add_argument("--threads", type=int, default=16, help="server worker threads")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ray-workers", default="1,2,4", help="Ray workers, a list")
    ap.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.latency, args.threads)
        return
    port = free_port()
    cmd = [sys.executable, __file__, "--serve", str(port), "--latency", str(args.latency)]
    server = subprocess.Popen([*cmd, "--threads", str(args.threads)])
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{url}/health")
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or server.poll() is not None:
                    sys.exit("the judge server did not start")
                time.sleep(0.1)
        measure(url, args.batch, 1, 2)  # warm-up: imports, connections
        print(
            f"judge over HTTP: {args.latency * 1000:g} ms per batch of {args.batch}, "
            f"{args.rounds} batches per slot, server threads {args.threads}, "
            f"best of {args.repeats}"
        )
        print(f"{'concurrency':>11}  {'verdicts/s':>10}  {'ideal':>8}  {'of ideal':>8}")
        for c in (int(x) for x in args.concurrency.split(",")):
            got = max(measure(url, args.batch, c, args.rounds) for _ in range(args.repeats))
            ideal = c * args.batch / args.latency
            print(f"{c:>11}  {got:>10.0f}  {ideal:>8.0f}  {got / ideal:>8.1%}")
    finally:
        server.terminate()
        server.wait(30)
    ray_rows(args)


if __name__ == "__main__":
    main()

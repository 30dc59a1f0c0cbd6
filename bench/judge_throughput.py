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


if __name__ == "__main__":
    main()

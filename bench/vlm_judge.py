"""The VLM judge's requests/s against a stand-in server, at several concurrency settings.

    python bench/vlm_judge.py                      # 128 requests, 50 ms latency, 3 x 50 kB images
    python bench/vlm_judge.py --latency 0.2 --requests 256 --image-kb 200

Needs the ``vlm`` extra (httpx). The stand-in OpenAI-compatible server of the tests
(``tests/vlm_fake.py``: it sleeps ``--latency`` seconds per request, then copies the last
demonstration's answer) runs in a process of its own on 127.0.0.1. The ``openai-vlm``
environment judges ``--requests`` (query, 2-demonstration sequence) pairs through the
run's own path (a :class:`~lever_trainer.judge.Judge` and its driver, no store), each
pair one chat request carrying three base64 images of ``--image-kb`` kB. Each row
prints requests/s, the ideal ``requests in flight / latency`` and their ratio; it ends
with the speed-up of the last row over the first. Not a test: the numbers depend on the
machine (client and server share its cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SERVER = """
import sys, time
sys.path.insert(0, {tests!r})
from vlm_fake import FakeVLM
fake = FakeVLM()
fake.mode, fake.delay = "slow", {latency!r}
fake.start()
print(fake.url, flush=True)
time.sleep(86400)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--image-kb", type=int, default=50)
    parser.add_argument(
        "--settings",
        default="1x1,8x1,8x4",
        help="comma-separated VLMxJUDGE: --vlm-concurrency x --judge-concurrency",
    )
    args = parser.parse_args()

    from lever_trainer.judge import Judge
    from lever_trainer.judge_driver import DriverSettings
    from lever_trainer_plugins.openai_vlm import OpenAIVLMEnvironment

    code = SERVER.format(tests=str(ROOT / "tests"), latency=args.latency)
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        folder = Path(tempfile.mkdtemp())
        (folder / "img").mkdir()
        for k in range(40):
            (folder / f"img/{k}.png").write_bytes(bytes(args.image_kb * 1000))
        # items 0..39 are the demonstrations, 40.. the queries (one each: nothing cached)
        lines = []
        for gid in range(40 + args.requests):
            image = f"img/{gid % 40}.png"
            item = {"id": gid, "image": image, "question": "q?", "answers": ["a"] * 10}
            lines.append(json.dumps(item))
        (folder / "items.jsonl").write_text("\n".join(lines) + "\n")
        pairs = [[a, b] for a in range(40) for b in range(40) if a != b][: args.requests]
        qids = [40 + i for i in range(len(pairs))]
        print(
            f"{args.requests} requests, {args.latency * 1000:g} ms server latency, "
            f"3 images of {args.image_kb} kB each"
        )
        rates = []
        for setting in args.settings.split(","):
            vlm, judge_conc = (int(x) for x in setting.split("x"))
            env = OpenAIVLMEnvironment()
            env.configure(
                {
                    "vlm_url": url,
                    "vlm_model": "stand-in",
                    "vlm_manifest": str(folder / "items.jsonl"),
                    "vlm_concurrency": vlm,
                }
            )
            driver = DriverSettings(concurrency=judge_conc)
            judge = Judge(env, "openai-vlm", None, lambda v: 0.0, driver=driver)
            started = time.monotonic()
            judge.verdicts(qids, pairs)
            seconds = time.monotonic() - started
            rate = len(pairs) / seconds
            ideal = vlm * judge_conc / args.latency
            rates.append(rate)
            print(
                f"--vlm-concurrency {vlm:2d} --judge-concurrency {judge_conc:2d}: "
                f"{rate:7.1f} requests/s in {seconds:5.2f} s, ideal {ideal:7.1f}, "
                f"ratio {rate / ideal:.2f}"
            )
        print(f"speed-up of the last setting over the first: {rates[-1] / rates[0]:.1f}x")
    finally:
        server.kill()


if __name__ == "__main__":
    main()

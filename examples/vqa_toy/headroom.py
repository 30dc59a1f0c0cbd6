"""How much room the toy task leaves a selector above cosine top-S, by brute force.

    python examples/vqa_toy/headroom.py TASK --img-emb TASK/emb.safetensors
        [--queries TASK/test_pools.json] [--shots 2] [--url http://127.0.0.1:8000/v1]

For every query of the file it asks the stand-in model (over HTTP with ``--url``, the
prompt a plain interleaved chat message with base64 images; else in this process, which
gives the same answers) about every ordered sequence of S pool items, and prints the
share of queries answered correctly by: ``cosine`` (the S most cosine-similar items,
most similar first), ``cosine-reversed``, ``random`` (the exact expectation over every
ordered sequence) and ``best`` (some ordered sequence answers it). "Correct" is what the
``openai-vlm`` judge calls ``vqa_correct``: a VQA accuracy above 0 against the query's ten
human answers.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import sys
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from standin_vlm import StandinModel, load_items

from lever_trainer.data import load_embeddings, load_pools
from lever_trainer.manifest import read_manifest
from lever_trainer.selectors import cosine_selection
from lever_trainer.vqa_eval import vqa_accuracy


class HttpAsker:
    """Asks a running server, one chat request per sequence."""

    def __init__(self, url: str, manifest: Path) -> None:
        self.url = url.rstrip("/") + "/chat/completions"
        self.lines = {}
        folder = manifest.parent
        with open(manifest, encoding="utf-8") as fh:
            for text in fh:
                obj = json.loads(text)
                data = base64.b64encode((folder / obj["image"]).read_bytes()).decode()
                self.lines[obj["id"]] = (f"data:image/png;base64,{data}", obj)

    def answer(self, query: int, demos: Sequence[int]) -> str:
        content: list[dict[str, object]] = []
        for item in [*demos, query]:
            url, obj = self.lines[item]
            shown = "" if item == query else max(obj["answers"], key=obj["answers"].count)
            content.append({"type": "image_url", "image_url": {"url": url}})
            content.append(
                {"type": "text", "text": f"Question: {obj['question']} Short answer: {shown}"}
            )
        body = {
            "messages": [{"role": "user", "content": content}],
            "temperature": 0,
            "max_tokens": 10,
        }
        request = urllib.request.Request(
            self.url, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return str(json.load(response)["choices"][0]["message"]["content"])


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", type=Path)
    parser.add_argument("--img-emb", type=Path, required=True)
    parser.add_argument("--queries", type=Path)
    parser.add_argument("--shots", type=int, default=2)
    parser.add_argument("--url")
    args = parser.parse_args(argv)
    manifest = args.task / "manifest.jsonl"
    items, _ = load_items(manifest)
    model = StandinModel(items)
    pools = load_pools(args.queries or args.task / "test_pools.json")
    emb = load_embeddings(args.img_emb)
    picks = {
        "cosine": cosine_selection(pools, emb, args.shots),
        "cosine-reversed": cosine_selection(pools, emb, args.shots, reverse=True),
    }
    asker = HttpAsker(args.url, manifest) if args.url else None

    answers = {i: item.answers for i, item in read_manifest(manifest).items()}

    def correct(query: int, demos: Sequence[int]) -> bool:
        answer = asker.answer(query, demos) if asker else model.reply(query, demos).answer
        return vqa_accuracy(answer, answers[query]) > 0

    qids = pools.query_ids.tolist()
    lengths = pools.pool_len.tolist()
    scores: dict[str, list[float]] = {name: [] for name in (*picks, "random", "best")}
    with ThreadPoolExecutor(8) as pool_exec:
        for row, (query, length) in enumerate(zip(qids, lengths, strict=True)):
            pool = pools.pool_ids[row, :length].tolist()
            for name, chosen in picks.items():
                scores[name].append(float(correct(query, chosen[row])))
            seqs = list(itertools.permutations(pool, args.shots))
            verdicts = list(pool_exec.map(lambda s, q=query: correct(q, s), seqs))
            scores["random"].append(sum(verdicts) / len(verdicts))
            scores["best"].append(float(any(verdicts)))
    murky = [items[q].background == "murky" for q in qids]
    print(f"{len(qids)} queries ({sum(murky)} murky pictures), S = {args.shots}")
    print(f"{'selector':<18}{'all':>8}{'clear':>8}{'murky':>8}")
    for name, values in scores.items():
        clear_v = [v for v, m in zip(values, murky, strict=True) if not m]
        murky_v = [v for v, m in zip(values, murky, strict=True) if m]
        cells = [sum(v) / max(len(v), 1) for v in (values, clear_v, murky_v)]
        print(f"{name:<18}" + "".join(f"{c:>8.3f}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Throughput of ``lever-train embed`` with a model the size of CLIP ViT-B/32.

    python bench/embed_throughput.py                      # 256 items, 2 threads, CPU
    python bench/embed_throughput.py --items 1024 --device cuda

Nothing is downloaded: the model has ViT-B/32's shape (``CLIPConfig()``'s defaults:
224-pixel images in 32-pixel patches, 12 layers of width 768 for images and 512 for
text, a 512-wide projection) with random weights, which cost the same to run as trained
ones; the tokenizer knows only letters, digits and a few signs (one token per
character, so a question of 30 characters is about 30 tokens, close to what CLIP's own
tokenizer gives for a VQA question). The items are generated 320x240 PNG pictures with
short questions.

For each modality it runs the whole ``lever-train embed`` command (a process: imports,
reading and checking the manifest, loading the model, reading the pictures, the forward
passes, writing the table) and prints items/s, and the seconds of the same command on a
manifest of 8 items (start-up and model loading, mostly). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_model(folder: Path) -> None:
    """A randomly initialised CLIP of ViT-B/32's shape, with a character tokenizer."""
    from transformers import CLIPConfig

    examples = Path(__file__).resolve().parents[1] / "examples" / "vqa_toy"
    sys.path.insert(0, str(examples))
    from tiny_clip import save_random_clip

    save_random_clip(folder, CLIPConfig(), seed=0, image_size=224)


def write_manifest(folder: Path, items: int) -> Path:
    """``items`` generated pictures and questions, and their manifest."""
    from PIL import Image, ImageDraw

    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(items):
        picture = Image.new("RGB", (320, 240), ((37 * i) % 256, (91 * i) % 256, 128))
        ImageDraw.Draw(picture).ellipse([i % 200, 40, i % 200 + 90, 150], fill=(220, 30, 30))
        picture.save(folder / "images" / f"{i}.png")
        lines.append(
            {
                "id": i,
                "image": f"images/{i}.png",
                "question": f"what colour is the circle number {i}?",
                "answers": ["red"],
            }
        )
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def run_embed(manifest: Path, model: Path, modality: str, args: argparse.Namespace) -> float:
    out = manifest.parent / f"{modality}.safetensors"
    command = [sys.executable, "-m", "lever_trainer", "embed", str(manifest), "--model"]
    command += [str(model), "--output", str(out), "--modality", modality, "--overwrite"]
    command += ["--device", args.device, "--batch-size", str(args.batch_size)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--items", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lever-embed")
    args = ap.parse_args()
    model = args.workdir / "clip-b32-random"
    if not (model / "config.json").is_file():
        build_model(model)
    big = write_manifest(args.workdir / f"items{args.items}", args.items)
    small = write_manifest(args.workdir / "items8", 8)
    print(
        f"{args.items} items, batch {args.batch_size}, {args.device}, {args.threads} threads "
        "(ViT-B/32-shaped CLIP, random weights)"
    )
    print(f"{'modality':10} {'items/s':>8} {'command s':>10} {'8 items s':>10}")
    for modality in ("image", "text", "both"):
        seconds = run_embed(big, model, modality, args)
        fixed = run_embed(small, model, modality, args)
        rate = args.items / max(seconds - fixed, 1e-9)
        print(f"{modality:10} {rate:8.1f} {seconds:10.1f} {fixed:10.1f}")


if __name__ == "__main__":
    main()

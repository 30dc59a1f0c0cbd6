"""Save a tiny, randomly initialised CLIP model that ``lever-train embed --model`` loads.

    python examples/vqa_toy/tiny_clip.py FOLDER [--seed 0] [--width 32]

Built here, nothing downloaded: two towers of two layers, of width ``--width``,
32-pixel images in 8-pixel patches, and a character-level tokenizer (every byte's
character a token, no merges) whose vocabulary is written into FOLDER. Its weights are
random, so its embeddings only keep what any smooth random map of the pixels and the
characters keeps: look-alike pictures land near each other, and so do questions
written alike. That is all the toy task needs; a real task embeds with a real CLIP
(``--model openai/clip-vit-base-patch32``). Needs the ``clip`` extra (transformers,
Pillow).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

#: The longest text the text tower takes, in tokens (a character each, plus two).
MAX_TOKENS = 64


def byte_characters() -> list[str]:
    """The 256 characters a byte-level BPE vocabulary spells the bytes with: printable
    bytes stand for themselves, the others are moved past 255."""
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    moved = [256 + k for k in range(256 - len(printable))]
    return [chr(c) for c in printable + moved]


def save_character_tokenizer(folder: Path) -> Any:
    """Write a character-level CLIP vocabulary (every byte's character a token, also as an
    end-of-word token; no merges) into ``folder`` and return its tokenizer."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in byte_characters():
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def save_random_clip(folder: Path, config: Any, seed: int = 0, image_size: int = 32) -> Path:
    """Save a CLIP model of ``config`` with random weights (seeded), the character-level
    tokenizer and an image processor for ``image_size``-pixel pictures into ``folder``."""
    import torch
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = save_character_tokenizer(folder)
    size = {"height": image_size, "width": image_size}
    images = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def make_tiny_clip(
    folder: Path,
    seed: int = 0,
    width: int = 32,
    *,
    layers: int = 2,
    projection: int | None = None,
    max_tokens: int = MAX_TOKENS,
) -> Path:
    """Save the tiny model (towers of ``layers`` layers of ``width``, embeddings of
    ``projection``, default ``width``), its tokenizer and its image processor."""
    from transformers import CLIPConfig

    tower = {
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
    }
    config = CLIPConfig(
        text_config={
            **tower,
            "vocab_size": 2 + 2 * len(byte_characters()),
            "max_position_embeddings": max_tokens,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=projection or width,
    )
    return save_random_clip(folder, config, seed)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``tiny_clip.py FOLDER [--seed S] [--width D]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=32, help="embedding width")
    args = parser.parse_args(argv)
    try:
        make_tiny_clip(args.folder, args.seed, args.width)
    except ImportError as exc:
        print(
            f"tiny_clip.py: {exc.name or exc} is not installed: pip install 'lever-trainer[clip]'",
            file=sys.stderr,
        )
        return 2
    print(f"wrote a tiny random CLIP model (width {args.width}) into {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

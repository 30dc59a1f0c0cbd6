"""A tiny, randomly initialised CLIP model with its processor, built locally (nothing is
downloaded), and generated pictures: what the tests of ``lever-train embed`` embed with.

``make_tiny_clip(folder)`` saves a model that ``CLIPModel.from_pretrained(folder)`` and
``AutoProcessor.from_pretrained(folder)`` load: a character-level tokenizer (a vocabulary
of letters, digits and a few signs, no merges), 32-pixel images in 8-pixel patches, one
layer per tower, a projection of width :data:`PROJECTION`. Needs transformers and Pillow.
"""

from __future__ import annotations

import json
from pathlib import Path

#: The width of the tiny model's embeddings.
PROJECTION = 8
#: The longest text its text tower takes, in tokens (start and end included).
MAX_TOKENS = 24
#: The characters its tokenizer knows (each also as an end-of-word token).
CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789?"


def make_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """Save a tiny CLIP model, tokenizer and image processor into ``folder``."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in CHARACTERS:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": MAX_TOKENS,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=PROJECTION,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def make_picture(path: Path, index: int) -> Path:
    """A 40x30 picture, different for each ``index``: a coloured square on a background."""
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (40, 30), ((37 * index) % 256, (91 * index) % 256, 128))
    draw = ImageDraw.Draw(picture)
    x = (7 * index) % 24
    draw.rectangle([x, 5, x + 12, 20], fill=((200 + 13 * index) % 256, 40, (17 * index) % 256))
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path

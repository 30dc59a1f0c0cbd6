"""A tiny, randomly initialised CLIP model with its processor, built locally (nothing is
downloaded), and generated pictures: what the tests of ``lever-train embed`` embed with.

``make_tiny_clip(folder)`` saves a model that ``CLIPModel.from_pretrained(folder)`` and
``AutoProcessor.from_pretrained(folder)`` load: the walk-through's tiny model
(examples/vqa_toy/tiny_clip.py: a character-level tokenizer, 32-pixel images in 8-pixel
patches), smaller still. Needs transformers and Pillow.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_SOURCE = Path(__file__).resolve().parents[1] / "examples" / "vqa_toy" / "tiny_clip.py"
_spec = importlib.util.spec_from_file_location("vqa_toy_tiny_clip", _SOURCE)
assert _spec is not None and _spec.loader is not None
toy_clip = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy_clip)

#: The width of the tiny model's embeddings.
PROJECTION = 8
#: The longest text its text tower takes, in tokens (start and end included).
MAX_TOKENS = 24


def make_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """Save a tiny CLIP model (towers of one layer of width 16, embeddings of width
    :data:`PROJECTION`), tokenizer and image processor into ``folder``."""
    return toy_clip.make_tiny_clip(
        folder, seed, 16, layers=1, projection=PROJECTION, max_tokens=MAX_TOKENS
    )


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

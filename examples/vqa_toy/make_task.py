"""Write a tiny synthetic visual question answering task, deterministic from a seed.

    python examples/vqa_toy/make_task.py OUT [--seed 0] [--demos 200] [--train 80]
        [--test 60] [--pool 32] [--murky 0.5]

Nothing is downloaded and nothing but the standard library is needed (the PNG files are
written with :mod:`zlib`). Every item is a 32 x 32 picture of 1 to 3 copies of one
shape (circle, square, triangle) in one colour (red, green, blue, yellow), on either a
**clear** background (plain and light, full-colour shapes) or a **murky** one (dark,
noisy, low-contrast shapes), with one question of three types -- its colour, its shape,
or how many shapes there are -- and ten human answers, as VQAv2 has: mostly the true
answer, sometimes in another spelling that the VQA normalisation maps to it ("Red",
"two", "a circle"), and a few non-answers ("not sure", "too dark"; more of them for
murky pictures, as people disagree more about poor pictures).

Written into OUT:

``images/NNNNNN.png``
    one picture per item.
``manifest.jsonl``
    one line per item: ``id``, ``image`` (relative to the manifest), ``question``,
    ``answers`` and the extra fields ``split`` (``pool``, ``train`` or ``test``),
    ``question_type``, ``shape``, ``colour``, ``count``, ``background`` (``clear`` or
    ``murky``), which the stand-in model (``standin_vlm.py``) reads and the trainer never
    sees.
``train_pools.json``, ``test_pools.json``
    ``{"<query id>": [pool ids, ...]}``: each query's candidate demonstrations, drawn from
    the ``pool`` items -- the query file ``lever-train collect``, ``select`` and
    ``evaluate`` read.
``task.json``
    the settings the task was made with.

Ids: the pool items first (0 ...), then the training queries, then the test queries.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

SIZE = 32
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 220),
    "yellow": (230, 205, 40),
}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("1", "2", "3")
QUESTION_TYPES = ("colour", "shape", "count")
QUESTIONS = {
    "colour": ("What colour is the shape?", "Which colour do you see?"),
    "shape": ("What shape is shown?", "Which shape is in the picture?"),
    "count": ("How many shapes are there?", "How many objects can you count?"),
}
#: other spellings of a true answer that the official VQA normalisation maps to it
VARIANTS = {
    "red": ("Red", "red."),
    "green": ("Green", "green."),
    "blue": ("Blue", "blue."),
    "yellow": ("Yellow", "yellow."),
    "circle": ("a circle", "Circle"),
    "square": ("a square", "Square"),
    "triangle": ("a triangle", "Triangle"),
    "1": ("one", "1."),
    "2": ("two", "2."),
    "3": ("three", "3."),
}
VALUES = {"colour": tuple(COLOURS), "shape": SHAPES, "count": COUNTS}
#: what people answer who cannot make the picture out. Never a value of any question
#: type, so an answer copied from another item's question never scores by matching one.
NON_ANSWERS = ("not sure", "unclear", "too dark", "cannot tell", "nothing")


@dataclass(frozen=True)
class Item:
    """One generated item: its picture's content and its question."""

    id: int
    split: str
    shape: str
    colour: str
    count: int
    background: str
    question_type: str
    question: str
    answers: tuple[str, ...]

    def truth(self) -> str:
        """The true answer to the item's question."""
        return {"colour": self.colour, "shape": self.shape, "count": str(self.count)}[
            self.question_type
        ]


def png_bytes(pixels: list[list[tuple[int, int, int]]]) -> bytes:
    """An 8-bit RGB PNG file of ``pixels`` (rows of (r, g, b)), byte-for-byte
    deterministic."""
    height, width = len(pixels), len(pixels[0])
    raw = b"".join(b"\x00" + bytes(v for px in row for v in px) for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def _inside(shape: str, dx: int, dy: int, r: int) -> bool:
    if shape == "circle":
        return dx * dx + dy * dy <= r * r - 2  # (no single-pixel tips)
    if shape == "square":
        return abs(dx) <= r - 1 and abs(dy) <= r - 1
    # triangle, apex up: half-width grows from 0 at the top row to r at the bottom row
    return -r <= dy <= r - 1 and 2 * abs(dx) <= dy + r


def draw(item: Item, rng: random.Random) -> list[list[tuple[int, int, int]]]:
    """The item's picture: ``count`` shapes in distinct quarters of the frame."""
    clear = item.background == "clear"
    if clear:
        base = rng.randint(228, 250)
        tint = [base + rng.randint(-4, 4) for _ in range(3)]
        pixels = [[(tint[0], tint[1], tint[2])] * SIZE for _ in range(SIZE)]
    else:
        base = rng.randint(45, 80)
        pixels = [
            [
                tuple(min(255, max(0, base + rng.randint(-28, 28))) for _ in range(3))  # type: ignore[misc]
                for _ in range(SIZE)
            ]
            for _ in range(SIZE)
        ]
    colour = COLOURS[item.colour]
    half = SIZE // 2
    cells = rng.sample([(0, 0), (0, 1), (1, 0), (1, 1)], item.count)
    for row, col in cells:
        r = rng.randint(5, 6)
        cy = row * half + half // 2 + rng.randint(-1, 1)
        cx = col * half + half // 2 + rng.randint(-1, 1)
        for y in range(max(0, cy - r), min(SIZE, cy + r + 1)):
            for x in range(max(0, cx - r), min(SIZE, cx + r + 1)):
                if not _inside(item.shape, x - cx, y - cy, r):
                    continue
                if clear:
                    pixels[y][x] = colour
                else:  # low contrast: the colour half mixed into the dark background
                    bg = pixels[y][x]
                    pixels[y][x] = tuple(  # type: ignore[assignment]
                        (c + b) // 2 for c, b in zip(colour, bg, strict=True)
                    )
    return pixels


def make_answers(truth: str, clear: bool, rng: random.Random) -> tuple[str, ...]:
    """Ten human answers: the true one (now and then in another spelling) and a few
    non-answers -- 0 or 1 for a clear picture, 2 or 3 for a murky one."""
    wrong = rng.randint(0, 1) if clear else rng.randint(2, 3)
    answers = [rng.choice(NON_ANSWERS) for _ in range(wrong)]
    for _ in range(10 - wrong):
        answers.append(rng.choice(VARIANTS[truth]) if rng.random() < 0.2 else truth)
    rng.shuffle(answers)
    return tuple(answers)


def make_items(seed: int, demos: int, train: int, test: int, murky: float) -> list[Item]:
    """Every item of the task, ids 0 ... in the order pool, train, test."""
    rng = random.Random(seed)
    items: list[Item] = []
    for split, n in (("pool", demos), ("train", train), ("test", test)):
        for _ in range(n):
            # queries: the three types in turn; pool items: drawn
            turn = QUESTION_TYPES[len(items) % 3]
            qtype = rng.choice(QUESTION_TYPES) if split == "pool" else turn
            shape, colour = rng.choice(SHAPES), rng.choice(tuple(COLOURS))
            count = rng.randint(1, 3)
            background = "murky" if rng.random() < murky else "clear"
            truth = {"colour": colour, "shape": shape, "count": str(count)}[qtype]
            items.append(
                Item(
                    id=len(items),
                    split=split,
                    shape=shape,
                    colour=colour,
                    count=count,
                    background=background,
                    question_type=qtype,
                    question=rng.choice(QUESTIONS[qtype]),
                    answers=make_answers(truth, background == "clear", rng),
                )
            )
    return items


def make_task(
    out: Path,
    seed: int = 0,
    demos: int = 200,
    train: int = 80,
    test: int = 60,
    pool: int = 32,
    murky: float = 0.5,
) -> dict[str, object]:
    """Write the task into ``out`` (see the module docstring); returns its settings."""
    if pool > demos:
        raise ValueError(f"--pool {pool} is larger than --demos {demos}")
    items = make_items(seed, demos, train, test, murky)
    (out / "images").mkdir(parents=True, exist_ok=True)
    draw_rng = random.Random(seed + 1_000_003)
    with open(out / "manifest.jsonl", "w", encoding="utf-8") as fh:
        for item in items:
            name = f"images/{item.id:06d}.png"
            (out / name).write_bytes(png_bytes(draw(item, draw_rng)))
            line = {
                "id": item.id,
                "image": name,
                "question": item.question,
                "answers": list(item.answers),
                "split": item.split,
                "question_type": item.question_type,
                "shape": item.shape,
                "colour": item.colour,
                "count": item.count,
                "background": item.background,
            }
            fh.write(json.dumps(line) + "\n")
    pool_rng = random.Random(seed + 2_000_003)
    demo_ids = [item.id for item in items if item.split == "pool"]
    for split in ("train", "test"):
        pools = {
            str(item.id): sorted(pool_rng.sample(demo_ids, pool))
            for item in items
            if item.split == split
        }
        (out / f"{split}_pools.json").write_text(json.dumps(pools) + "\n", encoding="utf-8")
    settings: dict[str, object] = {
        "seed": seed,
        "demos": demos,
        "train": train,
        "test": test,
        "pool": pool,
        "murky": murky,
        "size": SIZE,
    }
    (out / "task.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return settings


def main(argv: list[str] | None = None) -> int:
    """Command line: ``make_task.py OUT [options]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write the task into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--demos", type=int, default=200, help="pool items (demonstrations)")
    parser.add_argument("--train", type=int, default=80, help="training queries")
    parser.add_argument("--test", type=int, default=60, help="held-out test queries")
    parser.add_argument("--pool", type=int, default=32, help="candidate pool size per query")
    parser.add_argument("--murky", type=float, default=0.5, help="share of murky pictures")
    args = parser.parse_args(argv)
    try:
        settings = make_task(
            args.out, args.seed, args.demos, args.train, args.test, args.pool, args.murky
        )
    except (ValueError, OSError) as exc:
        print(f"make_task.py: {exc}", file=sys.stderr)
        return 2
    total = int(settings["demos"]) + int(settings["train"]) + int(settings["test"])  # type: ignore[call-overload]
    print(f"wrote {total} items, their pictures and the query pools into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

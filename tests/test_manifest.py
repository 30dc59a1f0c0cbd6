"""The dataset manifest: items read line by line, every bad line one FILE:LINE error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lever_trainer.errors import LeverError
from lever_trainer.manifest import (
    ManifestError,
    image_data,
    image_type,
    iter_manifest,
    read_manifest,
)

PNG = b"\x89PNG\r\n\x1a\n fake image bytes"


def write(tmp_path: Path, *lines: object, raw: str | None = None) -> Path:
    (tmp_path / "img").mkdir(exist_ok=True)
    for name in ("a.png", "b.jpg"):
        (tmp_path / "img" / name).write_bytes(PNG)
    path = tmp_path / "items.jsonl"
    text = raw if raw is not None else "".join(json.dumps(x) + "\n" for x in lines)
    path.write_text(text, encoding="utf-8")
    return path


def item(i: int, image: str = "img/a.png", **extra: object) -> dict[str, object]:
    return {"id": i, "image": image, "question": f"q{i}?", "answers": ["red"] * 10, **extra}


def test_items_are_read_with_paths_resolved_and_extras_kept(tmp_path: Path) -> None:
    path = write(tmp_path, item(3, split="train"), item(0, "img/b.jpg"), item(7, "https://x/y.png"))
    items = read_manifest(path)
    assert list(items) == [3, 0, 7]  # file order
    first = items[3]
    assert first.image == str(tmp_path.resolve() / "img" / "a.png")
    assert first.question == "q3?" and first.answers == ("red",) * 10
    assert dict(first.extra) == {"split": "train"} and first.line == 1
    assert items[7].is_url and items[7].image == "https://x/y.png" and not first.is_url
    assert image_data(first) == (PNG, "image/png")
    assert image_data(items[0])[1] == "image/jpeg"


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path: Path) -> None:
    raw = "\n" + json.dumps(item(1)) + "\n   \n" + json.dumps(item(2)) + "\n"
    items = list(iter_manifest(write(tmp_path, raw=raw)))
    assert [(x.id, x.line) for x in items] == [(1, 2), (2, 4)]


def test_an_absolute_image_path_is_kept(tmp_path: Path) -> None:
    absolute = str(tmp_path.resolve() / "img" / "a.png")
    (only,) = iter_manifest(write(tmp_path, item(5, absolute)))
    assert only.image == absolute


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "items.jsonl:2: not a JSON object"),
        ("[1, 2]", "items.jsonl:2: expected a JSON object, got list"),
        (json.dumps({"id": 1, "image": "img/a.png"}), "missing field 'question', 'answers'"),
        (json.dumps(item(-1)), "field 'id' must be a non-negative integer, got -1"),
        (json.dumps(item(1) | {"id": "1"}), "field 'id' must be a non-negative integer"),
        (json.dumps(item(1) | {"id": True}), "field 'id' must be a non-negative integer"),
        (json.dumps(item(1) | {"id": 1.5}), "field 'id' must be a non-negative integer"),
        (json.dumps(item(1) | {"image": ""}), "field 'image' must be a non-empty string"),
        (json.dumps(item(1) | {"question": None}), "field 'question' must be a string"),
        (json.dumps(item(1) | {"answers": "red"}), "field 'answers' must be a list of strings"),
        (json.dumps(item(1) | {"answers": ["a", 2]}), "field 'answers' must be a list of strings"),
        (json.dumps(item(1, "img/missing.png")), "image 'img/missing.png' not found"),
        (json.dumps(item(0)), "items.jsonl:2: id 0 repeats the id of line 1"),
    ],
)
def test_a_bad_line_is_one_error_naming_file_and_line(
    tmp_path: Path, line: str, message: str
) -> None:
    path = write(tmp_path, raw=json.dumps(item(0)) + "\n" + line + "\n")
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    text = str(err.value)
    assert message in text and "\n" not in text
    assert text.startswith(f"{path}:2:")


def test_a_missing_image_may_be_left_unchecked(tmp_path: Path) -> None:
    path = write(tmp_path, item(1, "img/later.png"))
    (only,) = iter_manifest(path, check_images=False)
    assert only.image.endswith("later.png")


def test_not_utf8_missing_file_and_empty_manifest(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"id": 1}\n\xff\xfe\n')
    with pytest.raises(ManifestError, match=r"bad.jsonl:1: missing field"):
        read_manifest(bad)
    bad.write_bytes(b"\xff\xfe\n")
    with pytest.raises(ManifestError, match=r"bad.jsonl:1: not UTF-8 text"):
        read_manifest(bad)
    with pytest.raises(ManifestError, match=r"nothing.jsonl: cannot read the manifest"):
        read_manifest(tmp_path / "nothing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ManifestError, match=r"empty.jsonl: the manifest has no items"):
        read_manifest(empty)


def test_reading_stops_at_the_first_bad_line_after_yielding_the_good_ones(tmp_path: Path) -> None:
    path = write(tmp_path, raw=json.dumps(item(4)) + "\n{oops\n")
    seen = []
    with pytest.raises(ManifestError):
        for x in iter_manifest(path):
            seen.append(x.id)
    assert seen == [4]


def test_image_types_and_url_images(tmp_path: Path) -> None:
    assert image_type("x/photo.JPEG") == "image/jpeg"
    assert image_type("https://h/p.webp?size=2") == "image/webp"
    with pytest.raises(ManifestError, match=r"unknown image type '\.txt'"):
        image_type("notes.txt")
    (url_item,) = iter_manifest(write(tmp_path, item(9, "http://h/p.png")))
    with pytest.raises(LeverError, match=r"item 9: image http://h/p\.png is a URL"):
        image_data(url_item)

"""A task's items as a dataset manifest: one JSON object per line (JSON Lines).

Each line describes one item of a visual question answering task::

    {"id": 17, "image": "images/17.png", "question": "What colour is the square?",
     "answers": ["red", "red", "dark red", ...], "split": "train"}

``id``
    the item's global id: the row of the embedding tables and the id used in RL data,
    pool files and the verdict store. A non-negative integer, unique in the file.
``image``
    a path relative to the manifest's folder (or absolute), or an ``http://`` /
    ``https://`` URL. A local image must exist when the manifest is read (checked at
    load, so a run never fails on a missing picture half way through).
``question``
    the question about the image, a string.
``answers``
    the human answers, a list of strings (VQAv2 has ten per question). May be empty for
    an item that is only ever shown as a demonstration.

Every other field is kept, untouched, in :attr:`ManifestItem.extra`. Blank lines are
skipped. The file is read one line at a time, so a manifest of millions of items never
sits in memory as text. Any bad line is a :class:`ManifestError` naming ``FILE:LINE``
and what was expected there.
"""

from __future__ import annotations

import json
import mimetypes
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import LeverError

#: The fields every line must have.
REQUIRED_FIELDS = ("id", "image", "question", "answers")
#: Image suffixes and their MIME types (what a chat request's data URL declares).
IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
}


class ManifestError(LeverError):
    """A manifest line that cannot be used; the message is ``FILE:LINE: reason``."""


@dataclass(frozen=True)
class ManifestItem:
    """One item of a manifest (see the module docstring for the fields)."""

    id: int
    #: an absolute local path, or the URL as written in the file
    image: str
    question: str
    answers: tuple[str, ...]
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    #: the 1-based line of the file the item came from
    line: int = 0

    @property
    def is_url(self) -> bool:
        """Whether the image is a URL rather than a local file."""
        return _is_url(self.image)


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def _parse_line(
    text: str, path: Path, folder: Path, number: int, check_images: bool
) -> ManifestItem:
    where = f"{path}:{number}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{where}: not a JSON object ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [name for name in REQUIRED_FIELDS if name not in obj]
    if missing:
        raise ManifestError(f"{where}: missing field {', '.join(repr(m) for m in missing)}")
    item_id = obj["id"]
    if isinstance(item_id, bool) or not isinstance(item_id, int) or item_id < 0:
        raise ManifestError(f"{where}: field 'id' must be a non-negative integer, got {item_id!r}")
    image, question, answers = obj["image"], obj["question"], obj["answers"]
    if not isinstance(image, str) or not image:
        raise ManifestError(f"{where}: field 'image' must be a non-empty string (a path or URL)")
    if not isinstance(question, str):
        raise ManifestError(f"{where}: field 'question' must be a string")
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ManifestError(f"{where}: field 'answers' must be a list of strings")
    if not _is_url(image):
        path = Path(image) if os.path.isabs(image) else folder / image
        if check_images and not path.is_file():
            raise ManifestError(f"{where}: image {image!r} not found (looked for {path})")
        image = str(path)
    extra = {k: v for k, v in obj.items() if k not in REQUIRED_FIELDS}
    return ManifestItem(
        id=item_id,
        image=image,
        question=question,
        answers=tuple(answers),
        extra=MappingProxyType(extra),
        line=number,
    )


def iter_manifest(
    path: str | os.PathLike[str], *, check_images: bool = True
) -> Iterator[ManifestItem]:
    """The manifest's items in file order, read one line at a time.

    Raises :class:`ManifestError` (``FILE:LINE: reason``) at the first bad line, a
    repeated id, or (with ``check_images``) a local image that does not exist."""
    path = Path(path)
    folder = path.resolve().parent
    seen: dict[int, int] = {}
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read the manifest ({exc.strerror})") from None
    with fh:
        for number, raw in enumerate(fh, start=1):
            where = f"{path}:{number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ManifestError(f"{where}: not UTF-8 text") from None
            if not text.strip():
                continue
            item = _parse_line(text, path, folder, number, check_images)
            if item.id in seen:
                raise ManifestError(f"{where}: id {item.id} repeats the id of line {seen[item.id]}")
            seen[item.id] = number
            yield item


def read_manifest(
    path: str | os.PathLike[str], *, check_images: bool = True
) -> dict[int, ManifestItem]:
    """Every item of the manifest by id (see :func:`iter_manifest`); an empty manifest is
    an error."""
    items = {item.id: item for item in iter_manifest(path, check_images=check_images)}
    if not items:
        raise ManifestError(f"{path}: the manifest has no items")
    return items


def image_type(image: str) -> str:
    """The MIME type of an image from its file suffix (``image/png`` ...)."""
    suffix = Path(image.split("?", 1)[0]).suffix.lower()
    known = IMAGE_TYPES.get(suffix) or mimetypes.types_map.get(suffix)
    if not known or not known.startswith("image/"):
        raise ManifestError(
            f"{image}: unknown image type {suffix or '(no suffix)'!r}; expected one of "
            + ", ".join(sorted(IMAGE_TYPES))
        )
    return known


def image_data(item: ManifestItem) -> tuple[bytes, str]:
    """The bytes of a local image and its MIME type. A URL image is not fetched here:
    a :class:`~lever_trainer.errors.LeverError` says so."""
    if item.is_url:
        raise LeverError(f"item {item.id}: image {item.image} is a URL, not a local file")
    mime = image_type(item.image)
    try:
        return Path(item.image).read_bytes(), mime
    except OSError as exc:
        reason = exc.strerror
        raise LeverError(f"item {item.id}: cannot read image {item.image} ({reason})") from None

"""``lever-train embed``: a manifest's items turned into the embedding table that
training, ``select`` and ``evaluate`` read, with a CLIP model from Hugging Face
``transformers``.

Each item becomes one row, its global id the row number: the image's embedding
(``image``), the question's (``text``) or both side by side (``both``), every part
scaled to unit length. The table is written by
:func:`~lever_trainer.data.embeddings.table_bytes` with a metadata header listing the
ids it holds, the model, the modality and the libraries that computed it; nothing in it
depends on the time or the machine's paths, so the same inputs give the same bytes.

``transformers`` and Pillow are the ``clip`` extra; they are imported only here, and
only when an embedding is asked for.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import math
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .data.embeddings import TABLE_FORMAT, format_ids, table_bytes
from .errors import LeverError
from .manifest import ManifestItem

#: What ``--modality`` accepts.
MODALITIES = ("image", "text", "both")
#: What to install for ``embed``.
INSTALL_HINT = "pip install 'lever-trainer[clip]'"
#: Seconds to wait for an image URL to answer.
URL_TIMEOUT = 30.0
#: The largest image a URL may send (bytes); a larger answer is refused, not read.
URL_MAX_BYTES = 64 * 2**20
#: Images read (or fetched) at once while a batch is assembled.
READERS = 8
#: Items embedded between two saves of the work done (``--save-every``; whole batches).
SAVE_EVERY = 4096
#: The layout of the unfinished-work folder (``OUTPUT.partial``).
PARTIAL_FORMAT = "lever-trainer-embed-partial"
#: A table may hold padding rows (ids absent from the manifest) up to this many ...
PADDING_ROWS = 10_000
#: ... or up to this many times the number of items, whichever is larger.
PADDING_RATIO = 9


def require_clip() -> None:
    """A :class:`LeverError` naming the extra to install when ``transformers`` or Pillow
    is missing."""
    missing = [
        name
        for name, module in (("transformers", "transformers"), ("Pillow", "PIL"))
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        raise LeverError(
            f"lever-train embed needs {' and '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed: {INSTALL_HINT}"
        )


def check_ids(items: Sequence[ManifestItem], manifest: str) -> int:
    """The number of rows of the table for ``items`` (the largest id plus one); a table
    that would be mostly padding is a :class:`LeverError` that says how to renumber."""
    count, rows = len(items), max(item.id for item in items) + 1
    padding = rows - count
    if padding > max(PADDING_ROWS, PADDING_RATIO * count):
        raise LeverError(
            f"{manifest}: ids run up to {rows - 1} but the manifest has {count} items; the "
            f"table has one row per id up to the largest, so {padding} of its {rows} rows "
            f"would be padding. Number the items 0..{count - 1} (ids are rows of the table; "
            "keep the dataset's own ids in another field of each line)"
        )
    return rows


@dataclass
class ClipEncoder:
    """A loaded CLIP model and its processor, on ``device``."""

    model: Any
    processor: Any
    device: str
    name: str
    #: The hub commit the files came from, where transformers knows it.
    revision: str | None
    #: The longest text (in tokens) the text tower takes; longer questions are cut.
    max_text_tokens: int
    #: The width of one modality's embedding (the projection).
    dim: int

    def images(self, pictures: Sequence[Any]) -> torch.Tensor:
        """``[len(pictures), dim]`` float32 image embeddings, each of unit length."""
        inputs = self.processor(images=list(pictures), return_tensors="pt")
        with torch.inference_mode():
            out = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device))
        return _unit(_features(out))

    def texts(self, texts: Sequence[str]) -> tuple[torch.Tensor, int]:
        """``[len(texts), dim]`` float32 text embeddings, each of unit length, and how many
        texts were longer than the text tower takes (cut to :attr:`max_text_tokens`)."""
        tokenizer = self.processor.tokenizer
        # verbose=False: the library would warn of each long text; the summary counts them
        lengths = [len(ids) for ids in tokenizer(list(texts), verbose=False)["input_ids"]]
        cut = sum(1 for n in lengths if n > self.max_text_tokens)
        inputs = tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_text_tokens,
            return_tensors="pt",
        )
        with torch.inference_mode():
            out = self.model.get_text_features(
                input_ids=inputs["input_ids"].to(self.device),
                attention_mask=inputs["attention_mask"].to(self.device),
            )
        return _unit(_features(out)), cut


def _features(out: Any) -> torch.Tensor:
    """The projected features of a ``get_*_features`` call: a tensor (transformers 4) or
    the ``pooler_output`` of a model output (transformers 5)."""
    features: torch.Tensor = out if isinstance(out, torch.Tensor) else out.pooler_output
    return features.detach().to("cpu", torch.float32)


def _unit(rows: torch.Tensor) -> torch.Tensor:
    """Each row scaled to unit length (a zero row stays zero)."""
    return torch.nn.functional.normalize(rows, dim=1)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def _quiet(logging: Any) -> Iterator[None]:
    """transformers' warnings and progress bars off while a model loads (embed shows its
    own progress and summary), as they were afterwards."""
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def load_clip(name: str, device: str) -> ClipEncoder:
    """Load the CLIP model ``name`` (a hub name, found in the local cache or downloaded as
    transformers does, or a local folder) and its processor onto ``device``; anything
    that stops it is one :class:`LeverError` naming ``--model``."""
    # the library as Any: its typing is partial, and the type checks run without it
    transformers: Any = importlib.import_module("transformers")
    AutoConfig, AutoProcessor = transformers.AutoConfig, transformers.AutoProcessor
    CLIPModel = transformers.CLIPModel
    with _quiet(transformers.utils.logging):
        try:
            config = AutoConfig.from_pretrained(name)
        except Exception as exc:
            raise LeverError(
                f"--model: cannot load {name!r}: it is neither a folder holding a model nor "
                "a model found on the Hugging Face hub or in its local cache "
                f"({_first_line(exc)})"
            ) from None
        model_type = getattr(config, "model_type", None)
        if model_type != "clip":
            raise LeverError(
                f"--model: {name} is a {model_type!r} model; embed needs a CLIP model "
                "(model_type 'clip', such as openai/clip-vit-base-patch32)"
            )
        try:
            model = CLIPModel.from_pretrained(name, config=config)
            processor = AutoProcessor.from_pretrained(name)
        except Exception as exc:
            raise LeverError(f"--model: cannot load {name!r} ({_first_line(exc)})") from None
    for part in ("tokenizer", "image_processor"):
        if getattr(processor, part, None) is None:
            raise LeverError(f"--model: {name} has no {part.replace('_', ' ')}")
    model = model.to(device).eval()
    return ClipEncoder(
        model=model,
        processor=processor,
        device=device,
        name=name,
        revision=getattr(config, "_commit_hash", None),
        max_text_tokens=int(config.text_config.max_position_embeddings),
        dim=int(config.projection_dim),
    )


def fetch_url(url: str, where: str) -> bytes:
    """The bytes at ``url`` (stdlib urllib, :data:`URL_TIMEOUT`); a failure is a
    :class:`LeverError` naming ``where`` and saying what to do without a network."""
    request = urllib.request.Request(url, headers={"User-Agent": f"lever-trainer/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=URL_TIMEOUT) as answer:
            data: bytes = answer.read(URL_MAX_BYTES + 1)
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code} {exc.reason}"
    except (urllib.error.URLError, OSError) as exc:
        reason = str(getattr(exc, "reason", exc)) or type(exc).__name__
    else:
        if len(data) > URL_MAX_BYTES:
            raise LeverError(
                f"{where}: image {url} is larger than {URL_MAX_BYTES // 2**20} MiB; refused"
            )
        return data
    raise LeverError(
        f"{where}: cannot fetch image {url} ({reason}); embed fetches URL images while it "
        "runs: without a network, download them and write local paths in the manifest"
    )


def read_image(item: ManifestItem, manifest: str) -> Any:
    """The item's image as an RGB Pillow image (turned upright as its EXIF says), read
    from disk or fetched; an unreadable one is a :class:`LeverError` naming
    ``MANIFEST:LINE``."""
    from PIL import Image, ImageOps

    where = f"{manifest}:{item.line}"
    if item.is_url:
        data = fetch_url(item.image, where)
    else:
        try:
            data = Path(item.image).read_bytes()
        except OSError as exc:
            raise LeverError(
                f"{where}: cannot read image {item.image} ({exc.strerror or exc})"
            ) from None
    try:
        with Image.open(io.BytesIO(data)) as picture:
            upright = ImageOps.exif_transpose(picture)
            return upright.convert("RGB")
    except Exception as exc:
        raise LeverError(
            f"{where}: image {item.image} is not a picture Pillow can read ({_first_line(exc)})"
        ) from None


@dataclass
class EmbedResult:
    """What :func:`embed_items` computed: ``table`` ``[rows, d]`` (row = id), the ids it
    holds, the number of questions cut to the text tower's length and of distinct
    pictures embedded."""

    table: torch.Tensor
    ids: list[int]
    cut_texts: int
    images: int = 0


class PartialEmbed:
    """The work of an ``embed`` that has not finished, kept next to its output in
    ``OUTPUT.partial/`` so that running the same command again continues it.

    ``identity.json`` says what is being embedded (manifest digest, model, modality,
    batch size, table shape); ``part-NNNNN.safetensors`` holds, for a run of whole
    batches of the items in id order, their rows (``rows``) and the embeddings of the
    pictures that later items still use (``carry``, their keys in the metadata), so that
    a continued run embeds exactly the batches an uninterrupted one would and writes the
    same bytes. Each part is written atomically; the folder is removed once the table is
    written."""

    def __init__(self, folder: Path, identity: dict[str, str]) -> None:
        self.folder, self.identity = folder, {"format": PARTIAL_FORMAT, **identity}
        #: Items whose rows are kept in the folder (known once loaded or saved).
        self.done = 0

    @classmethod
    def beside(cls, output: str, identity: dict[str, str]) -> PartialEmbed:
        """The folder of the unfinished work of ``output``; one line when it holds the
        work of another embedding."""
        partial = cls(Path(f"{output}.partial"), identity)
        partial.check()
        return partial

    def check(self) -> None:
        """One line when the folder holds the work of another embedding."""
        saved = self.folder / "identity.json"
        if not saved.is_file():
            return
        try:
            theirs = json.loads(saved.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise LeverError(f"{saved}: unreadable ({exc}); remove {self.folder}") from None
        differ = [k for k in sorted(self.identity) if theirs.get(k) != self.identity[k]]
        if differ:
            key = differ[0]
            raise LeverError(
                f"{self.folder} holds the unfinished work of another embedding "
                f"({key} {theirs.get(key)!r} there, {self.identity[key]!r} now): run "
                f"the command that started it again, or remove {self.folder} to start over"
            )

    def model_revision(self, revision: str | None) -> None:
        """The model's revision, known once it is loaded, must be the one the saved
        work was done with."""
        if revision:
            self.identity["model_revision"] = revision
            self.check()

    def parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.safetensors"))

    def load(
        self, table: torch.Tensor, ordered: Sequence[ManifestItem]
    ) -> tuple[int, dict[str, torch.Tensor], int, int]:
        """Fill ``table`` with the rows saved; ``(items done, pictures carried, questions
        cut, pictures embedded)``."""
        from safetensors import safe_open

        done = cut = images = 0
        carry: dict[str, torch.Tensor] = {}
        for path in self.parts():
            try:
                with safe_open(str(path), "pt") as fh:
                    meta = fh.metadata()
                    start, end = int(meta["start"]), int(meta["end"])
                    if start != done or end > len(ordered):
                        raise ValueError(f"items {start}-{end} do not follow {done}")
                    rows = fh.get_tensor("rows")
                    keys = json.loads(meta["carry"])
                    carried = fh.get_tensor("carry") if keys else None
            except Exception as exc:  # a torn or foreign file
                raise LeverError(
                    f"{path}: not a part of this embedding ({_first_line(exc)}); remove "
                    f"{self.folder} to start over"
                ) from None
            table[torch.tensor([item.id for item in ordered[start:end]])] = rows
            carry = dict(zip(keys, carried, strict=True)) if carried is not None else {}
            done, cut, images = end, cut + int(meta["cut"]), images + int(meta["images"])
            self.done = done
        return done, carry, cut, images

    def save(
        self,
        table: torch.Tensor,
        ordered: Sequence[ManifestItem],
        span: tuple[int, int],
        carry: dict[str, torch.Tensor],
        cut: int,
        images: int,
    ) -> None:
        """Keep items ``span`` (their rows), the pictures still in use and the counts of
        questions cut and pictures embedded within the span."""
        from safetensors.torch import save as save_bytes

        from .fileio import atomic_write_bytes

        start, end = span
        self.folder.mkdir(parents=True, exist_ok=True)
        identity = self.folder / "identity.json"
        if not identity.is_file():
            atomic_write_bytes(identity, json.dumps(self.identity, sort_keys=True).encode())
        ids = torch.tensor([item.id for item in ordered[start:end]])
        keys = sorted(carry)
        tensors = {"rows": table[ids].contiguous()}
        if keys:
            tensors["carry"] = torch.stack([carry[k] for k in keys]).contiguous()
        meta = {"start": str(start), "end": str(end), "carry": json.dumps(keys)}
        meta.update(cut=str(cut), images=str(images))
        atomic_write_bytes(self.folder / f"part-{start:09d}.safetensors", save_bytes(tensors, meta))
        self.done = end

    def remove(self) -> None:
        """The table is written: the unfinished work goes."""
        for path in self.folder.glob("*"):
            path.unlink()
        with contextlib.suppress(OSError):
            self.folder.rmdir()


def embed_items(
    items: Sequence[ManifestItem],
    encoder: ClipEncoder,
    modality: str,
    batch_size: int,
    manifest: str,
    rows: int,
    progress: Callable[[int], None] | None = None,
    partial: PartialEmbed | None = None,
    save_every: int = SAVE_EVERY,
) -> EmbedResult:
    """Embed ``items`` in order of id, ``batch_size`` at a time, into a table of ``rows``
    rows (rows of absent ids stay zero). ``both`` is the unit image embedding and the unit
    text embedding side by side, scaled by 1/sqrt(2) so the row has unit length and the
    cosine of two rows is the mean of their image and text cosines. ``progress(n)`` is
    told after each batch how many items are done.

    With ``partial``, the work saved by an earlier run is taken up where it stopped, and
    the work done is saved every ``save_every`` items (rounded up to whole batches).

    A picture shared by several items (VQA datasets ask several questions about one
    image) is read and embedded once, when the first of them comes, and kept until the
    last of them is done."""
    if modality not in MODALITIES:
        raise LeverError(f"--modality: {modality!r} is not one of {', '.join(MODALITIES)}")
    ordered = sorted(items, key=lambda item: item.id)
    last_use = {item.image: i for i, item in enumerate(ordered)}
    width = encoder.dim * (2 if modality == "both" else 1)
    table = torch.zeros(rows, width, dtype=torch.float32)
    pictures: dict[str, torch.Tensor] = {}  # embeddings of pictures still to be used
    cut = done = images = 0
    if partial is not None:
        done, pictures, cut, images = partial.load(table, ordered)
        if progress is not None and done:
            progress(done)
    every = -(-max(save_every, 1) // batch_size) * batch_size
    saved, saved_cut, saved_images = done, cut, images
    with ThreadPoolExecutor(max_workers=READERS) as pool:
        for start in range(done, len(ordered), batch_size):
            batch = ordered[start : start + batch_size]
            parts = []
            if modality in ("image", "both"):
                first: dict[str, ManifestItem] = {}  # a new picture -> its first item
                for item in batch:
                    if item.image not in pictures:
                        first.setdefault(item.image, item)
                if first:
                    read = list(pool.map(lambda it: read_image(it, manifest), first.values()))
                    pictures.update(zip(first, encoder.images(read), strict=True))
                    images += len(first)
                parts.append(torch.stack([pictures[item.image] for item in batch]))
                for key in {item.image for item in batch}:
                    if last_use[key] < start + len(batch):
                        del pictures[key]
            if modality in ("text", "both"):
                texts, n_cut = encoder.texts([item.question for item in batch])
                parts.append(texts)
                cut += n_cut
            rows_of = torch.tensor([item.id for item in batch])
            joined = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1) / math.sqrt(2)
            table[rows_of] = joined
            done += len(batch)
            if partial is not None and (done - saved >= every or done == len(ordered)):
                span = (saved, done)
                partial.save(table, ordered, span, pictures, cut - saved_cut, images - saved_images)
                saved, saved_cut, saved_images = done, cut, images
            if progress is not None:
                progress(done)
    return EmbedResult(table, [item.id for item in ordered], cut, images)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's bytes, read in pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for piece in iter(lambda: fh.read(2**20), b""):
            digest.update(piece)
    return digest.hexdigest()


def table_metadata(
    result: EmbedResult, encoder: ClipEncoder, modality: str, manifest_sha256: str
) -> dict[str, str]:
    """The metadata header of the table: its ids, where it came from and how it was
    computed (nothing that changes between two runs with the same inputs)."""
    transformers: Any = importlib.import_module("transformers")
    metadata = {
        "format": TABLE_FORMAT,
        "format_version": "1",
        "ids": format_ids(result.ids),
        "items": str(len(result.ids)),
        "model": encoder.name,
        "modality": modality,
        "dim": str(result.table.shape[1]),
        "normalization": "l2" if modality != "both" else "l2 per modality, joined, / sqrt(2)",
        "manifest_sha256": manifest_sha256,
        "producer": f"lever-trainer {__version__}, transformers {transformers.__version__}, "
        f"torch {torch.__version__}",
    }
    if modality != "image":
        metadata["text"] = "question"
        metadata["max_text_tokens"] = str(encoder.max_text_tokens)
    if encoder.revision:
        metadata["model_revision"] = encoder.revision
    return metadata


def embedding_file(
    result: EmbedResult, encoder: ClipEncoder, modality: str, manifest_sha256: str
) -> bytes:
    """The bytes of the ``.safetensors`` table of ``result``."""
    return table_bytes(result.table, table_metadata(result, encoder, modality, manifest_sha256))


__all__ = [
    "INSTALL_HINT",
    "MODALITIES",
    "SAVE_EVERY",
    "ClipEncoder",
    "EmbedResult",
    "PartialEmbed",
    "check_ids",
    "embed_items",
    "embedding_file",
    "fetch_url",
    "file_sha256",
    "load_clip",
    "read_image",
    "require_clip",
    "table_metadata",
]

"""Embedding tables: ``.pt``/``.pth`` (weights_only), ``.npy``, ``.safetensors``.

A table written by ``lever-train embed`` is a ``.safetensors`` file with one tensor,
``embeddings`` ``[N, d]``, whose row ``i`` is the item with global id ``i``, and a metadata
header (``format`` :data:`TABLE_FORMAT`) that lists the ids the table holds (``ids``, as
ranges such as ``0-41,43-99``). Rows between listed ids are zero padding; the loader
remembers which rows are items, and an RL data id whose row is padding is refused rather
than trained on. Other tables hold an item in every row.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import LeverError

if TYPE_CHECKING:
    from .tables import QueryTable


@dataclass
class Embeddings:
    """Query and candidate embedding tables, each [N, d] float32, indexed by global id."""

    query: torch.Tensor
    cand: torch.Tensor
    query_path: str
    cand_path: str
    #: ``[N]`` bool: which rows of ``query`` are items, for a table whose metadata lists
    #: its ids (:data:`TABLE_FORMAT`); None when every row is one.
    query_items: torch.Tensor | None = None
    #: The same for ``cand``.
    cand_items: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        """Embedding width d."""
        return int(self.query.shape[1])


def _numpy_safe_globals() -> list[Any]:
    """Globals a ``torch.save``-d numpy array needs under ``weights_only=True``."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    allowed: list[Any] = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    # the dtype classes themselves (numpy < 1.25 has no numpy.dtypes module)
    allowed += [type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"]
    return allowed


def _as_tensor(obj: Any, path: str, key: str | None) -> torch.Tensor:
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if hasattr(v, "shape")}
        if key is not None:
            if key not in tensors:
                raise LeverError(
                    f"{path}: no tensor named {key!r} (has: {', '.join(map(str, tensors))})"
                )
            obj = tensors[key]
        elif len(tensors) == 1:
            obj = next(iter(tensors.values()))
        else:
            raise LeverError(
                f"{path}: holds {len(tensors)} tensors ({', '.join(map(str, tensors))}); "
                "name one with --emb-key"
            )
    if isinstance(obj, torch.Tensor):
        return obj
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a declared dependency
        raise LeverError(f"{path}: reading numpy arrays needs numpy installed") from None
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "fiub":
            raise LeverError(f"{path}: array dtype {obj.dtype} is not numeric")
        return torch.from_numpy(np.ascontiguousarray(obj))
    raise LeverError(f"{path}: expected a 2-D tensor or array, found {type(obj).__name__}")


def read_tensor_file(path: str | os.PathLike[str], key: str | None = None) -> torch.Tensor:
    """Read one tensor from ``.pt``/``.pth`` (weights_only), ``.npy`` or ``.safetensors``."""
    p = Path(path)
    if not p.is_file():
        raise LeverError(f"{p}: file not found")
    suffix = p.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return _as_tensor(load_file(str(p)), str(p), key)
        if suffix == ".npy":
            import numpy as np

            return _as_tensor(np.load(p, allow_pickle=False), str(p), key)
        if suffix in (".pt", ".pth", ".bin"):
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                obj = torch.load(p, map_location="cpu", weights_only=True)
            return _as_tensor(obj, str(p), key)
    except LeverError:
        raise
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LeverError(f"{p}: cannot read as {suffix} tensor file ({reason})") from None
    raise LeverError(
        f"{p}: unsupported embedding format {suffix!r} (expected .pt, .pth, .npy or .safetensors)"
    )


def load_embedding_table(path: str | os.PathLike[str], key: str | None = None) -> torch.Tensor:
    """Read and validate an embedding table: 2-D, floating point, finite; returns float32."""
    t = read_tensor_file(path, key)
    if t.layout in (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc):
        t = t.to_dense()  # a sparse table is still a table; the policy needs dense rows
    elif t.layout != torch.strided:
        raise LeverError(f"{path}: embeddings must be a dense tensor, got layout {t.layout}")
    if t.dim() != 2:
        raise LeverError(
            f"{path}: embeddings must be a 2-D [N, d] tensor, got shape {list(t.shape)}"
        )
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise LeverError(
            f"{path}: embeddings have shape {list(t.shape)}; expected at least one row "
            "and a width d >= 1"
        )
    if not t.is_floating_point():
        raise LeverError(f"{path}: embeddings must be floating point, got {t.dtype}")
    t = t.to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).any(dim=1).nonzero()[0, 0])
        raise LeverError(f"{path}: embeddings contain non-finite values (first in row {bad})")
    return t.contiguous()


def load_embeddings(
    path: str | os.PathLike[str],
    cand_path: str | os.PathLike[str] | None = None,
    key: str | None = None,
) -> Embeddings:
    """Load the query table and (optionally separate) candidate table."""
    query = load_embedding_table(path, key)
    query_items = listed_items(path, query.shape[0])
    cand, cand_items = query, query_items
    if cand_path is not None:
        cand = load_embedding_table(cand_path, key)
        cand_items = listed_items(cand_path, cand.shape[0])
    if cand.shape[1] != query.shape[1]:
        raise LeverError(
            f"{cand_path}: candidate embeddings have d={cand.shape[1]} but query embeddings "
            f"({path}) have d={query.shape[1]}"
        )
    return Embeddings(query, cand, str(path), str(cand_path or path), query_items, cand_items)


#: The ``format`` entry of the metadata of a table written by ``lever-train embed``.
TABLE_FORMAT = "lever-trainer-embeddings"
#: The name of its one tensor.
TABLE_TENSOR = "embeddings"


def format_ids(ids: Iterable[int]) -> str:
    """Ids as sorted ranges: ``[0, 1, 2, 3, 7, 9, 10]`` -> ``"0-3,7,9-10"``."""
    parts: list[str] = []
    start = prev = None
    for i in sorted(set(ids)):
        if prev is not None and i == prev + 1:
            prev = i
            continue
        if start is not None:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        start = prev = i
    if start is not None:
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ",".join(parts)


def parse_ids(text: str, where: str) -> list[tuple[int, int]]:
    """The ranges of :func:`format_ids`'s text, as ``(first, last)`` pairs; anything else
    (a negative id, a range that runs backwards or overlaps the one before) is a
    :class:`LeverError` naming ``where``."""
    ranges: list[tuple[int, int]] = []
    for part in text.split(",") if text else []:
        first, _, last = part.partition("-")
        try:
            lo, hi = int(first), int(last or first)
        except ValueError:
            raise LeverError(f"{where}: {part!r} is not an id or a range FIRST-LAST") from None
        if lo < 0 or hi < lo or (ranges and lo <= ranges[-1][1]):
            raise LeverError(f"{where}: {part!r} is out of order or overlaps the range before")
        ranges.append((lo, hi))
    return ranges


def table_bytes(table: torch.Tensor, metadata: Mapping[str, str]) -> bytes:
    """A ``.safetensors`` file holding ``table`` (as float32, named :data:`TABLE_TENSOR`)
    and ``metadata``, the same bytes for the same table and metadata.

    The header's keys are written in sorted order (the safetensors library writes them in
    an order that changes from one process to the next), so a table made twice from the
    same inputs is byte-identical and its sha256 identifies it."""
    import numpy as np

    data = np.ascontiguousarray(table.detach().cpu().to(torch.float32).numpy(), dtype="<f4")
    header = {
        "__metadata__": dict(sorted(metadata.items())),
        TABLE_TENSOR: {"dtype": "F32", "shape": list(data.shape), "data_offsets": [0, data.nbytes]},
    }
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text + data.tobytes()


def listed_items(path: str | os.PathLike[str], rows: int) -> torch.Tensor | None:
    """``[rows]`` bool, True where a row of the table at ``path`` is an item, for a
    table whose metadata lists its ids (:data:`TABLE_FORMAT`); None for any other file."""
    if Path(path).suffix.lower() != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            metadata = fh.metadata() or {}
    except Exception:  # unreadable headers were refused when the table was read
        return None
    if metadata.get("format") != TABLE_FORMAT:
        return None
    if "ids" not in metadata:
        raise LeverError(f"{path}: metadata field ids is missing (the ids the table holds)")
    items = torch.zeros(rows, dtype=torch.bool)
    for lo, hi in parse_ids(metadata["ids"], f"{path}: metadata field ids"):
        if hi >= rows:
            raise LeverError(
                f"{path}: metadata field ids lists id {hi}, but the table has {rows} rows"
            )
        items[lo : hi + 1] = True
    return items


def first_unlisted(items: torch.Tensor | None, ids: torch.Tensor) -> int | None:
    """The first of ``ids`` (all within the table) whose row is not an item; None when
    every one is (or the table holds an item in every row)."""
    if items is None or ids.numel() == 0:
        return None
    missing = ~items[ids]
    return int(ids[missing][0]) if bool(missing.any()) else None


def unlisted_error(path: str, items: torch.Tensor, what: str) -> LeverError:
    """The error for an RL data id (``what``: ``query 7``, ...) whose row in the table at
    ``path`` is padding."""
    listed = format_ids(items.nonzero().flatten().tolist())
    if len(listed) > 60:
        listed = listed[:57] + "..."
    return LeverError(
        f"{path}: {what} is not an item of this table (its row is padding between the "
        f"ids the table holds: {listed}); embed a manifest that has it"
    )


def check_ids_in_range(table: QueryTable, emb: Embeddings) -> None:
    """Every query id and pool id must index a row of its embedding table."""
    n_q, n_c = emb.query.shape[0], emb.cand.shape[0]
    if len(table) == 0:
        return
    max_q = int(table.query_ids.max())
    if max_q >= n_q:
        raise LeverError(
            f"{emb.query_path}: has {n_q} rows but query id {max_q} needs row {max_q} "
            "(too few rows for the RL data)"
        )
    valid = table.pool_mask()
    max_c = int(table.pool_ids[valid].max()) if bool(valid.any()) else -1
    if max_c >= n_c:
        row = int((table.pool_ids.masked_fill(~valid, -1) == max_c).any(dim=1).nonzero()[0, 0])
        raise LeverError(
            f"{emb.cand_path}: has {n_c} rows but query {int(table.query_ids[row])} "
            f"uses candidate id {max_c} (too few rows for the RL data)"
        )
    q = first_unlisted(emb.query_items, table.query_ids)
    if q is not None:
        assert emb.query_items is not None
        raise unlisted_error(emb.query_path, emb.query_items, f"query id {q}")
    c = first_unlisted(emb.cand_items, table.pool_ids[valid])
    if c is not None:
        assert emb.cand_items is not None
        raise unlisted_error(emb.cand_path, emb.cand_items, f"candidate id {c}")


def embedding_warnings(table: QueryTable, emb: Embeddings) -> list[str]:
    """Warnings about embeddings a policy cannot learn from: the rows the data uses are
    all zero, or all the same vector, or some of them are zero.

    Candidates that all look alike leave nothing to choose between (the policy can only
    learn a uniform choice); queries that all look alike get the same choice."""
    out = []
    mask = table.pool_mask()
    consequence = {
        "candidate": "the policy cannot tell the candidates apart and can only learn a "
        "uniform choice",
        "query": "the policy cannot tell the queries apart and will choose the same way "
        "for all of them",
    }
    for kind, ids, rows, path in (
        ("candidate", table.pool_ids[mask], emb.cand, emb.cand_path),
        ("query", table.query_ids, emb.query, emb.query_path),
    ):
        if ids.numel() == 0:
            continue
        used = rows[torch.unique(ids)]
        zero = ~used.any(dim=1)
        if bool(zero.all()):
            out.append(
                f"warning: {path}: every {kind} embedding the data uses is zero; "
                f"{consequence[kind]}"
            )
        elif len(used) > 1 and bool((used == used[0]).all()):
            out.append(
                f"warning: {path}: every {kind} embedding the data uses is the same vector; "
                f"{consequence[kind]}"
            )
        elif bool(zero.any()):
            out.append(
                f"warning: {path}: {int(zero.sum())} of the {len(used)} {kind} embeddings "
                "the data uses are zero vectors"
            )
    return out

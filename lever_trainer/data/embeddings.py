"""Embedding tables: ``.pt``/``.pth`` (weights_only), ``.npy``, ``.safetensors``."""

from __future__ import annotations

import os
from collections.abc import Mapping
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
    cand = query if cand_path is None else load_embedding_table(cand_path, key)
    if cand.shape[1] != query.shape[1]:
        raise LeverError(
            f"{cand_path}: candidate embeddings have d={cand.shape[1]} but query embeddings "
            f"({path}) have d={query.shape[1]}"
        )
    return Embeddings(query, cand, str(path), str(cand_path or path))


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

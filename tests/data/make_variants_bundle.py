"""Build ``tests/data/variants.safetensors`` from the upstream-variant reference files.

The reference vectors (one safetensors file per upstream model variant, see
``variants.README.md``) repeat a lot: every file carries the same three queries' inputs,
and several variants share weights bitwise. This script stores each distinct tensor
(same dtype, shape and bytes) once, under a short name ``t<i>``, and records in the
header metadata:

* ``index``: JSON ``{"<file stem>/<key>": "<stored name>"}`` for every tensor of every file;
* ``files``: JSON ``{"<file stem>": {<that file's own metadata>}}``.

Usage::

    python tests/data/make_variants_bundle.py SOURCE_DIR [OUTPUT]

SOURCE_DIR is the folder of the reference files; OUTPUT defaults to
``variants.safetensors`` next to this script. The output is deterministic (files and
keys are visited in sorted order). :func:`load_bundle` reads it back.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

DEFAULT_OUTPUT = Path(__file__).parent / "variants.safetensors"


def _digest(t: torch.Tensor) -> str:
    t = t.contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    head = f"{t.dtype}:{tuple(t.shape)}:".encode()
    return hashlib.sha256(head + raw).hexdigest()


def build(source: Path, output: Path) -> tuple[int, int]:
    """Write the bundle; return (number of indexed tensors, number stored)."""
    stored: dict[str, torch.Tensor] = {}
    by_digest: dict[str, str] = {}
    index: dict[str, str] = {}
    files: dict[str, dict[str, str]] = {}
    paths = sorted(source.glob("*.safetensors"))
    if not paths:
        raise SystemExit(f"no *.safetensors in {source}")
    for path in paths:
        with safe_open(str(path), "pt") as f:
            files[path.stem] = dict(f.metadata() or {})
        tensors = load_file(str(path))
        for key in sorted(tensors):
            t = tensors[key].contiguous()
            digest = _digest(t)
            name = by_digest.get(digest)
            if name is None:
                name = f"t{len(stored)}"
                by_digest[digest] = name
                stored[name] = t
            index[f"{path.stem}/{key}"] = name
    metadata = {
        "index": json.dumps(index, sort_keys=True),
        "files": json.dumps(files, sort_keys=True),
    }
    save_file(stored, str(output), metadata=metadata)
    return len(index), len(stored)


def load_bundle(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, str]]]:
    """``({file stem: {key: tensor}}, {file stem: metadata})`` from a bundle."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    stored = load_file(str(path))
    out: dict[str, dict[str, torch.Tensor]] = {}
    for full, name in json.loads(meta["index"]).items():
        stem, key = full.split("/", 1)
        out.setdefault(stem, {})[key] = stored[name]
    return out, json.loads(meta["files"])


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("usage: make_variants_bundle.py SOURCE_DIR [OUTPUT] (the reference files' folder)")
    source = Path(argv[0])
    output = Path(argv[1]) if len(argv) > 1 else DEFAULT_OUTPUT
    n_index, n_stored = build(source, output)
    size = output.stat().st_size
    print(f"{output}: {n_index} tensors, {n_stored} stored, {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main(sys.argv[1:])

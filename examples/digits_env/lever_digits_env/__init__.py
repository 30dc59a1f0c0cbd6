"""The digits environment: a frozen nearest-demonstration judge over raw pixels.

See this package's README for the task and the verdict formulas. ``DATA`` is the folder
of the default task's files (RL training data, test pools, embeddings, judge parameters);
``TASKS`` names the six bundled tasks (``t0`` is ``DATA``, ``t1``-``t5`` its siblings, each
with its own split, embedding width, pool size and judge parameters). The option
``--digits-task`` picks one by name, or names a folder holding the same four files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from lever_trainer.api import Environment, LeverError, Option, hookimpl

ENABLED_BY_DEFAULT = True
DESCRIPTION = "environment `digits`: frozen nearest-demonstration judge of the digits task"

#: The task's files.
DATA = Path(__file__).resolve().parent / "data"
#: The bundled tasks: name -> folder.
TASKS = {"t0": DATA, **{f"t{i}": DATA / "tasks" / f"t{i}" for i in range(1, 6)}}
#: The files of a task folder.
FILES = {
    "train": "digits_rl_train.json",
    "test": "digits_test.json",
    "embeddings": "digits_emb.safetensors",
    "split": "digits_split.json",
}
#: Sequences judged per vectorised chunk (bounds the memory of one call).
CHUNK = 50_000


def task_folder(task: str | Path) -> Path:
    """The folder of a bundled task (``t0``-``t5``) or of a task folder given by path."""
    if str(task) in TASKS:
        return TASKS[str(task)]
    folder = Path(task)
    missing = [f for f in FILES.values() if not (folder / f).is_file()]
    if missing:
        raise LeverError(
            f"--digits-task: {task} is neither a bundled task ({', '.join(TASKS)}) nor a "
            f"folder holding {', '.join(FILES.values())} (missing: {', '.join(missing)})"
        )
    return folder


class DigitsEnvironment(Environment):
    """Judges (query, ordered demonstrations) pairs with the frozen digits predictor."""

    name = "digits"
    cheap = True

    def __init__(self, folder: Path = DATA) -> None:
        self.folder = folder

    def configure(self, options: Mapping[str, Any]) -> None:
        """``--digits-task``: the task whose judge and embeddings this is."""
        folder = task_folder(options.get("digits_task") or "t0")
        if folder != self.folder:
            self.folder = folder
            for cached in ("params", "embeddings", "version"):
                self.__dict__.pop(cached, None)

    @cached_property
    def version(self) -> str:  # type: ignore[override]
        """``1`` for the default task; other tasks' verdicts are kept apart by a hash of
        their judge parameters and embeddings."""
        if self.folder == DATA:
            return "1"
        digest = hashlib.sha256()
        for f in (FILES["split"], FILES["embeddings"]):
            digest.update((self.folder / f).read_bytes())
        return f"1+{digest.hexdigest()[:12]}"

    @cached_property
    def params(self) -> dict[str, float]:
        split = json.loads((self.folder / FILES["split"]).read_text())
        return {k: float(v) for k, v in split["predictor"].items()}

    @cached_property
    def pixels(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.int64)

    @cached_property
    def embeddings(self) -> np.ndarray:
        from safetensors.numpy import load_file

        emb = load_file(str(self.folder / FILES["embeddings"]))["embeddings"]
        return np.asarray(emb, np.float64)

    def judge(
        self, query_ids: Sequence[int], sequences: Sequence[Sequence[int]]
    ) -> list[dict[str, float]]:
        """Verdicts of every pair, computed in vectorised chunks."""
        n = len(self.pixels[1])
        for where, ids in (("query id", query_ids), ("demonstration id", sequences)):
            flat = np.asarray(ids, dtype=np.int64).ravel()
            bad = flat[(flat < 0) | (flat >= n)]
            if bad.size:
                raise LeverError(
                    f"digits: {where} {int(bad[0])} is out of range (the task has {n} images)"
                )
        out: list[dict[str, float]] = []
        for start in range(0, len(query_ids), CHUNK):
            q = np.asarray(query_ids[start : start + CHUNK], dtype=np.int64)
            s = np.asarray(sequences[start : start + CHUNK], dtype=np.int64)
            out += self._judge(q, s)
        return out

    def _judge(self, q: np.ndarray, seqs: np.ndarray) -> list[dict[str, float]]:
        p = self.params
        x, y = self.pixels
        dist = np.sqrt(((x[seqs] - x[q][:, None, :]) ** 2).sum(-1))  # [n, S]
        dist[:, -1] *= p["recency"]
        labels, truth = y[seqs], y[q]
        best = dist.argmin(axis=1)  # the first on ties
        nearest = dist[np.arange(len(q)), best]
        pred = np.where(
            nearest < p["threshold"], labels[np.arange(len(q)), best], p["majority_label"]
        )
        hit = labels == truth[:, None]
        d_true = np.where(hit, dist, np.inf).min(axis=1)
        acc = np.where(
            hit.any(axis=1),
            np.clip(np.exp(-(d_true - p["acc_floor"]) / p["acc_tau"]), 0.0, 1.0),
            0.0,
        )
        z = -dist / p["gt_tau"]
        weights = np.exp(z - z.max(axis=1, keepdims=True))
        gt_prob = (weights * hit).sum(1) / weights.sum(1)
        emb = self.embeddings
        rel = np.clip(np.einsum("nsd,nd->ns", emb[seqs], emb[q]).mean(1), 0.0, 1.0)
        return [
            {
                "vqa_correct": float(c),
                "vqa_acc_score": float(a),
                "vqa_gt_prob": float(g),
                "vqa_rel_score": float(r),
            }
            for c, a, g, r in zip(pred == truth, acc, gt_prob, rel, strict=True)
        ]


_ENV = DigitsEnvironment()


@hookimpl
def environments() -> Mapping[str, Environment]:
    """The digits judge."""
    return {"digits": _ENV}


@hookimpl
def add_options() -> Sequence[Option]:
    """``--digits-task``, taken by every command that judges."""
    return [
        Option(
            ("--digits-task",),
            "str",
            "t0",
            "digits: the task to judge, a bundled one (t0-t5) or a folder with its files.",
            metavar="TASK",
            commands=("train", "evaluate", "collect", "serve-judge"),
        )
    ]


def files(task: str | Path = "t0") -> dict[str, Path]:
    """Paths of a task's files (a bundled task's name or a task folder)."""
    folder = task_folder(task)
    return {key: folder / name for key, name in FILES.items()}


__all__ = ["DATA", "FILES", "TASKS", "DigitsEnvironment", "files", "task_folder"]

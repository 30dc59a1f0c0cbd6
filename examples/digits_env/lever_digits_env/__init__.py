"""The digits environment: a frozen nearest-demonstration judge over raw pixels.

See this package's README for the task and the verdict formulas. ``DATA`` is the folder
of the task's files (RL training data, test pools, embeddings, judge parameters).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from lever_trainer.api import Environment, hookimpl

ENABLED_BY_DEFAULT = True
DESCRIPTION = "environment `digits`: frozen nearest-demonstration judge of the digits task"

#: The task's files.
DATA = Path(__file__).resolve().parent / "data"
#: Sequences judged per vectorised chunk (bounds the memory of one call).
CHUNK = 50_000


class DigitsEnvironment(Environment):
    """Judges (query, ordered demonstrations) pairs with the frozen digits predictor."""

    name = "digits"
    version = "1"
    cheap = True

    @cached_property
    def params(self) -> dict[str, float]:
        split = json.loads((DATA / "digits_split.json").read_text())
        return {k: float(v) for k, v in split["predictor"].items()}

    @cached_property
    def pixels(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.int64)

    @cached_property
    def embeddings(self) -> np.ndarray:
        from safetensors.numpy import load_file

        return np.asarray(load_file(str(DATA / "digits_emb.safetensors"))["embeddings"], np.float64)

    def judge(
        self, query_ids: Sequence[int], sequences: Sequence[Sequence[int]]
    ) -> list[dict[str, float]]:
        """Verdicts of every pair, computed in vectorised chunks."""
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


def files() -> dict[str, Any]:
    """Paths of the task's files."""
    return {
        "train": DATA / "digits_rl_train.json",
        "test": DATA / "digits_test.json",
        "embeddings": DATA / "digits_emb.safetensors",
        "split": DATA / "digits_split.json",
    }


__all__ = ["DATA", "DigitsEnvironment", "files"]

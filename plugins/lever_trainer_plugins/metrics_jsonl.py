"""Append every epoch's metrics to ``metrics.jsonl`` in the output directory. On by default.

Each line is strict JSON: a metric that is not a finite number is written as ``null``.
"""

from __future__ import annotations

from lever_trainer.api import TrainState, atomic_write_bytes, hookimpl, json_line

ENABLED_BY_DEFAULT = True
DESCRIPTION = "write each epoch's metrics to OUTPUT_DIR/metrics.jsonl"


@hookimpl
def on_epoch_end(state: TrainState, metrics: dict[str, float]) -> None:
    """Rewrite metrics.jsonl atomically with the run's history so far."""
    lines = [json_line(entry) for entry in state.history]
    atomic_write_bytes(state.output_dir / "metrics.jsonl", ("\n".join(lines) + "\n").encode())

"""Write the run's metrics to ``metrics.jsonl`` in the output directory. On by default.

One JSON object per line: first the starting policy's validation (``"phase": "start",
"epoch": 0``), then every finished epoch (``phase``, ``epoch`` and its metrics). The
file is rewritten atomically from the run's history, so a resumed run's file is that of
an uninterrupted run. A metric that is not a finite number is written as ``null``.
"""

from __future__ import annotations

from lever_trainer.api import About, TrainState, atomic_write_bytes, hookimpl, json_line


@hookimpl
def about() -> About:
    """What ``lever-train plugins`` shows of this plugin."""
    return About(
        description=(
            "write the start validation and each epoch's metrics to OUTPUT_DIR/metrics.jsonl"
        ),
        enabled_by_default=True,
    )


FILE_NAME = "metrics.jsonl"


def _write(state: TrainState) -> None:
    entries = list(state.history)
    if state.start_metrics:
        entries.insert(0, {"phase": "start", "epoch": 0, **state.start_metrics})
    text = "".join(json_line(entry) + "\n" for entry in entries)
    atomic_write_bytes(state.output_dir / FILE_NAME, text.encode())


@hookimpl
def on_start_validation(state: TrainState, metrics: dict[str, float]) -> None:
    """Start the file with the starting policy's metrics (epoch 0)."""
    _write(state)


@hookimpl
def on_epoch_end(state: TrainState, metrics: dict[str, float]) -> None:
    """Rewrite metrics.jsonl atomically with the run's history so far."""
    _write(state)

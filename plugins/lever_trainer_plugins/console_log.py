"""The run's console output: epoch lines, progress, and a summary at the end. On by default.

* One line per epoch: ``phase epoch n/N: metrics (seconds)``.
* Progress. On a terminal, a tqdm bar per phase (steps done, rate, ETA, the epoch and
  the last loss). tqdm earns its place as a dependency: it is tiny, pure Python and
  already installed with most ML stacks, and it gets right what hand-drawn bars get
  wrong (terminal width, redraw rate, lines printed while a bar is shown). In a log file
  (not a terminal), a progress line every ``--progress-every`` (default ``30s``; a bare
  number counts steps), so a log never sits silent for long.
* A summary when the run ends: start -> best -> final of the main validation metrics
  (``val_loss``, ``policy_reward@1``, ``normalized_gain`` and any ``judge_*``), with the
  epoch of each best, and which candidate checkpoint selection chose as
  ``best.safetensors`` (the starting policy when no epoch beat it beyond the noise).
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lever_trainer.api import (
    About,
    LeverError,
    Option,
    TrainState,
    format_metrics,
    hookimpl,
)
from lever_trainer.api import (
    metrics as lever_metrics,
)


@hookimpl
def about() -> About:
    """What ``lever-train plugins`` shows of this plugin."""
    return About(
        description=(
            "epoch lines, a progress bar (terminal) or progress lines (log file), a summary"
        ),
        enabled_by_default=True,
    )


_KEY = "console-log"
#: Metrics the summary shows, and whether larger is better.
SUMMARY_METRICS = (("val_loss", False), ("policy_reward@1", True), ("normalized_gain", True))
#: Downstream metrics (a judge's verdicts) are shown too when present; larger is better.
JUDGE_PREFIX = "judge_"


def parse_every(text: str) -> tuple[float | None, int | None]:
    """``30s``, ``2m`` or ``0.5s`` -> (seconds, None); ``100`` -> (None, steps)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|steps?)?\s*", text)
    if match is None or float(match.group(1)) <= 0:
        raise LeverError(
            f"--progress-every: {text!r} is not a positive interval (expected e.g. 30s, "
            "2m, or a number of steps such as 100)"
        )
    number, unit = float(match.group(1)), match.group(2) or "steps"
    if unit.startswith("step"):
        if not number.is_integer():
            raise LeverError(f"--progress-every: {text!r}: a number of steps must be whole")
        return None, int(number)
    return (number * 60 if unit.startswith("m") else number), None


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


@dataclass
class _Console:
    """Per-run state of this plugin (in ``state.extra``)."""

    every_s: float | None = 30.0
    every_steps: int | None = None
    tty: bool = False
    bar: Any = None
    logger: Callable[[str], None] | None = None
    phase_started: float = 0.0
    phase_first_step: int = 0
    last_line_at: float = 0.0
    last_line_step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _console(state: TrainState) -> _Console:
    mine = state.extra.get(_KEY)
    if not isinstance(mine, _Console):
        mine = state.extra[_KEY] = _Console()
    return mine


PROGRESS_EVERY = Option(
    ("--progress-every",),
    "str",
    "30s",
    "Without a terminal, print a progress line this often: seconds (30s, 2m) or a "
    "number of steps (100). On a terminal a progress bar is shown instead.",
    metavar="INTERVAL",
)


@hookimpl
def add_options() -> Sequence[Option]:
    """How often a log file gets a progress line."""
    return [PROGRESS_EVERY]


@hookimpl
def on_train_start(state: TrainState) -> None:
    """Read --progress-every and whether stderr is a terminal."""
    mine = _console(state)
    mine.every_s, mine.every_steps = parse_every(str(PROGRESS_EVERY.of(state.options)))
    mine.tty = sys.stderr.isatty()


@hookimpl
def on_phase_start(state: TrainState) -> None:
    """Start the phase's bar (terminal) or its progress clock (log file)."""
    mine = _console(state)
    now = time.monotonic()
    mine.phase_started = mine.last_line_at = now
    mine.phase_first_step = mine.last_line_step = state.step
    if not mine.tty:
        return
    from tqdm import tqdm

    mine.bar = tqdm(
        total=state.epochs * state.steps_per_epoch,
        initial=state.step,
        desc=str(state.phase),
        unit="step",
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,
    )
    # Lines logged while the bar is shown are printed above it, not through it.
    outer = mine.logger = state.logger

    def above_bar(message: str) -> None:
        with tqdm.external_write_mode(file=sys.stderr):
            outer(message)

    state.logger = above_bar


@hookimpl
def on_step_end(state: TrainState) -> None:
    """Advance the bar, or print a progress line when the interval has passed."""
    mine = _console(state)
    loss = state.last_step.get("loss", math.nan)
    total = state.epochs * state.steps_per_epoch
    if mine.bar is not None:
        if mine.bar.total != total:
            mine.bar.total = total
        mine.bar.set_postfix_str(
            f"epoch {state.epoch}/{state.epochs} loss {loss:.4f}", refresh=False
        )
        mine.bar.update(state.step - mine.bar.n)
        return
    if mine.tty:
        return
    now = time.monotonic()
    due = (
        mine.every_steps is not None and state.step - mine.last_line_step >= mine.every_steps
    ) or (mine.every_s is not None and now - mine.last_line_at >= mine.every_s)
    if not due:
        return
    mine.last_line_at, mine.last_line_step = now, state.step
    done = state.step - mine.phase_first_step
    elapsed = now - mine.phase_started
    rate = done / elapsed if elapsed > 0 else 0.0
    left = max(total - state.step, 0)
    eta = _duration(left / rate) if rate > 0 else "?"
    percent = 100.0 * state.step / total if total else 100.0
    state.log(
        f"{state.phase} epoch {state.epoch}/{state.epochs} step "
        f"{state.step_in_epoch}/{state.steps_per_epoch}: loss {loss:.4f}  "
        f"{rate:.2f} steps/s  phase {percent:.0f}% ({state.step}/{total}), ETA {eta}"
    )


@hookimpl
def on_epoch_end(state: TrainState, metrics: dict[str, float]) -> None:
    """Print ``phase epoch n/N: metrics`` after each epoch."""
    extra = state.current_phase.log_metrics if state.current_phase is not None else ()
    state.log(
        f"{state.phase} epoch {state.epoch}/{state.epochs}: "
        f"{format_metrics(metrics, extra)}  ({metrics.get('epoch_seconds', 0.0):.1f}s)"
        + judge_cost_text(metrics)
    )


def judge_cost_text(metrics: dict[str, float]) -> str:
    """``  judge: 120 calls in 3.2 s, cache hits 40.0 %, 1 retry`` (empty without a judge)."""
    if "judge_calls" not in metrics:
        return ""
    retries, calls = int(metrics.get("judge_retries", 0)), int(metrics["judge_calls"])
    return (
        f"  judge: {calls} {'call' if calls == 1 else 'calls'} in "
        f"{metrics.get('judge_seconds', 0.0):.1f} s, cache hits "
        f"{100 * metrics.get('judge_cache_hit_rate', 0.0):.1f} %, "
        f"{retries} {'retry' if retries == 1 else 'retries'}"
    )


@hookimpl
def on_phase_end(state: TrainState) -> None:
    """Close the phase's bar."""
    _close_bar(state)


def _close_bar(state: TrainState) -> None:
    mine = _console(state)
    if mine.bar is not None:
        mine.bar.close()
        mine.bar = None
    if mine.logger is not None:
        state.logger, mine.logger = mine.logger, None


def summary_lines(
    start: dict[str, float],
    history: list[dict[str, Any]],
    best_metric: str | None,
    mode: str,
    chosen: dict[str, Any] | None = None,
) -> list[str]:
    """``metric start -> best (phase epoch) -> final`` lines, and the best epoch overall:
    ``chosen`` (``state.best``: the candidate checkpoint selection chose) when given,
    else the epoch with the best value of ``best_metric``."""
    if not history:
        return []
    keys = [k for k, _ in SUMMARY_METRICS]
    judge = sorted(
        {
            k
            for h in history
            for k in h
            if k.startswith(JUDGE_PREFIX)
            and not k.endswith(("_ci_low", "_ci_high"))
            and k not in lever_metrics.JUDGE_COST_METRICS
        }
    )
    rows = [(k, larger) for k, larger in SUMMARY_METRICS] + [(k, True) for k in judge]
    lines = []
    width = max(len(k) for k in [*keys, *judge])
    for key, larger in rows:
        seen = [(float(h[key]), h) for h in history if isinstance(h.get(key), int | float)]
        seen = [(v, h) for v, h in seen if math.isfinite(v)]
        if not seen:
            continue
        pick = max if larger else min
        best_value, best = pick(seen, key=lambda vh: vh[0])
        first = start.get(key)
        shown_start = f"{first:.4f}" if isinstance(first, int | float) else "-"
        lines.append(
            f"  {key:<{width}}  {shown_start} -> {best_value:.4f} "
            f"({best['phase']} {best['epoch']}) -> {seen[-1][0]:.4f}"
        )
    if not lines:
        return []
    by = best_metric or "policy_reward@1"
    larger = mode == "max" if best_metric else True
    ranked = [
        (float(h[by]), h)
        for h in history
        if isinstance(h.get(by), int | float) and math.isfinite(float(h[by]))
    ]
    head = "summary (start -> best (epoch) -> final):"
    if chosen and chosen.get("label") is not None and chosen.get("value") is not None:
        head = (
            f"summary (start -> best (epoch) -> final); best.safetensors: {chosen['label']} "
            f"by {chosen['metric']} {float(chosen['value']):.4f}"
        )
    elif ranked:
        value, best = (max if larger else min)(ranked, key=lambda vh: vh[0])
        head = (
            f"summary (start -> best (epoch) -> final); best epoch: {best['phase']} "
            f"{best['epoch']} by {by} {value:.4f}"
        )
    return [head, *lines]


@hookimpl
def on_train_end(state: TrainState) -> None:
    """Close any bar; print the run's summary."""
    _close_bar(state)
    for line in summary_lines(
        state.start_metrics,
        state.history,
        state.config.best_metric,
        state.config.best_mode,
        state.best,
    ):
        state.log(line)
    cost = judge_cost_line(state.history)
    if cost:
        state.log(cost)


def judge_cost_line(history: list[dict[str, Any]]) -> str | None:
    """The judge's cost totalled over the run's epochs (None without a judge): verdicts
    asked, seconds waited and retries summed; the cache hit rate is the mean of the
    epochs' rates (said so on the line)."""
    rows = [h for h in history if "judge_calls" in h]
    if not rows:
        return None
    calls = sum(float(h["judge_calls"]) for h in rows)
    seconds = sum(float(h.get("judge_seconds", 0.0)) for h in rows)
    retries = sum(float(h.get("judge_retries", 0.0)) for h in rows)
    rate = sum(float(h.get("judge_cache_hit_rate", 0.0)) for h in rows) / len(rows)
    return (
        f"judge cost: {calls:.0f} verdicts asked in {seconds:.1f} s, {retries:.0f} retries, "
        f"cache hit rate {rate:.3f} (mean over {len(rows)} epochs)"
    )

"""``lever-train plot``: a run's curves (or several runs', overlaid) in one picture.

Reads ``metrics.jsonl`` (the start validation and every epoch) and, when present,
``steps.jsonl`` (the logged steps) of each run directory. The x axis counts epochs
over the whole run: the start validation is 0, then the epochs of each phase in turn
(RCE 1..5, GRPO 6..8, ...), with logged steps placed inside their epoch; dotted lines
mark where a phase begins. Panels: training loss; validation loss; GRPO's KL and its
weight; ``policy_reward@1`` against ``random_reward`` and ``oracle_reward``;
``normalized_gain`` and ``spearman``; the downstream metrics (``judge_*``) when a run
has them. Each run has its own colour, named in the legend.

matplotlib is an optional extra (``pip install 'lever-trainer[plot]'``); this module
imports it only when drawing, and never imports torch.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LeverError
from .fileio import write_output

METRICS_FILE = "metrics.jsonl"
STEPS_FILE = "steps.jsonl"
#: File suffixes matplotlib writes without extra software.
FORMATS = (".png", ".svg", ".pdf")
INSTALL_HINT = "pip install 'lever-trainer[plot]'"


#: Values beyond this size are left out of the curves: no axis can show them beside
#: ordinary ones (and an axis spanning -1e308..1e308 overflows).
MAX_DRAWN = 1e100


def _number(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (not a bool) of a size an axis can
    show, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        return None
    return number if math.isfinite(number) and abs(number) <= MAX_DRAWN else None


@dataclass
class RunCurves:
    """What one run directory holds to draw."""

    name: str
    path: Path
    epochs: list[dict[str, Any]] = field(default_factory=list)  # start first, then epochs
    steps: list[dict[str, Any]] = field(default_factory=list)
    offsets: dict[str, int] = field(default_factory=dict)  # phase -> epochs before it
    notes: list[str] = field(default_factory=list)  # what was skipped, for the user

    def x_of_epoch(self, entry: dict[str, Any]) -> float:
        """Where an epoch entry sits on the run-wide epoch axis (start = 0)."""
        if entry.get("phase") == "start":
            return 0.0
        return float(self.offsets.get(str(entry.get("phase")), 0) + int(entry.get("epoch", 0)))

    def x_of_step(self, step: dict[str, Any]) -> float:
        """A logged step's place: inside its epoch, by its step in the epoch."""
        per_epoch = max(int(step.get("steps_per_epoch") or 1), 1)
        done = min(int(step.get("step") or 0), per_epoch) / per_epoch
        return self.offsets.get(str(step.get("phase")), 0) + int(step.get("epoch", 1)) - 1 + done

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """``(x, y)`` of an epoch metric, where it is a finite number."""
        xs, ys = [], []
        for entry in self.epochs:
            value = _number(entry.get(key))
            if value is not None:
                xs.append(self.x_of_epoch(entry))
                ys.append(value)
        return xs, ys

    def step_series(self, key: str, phase: str | None = None) -> tuple[list[float], list[float]]:
        """``(x, y)`` of a step value (of one phase, or all)."""
        xs, ys = [], []
        for step in self.steps:
            if phase is not None and step.get("phase") != phase:
                continue
            value = _number(step.get(key))
            if value is not None:
                xs.append(self.x_of_step(step))
                ys.append(value)
        return xs, ys

    def phases(self) -> list[str]:
        """The run's phases in the order they ran."""
        return list(self.offsets)


#: Largest epoch or step number a record may carry (a bigger one is not a run's).
MAX_COUNT = 10**9


def _count(entry: dict[str, Any], key: str, path: Path, number: int) -> None:
    """``entry[key]`` must be a whole number in ``[0, MAX_COUNT]`` (``epoch`` always; the
    others where present and not null)."""
    value = entry.get(key)
    if value is None and key != "epoch":
        return
    if (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and 0 <= value <= MAX_COUNT  # before float(): an integer past any float is refused
        and float(value).is_integer()
    ):
        entry[key] = int(value)
        return
    raise LeverError(
        f"{path}: line {number}: {key} is {value!r:.40}, expected a whole number from 0 "
        f"to {MAX_COUNT}"
    )


def _read_jsonl(path: Path, notes: list[str] | None = None) -> list[dict[str, Any]]:
    """The records of a run's JSON Lines file. A last line cut short (no newline at its
    end: what a killed run leaves) is skipped with a note; any other bad line is an error."""
    entries = []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise LeverError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise LeverError(f"{path}: not a UTF-8 text file") from None
    lines = text.splitlines()
    torn = bool(text) and not text.endswith(("\n", "\r"))
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            if torn and number == len(lines):
                if notes is not None:
                    notes.append(
                        f"{path}: skipped its last line {number}, cut short (the run was "
                        "stopped while writing it)"
                    )
                break
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            raise LeverError(f"{path}: line {number} is not JSON ({reason})") from None
        if not isinstance(entry, dict) or "phase" not in entry or "epoch" not in entry:
            raise LeverError(
                f"{path}: line {number} is not a lever-train record (expected an object "
                "with phase and epoch)"
            )
        for key in ("epoch", "step", "steps_per_epoch"):
            _count(entry, key, path, number)
        entries.append(entry)
    return entries


def read_run(path: Path, name: str | None = None) -> RunCurves:
    """The curves of the run in ``path`` (its ``metrics.jsonl``, and ``steps.jsonl``)."""
    if not path.is_dir():
        raise LeverError(f"{path}: not a directory (expected a lever-train run directory)")
    metrics = path / METRICS_FILE
    if not metrics.is_file():
        raise LeverError(
            f"{path}: no {METRICS_FILE} (not a lever-train run directory, or the run has "
            "not validated anything yet)"
        )
    run = RunCurves(name=name or path.name, path=path)
    run.epochs = _read_jsonl(metrics, run.notes)
    steps = path / STEPS_FILE
    if steps.is_file():
        run.steps = _read_jsonl(steps, run.notes)
    # Phases in the order they ran; each starts after the epochs of those before it.
    counts: dict[str, int] = {}
    for entry in [*run.epochs, *run.steps]:
        phase = str(entry.get("phase"))
        if phase == "start":
            continue
        counts[phase] = max(counts.get(phase, 0), int(entry.get("epoch") or 0))
    offset = 0
    for phase, count in counts.items():
        run.offsets[phase] = offset
        offset += count
    if not run.epochs and not run.steps:
        raise LeverError(f"{metrics}: empty (the run has not validated anything yet)")
    return run


def run_names(paths: Sequence[Path]) -> list[str]:
    """Legend names: the folder names, with parents added until they differ."""
    resolved = [p.resolve() for p in paths]
    depth = 1
    while True:
        names = ["/".join(p.parts[-depth:]) for p in resolved]
        if len(set(names)) == len(names) or depth >= max(len(p.parts) for p in resolved):
            return names
        depth += 1


def _positive_spread(values: Sequence[float]) -> float:
    positive = [v for v in values if v > 0]
    if len(positive) != len(values) or not positive:
        return 0.0
    return max(positive) / min(positive)


def _empty(ax: Any, message: str) -> None:
    ax.set_axis_off()
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _phase_marks(ax: Any, run: RunCurves) -> None:
    """Dotted lines where each phase of ``run`` begins, its name at the top; the epoch axis."""
    for phase in run.phases():
        start = run.offsets[phase]
        if start > 0:
            ax.axvline(start, color="0.6", linestyle=":", linewidth=1)
        label = ax.annotate(
            phase,
            (start, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -3),
            textcoords="offset points",
            va="top",
            fontsize=8,
            color="0.4",
            annotation_clip=True,  # only where the phase is in view
        )
        label.set_in_layout(False)
    ax.set_xlabel("epoch (0 = start)")
    ax.grid(True, alpha=0.3)


def _styles_legend(ax: Any, entries: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """A small legend of what each line style means (colours are runs)."""
    from matplotlib.lines import Line2D

    ax.legend(
        handles=[Line2D([], [], color="0.3", label=label, **kw) for label, kw in entries],
        fontsize=8,
        loc="best",
    )


def _panel_loss(ax: Any, runs: Sequence[RunCurves], colours: Sequence[str]) -> str:
    """Training loss: logged steps (thin) and epoch means (markers), per phase; a log
    scale when the values span more than a factor of 50."""
    loss_values: list[float] = []
    for run, colour in zip(runs, colours, strict=True):
        for phase in run.phases():
            xs, ys = run.step_series("loss", phase)
            ax.plot(xs, ys, color=colour, linewidth=0.8, alpha=0.45)
            loss_values += ys
        xs, ys = run.series("train_loss")
        ax.plot(xs, ys, color=colour, marker="o", markersize=3, linewidth=1.6)
        loss_values += ys
    if _positive_spread(loss_values) > 50:
        ax.set_yscale("log")
    ax.set_title("training loss")
    ax.set_ylabel("loss")
    _styles_legend(
        ax,
        [
            ("logged steps", {"linewidth": 0.8, "alpha": 0.5}),
            ("epoch mean (train_loss)", {"marker": "o", "markersize": 3}),
        ],
    )
    _phase_marks(ax, runs[0])
    return "training loss"


def _panel_val(ax: Any, runs: Sequence[RunCurves], colours: Sequence[str]) -> str:
    """Validation loss per epoch."""
    for run, colour in zip(runs, colours, strict=True):
        xs, ys = run.series("val_loss")
        ax.plot(xs, ys, color=colour, marker="o", markersize=3)
    ax.set_title("validation loss (RCE, raw rewards, tau = 1)")
    ax.set_ylabel("val_loss")
    _phase_marks(ax, runs[0])
    return "validation loss"


def _panel_kl(ax: Any, runs: Sequence[RunCurves], colours: Sequence[str]) -> str | None:
    """KL (logged steps and epoch means) with its weight on a right axis; ``None``, and a
    note in the panel, when no run logged either."""
    has_kl = False
    ax_beta = ax.twinx()
    kl_values: list[float] = []
    for run, colour in zip(runs, colours, strict=True):
        sx, sy = run.step_series("kl")
        ax.plot(sx, sy, color=colour, linewidth=0.8, alpha=0.45)
        xs, ys = run.series("train_kl")
        ax.plot(xs, ys, color=colour, marker="o", markersize=3)
        bx, by = run.series("kl_beta")
        ax_beta.plot(bx, by, color=colour, linestyle="--", marker="s", markersize=3)
        kl_values += sy + ys
        has_kl = has_kl or bool(ys or sy or by)
    if kl_values and min(kl_values) > 0:
        ax.set_yscale("log")
    ax.set_title("KL and its weight")
    ax.set_ylabel("KL (train_kl)")
    ax_beta.set_ylabel("KL weight (kl_beta)")
    if not has_kl:
        ax_beta.set_axis_off()
        _empty(ax, "no KL: the runs have no GRPO epochs")
        return None
    _styles_legend(
        ax,
        [
            ("KL, logged steps", {"linewidth": 0.8, "alpha": 0.5}),
            ("KL, epoch mean", {"marker": "o", "markersize": 3}),
            ("kl_beta (right axis)", {"linestyle": "--", "marker": "s", "markersize": 3}),
        ],
    )
    _phase_marks(ax, runs[0])
    return "KL"


def _panel_reward(ax: Any, runs: Sequence[RunCurves], colours: Sequence[str]) -> str:
    """policy_reward@1 against the random and oracle rewards."""
    for run, colour in zip(runs, colours, strict=True):
        for key, style in (
            ("policy_reward@1", "-"),
            ("random_reward", ":"),
            ("oracle_reward", "-."),
        ):
            xs, ys = run.series(key)
            marker = "o" if style == "-" else None
            ax.plot(xs, ys, color=colour, linestyle=style, marker=marker, markersize=3)
    ax.set_title("policy_reward@1 against random and oracle")
    ax.set_ylabel("raw reward")
    _styles_legend(
        ax,
        [
            ("oracle_reward", {"linestyle": "-."}),
            ("policy_reward@1", {"marker": "o", "markersize": 3}),
            ("random_reward", {"linestyle": ":"}),
        ],
    )
    _phase_marks(ax, runs[0])
    return "policy_reward@1"


def _panel_gain(ax: Any, runs: Sequence[RunCurves], colours: Sequence[str]) -> str:
    """Normalized gain (solid) and rank correlation (dashed), with the zero line."""
    for run, colour in zip(runs, colours, strict=True):
        xs, ys = run.series("normalized_gain")
        ax.plot(xs, ys, color=colour, marker="o", markersize=3)
        xs, ys = run.series("spearman")
        ax.plot(xs, ys, color=colour, linestyle="--", linewidth=1)
    ax.axhline(0.0, color="0.4", linewidth=0.8)
    ax.set_title("normalized gain (0 = random, 1 = oracle), rank correlation")
    _styles_legend(
        ax,
        [
            ("normalized_gain", {"marker": "o", "markersize": 3}),
            ("spearman", {"linestyle": "--", "linewidth": 1}),
        ],
    )
    _phase_marks(ax, runs[0])
    return "normalized_gain"


def _panel_judge(ax: Any, runs: Sequence[RunCurves], colours: Sequence[str]) -> str | None:
    """The ``judge_*`` metrics, one line style each; ``None``, and a note in the panel,
    when no run has any."""
    judge_keys = sorted({k for r in runs for e in r.epochs for k in e if k.startswith("judge_")})
    if not judge_keys:
        _empty(ax, "no downstream metrics\n(judge_* keys appear when a judge runs in validation)")
        return None
    styles = ["-", "--", "-.", ":"]
    for run, colour in zip(runs, colours, strict=True):
        for i, key in enumerate(judge_keys):
            xs, ys = run.series(key)
            ax.plot(xs, ys, color=colour, linestyle=styles[i % 4], marker="o", markersize=3)
    _styles_legend(ax, [(key, {"linestyle": styles[i % 4]}) for i, key in enumerate(judge_keys)])
    ax.set_title("downstream metrics (a judge's verdicts)")
    _phase_marks(ax, runs[0])
    return "downstream"


def draw(runs: Sequence[RunCurves], output: Path, title: str | None = None) -> list[str]:
    """Draw ``runs`` into ``output`` (PNG, SVG or PDF); returns the panels drawn."""
    if output.suffix.lower() not in FORMATS:
        raise LeverError(f"--output: {output.name}: expected a file ending in {', '.join(FORMATS)}")
    try:
        import matplotlib
    except ImportError:
        raise LeverError(
            f"lever-train plot needs matplotlib, which is not installed: {INSTALL_HINT}"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colours = [f"C{i % 10}" for i in range(len(runs))]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9), constrained_layout=True)
    panels = (_panel_loss, _panel_val, _panel_kl, _panel_reward, _panel_gain, _panel_judge)
    drawn = [
        name
        for panel, ax in zip(panels, axes.flat, strict=True)
        if (name := panel(ax, runs, colours)) is not None
    ]
    handles = [
        Line2D([], [], color=colour, linewidth=2.5, label=run.name)
        for run, colour in zip(runs, colours, strict=True)
    ]
    fig.legend(
        handles=handles,
        loc="outside upper center",
        ncols=min(len(runs), 6),
        title=title,  # above the run names (a suptitle would overlap them)
        frameon=False,
    )
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format=output.suffix.lower()[1:], dpi=110)
    finally:
        plt.close(fig)
    write_output(output, buffer.getvalue(), "--output")
    return drawn


__all__ = ["FORMATS", "INSTALL_HINT", "RunCurves", "draw", "read_run", "run_names"]

"""The nine raw-reward modes (``--reward-mode``). On by default.

Fields a candidate lacks count as 0: ``h = vqa_correct``, ``s = vqa_acc_score``,
``g = vqa_gt_prob``, ``l = vqa_rel_score``; weights ``wh``, ``ws``, ``wl`` are
``--hard-weight``, ``--soft-weight``, ``--rel-weight``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lever_trainer.api import DATA_COMMANDS, About, Option, RawRewardFn, RewardParams, hookimpl


@hookimpl
def about() -> About:
    """What ``lever-train plugins`` shows of this plugin."""
    return About(
        description="raw-reward modes: hard_plus_soft (default), ..., legacy",
        enabled_by_default=True,
    )


Candidate = Mapping[str, Any]


def _f(cand: Candidate, name: str) -> float:
    value = cand.get(name)
    return 0.0 if value is None else float(value)


def hard_plus_soft(c: Candidate, p: RewardParams) -> float:
    """``wh*h + ws*s``."""
    return p.hard * _f(c, "vqa_correct") + p.soft * _f(c, "vqa_acc_score")


def hard_plus_soft_v2(c: Candidate, p: RewardParams) -> float:
    """``ws*s + 2*wh*h``."""
    return p.soft * _f(c, "vqa_acc_score") + 2 * p.hard * _f(c, "vqa_correct")


def separated(c: Candidate, p: RewardParams) -> float:
    """``2*wh + ws*s`` for a correct answer, else ``ws*s``."""
    soft = p.soft * _f(c, "vqa_acc_score")
    return 2 * p.hard + soft if _f(c, "vqa_correct") == 1 else soft


def hard_only(c: Candidate, p: RewardParams) -> float:
    """``wh*h``."""
    return p.hard * _f(c, "vqa_correct")


def soft_only(c: Candidate, p: RewardParams) -> float:
    """``ws*s``."""
    return p.soft * _f(c, "vqa_acc_score")


def hard01_plus_gtprob(c: Candidate, p: RewardParams) -> float:
    """``wh*h + ws*g``."""
    return p.hard * _f(c, "vqa_correct") + p.soft * _f(c, "vqa_gt_prob")


def hard01_plus_gtprob_separated(c: Candidate, p: RewardParams) -> float:
    """``2*wh + ws*g`` for a correct answer, else ``ws*g``."""
    soft = p.soft * _f(c, "vqa_gt_prob")
    return 2 * p.hard + soft if _f(c, "vqa_correct") == 1 else soft


def hard_plus_gtprob_plus_rel(c: Candidate, p: RewardParams) -> float:
    """``wh*h + ws*g + wl*(1-h)*l``."""
    h = _f(c, "vqa_correct")
    return p.hard * h + p.soft * _f(c, "vqa_gt_prob") + p.rel * (1 - h) * _f(c, "vqa_rel_score")


def legacy(c: Candidate, p: RewardParams) -> float:
    """``alpha*quality + beta*correctness`` of the upstream beam-search rewards.

    quality: ``-logprob_score`` with ``--use-logprob`` (when present), else
    ``beam_score``, else 0. correctness: ``h`` (``s`` when ``h`` is missing) in
    ``01`` mode, ``2h - 1`` (``2s - 1``) in ``pm1`` mode.
    """
    if p.option("use_logprob", False) and c.get("logprob_score") is not None:
        quality = -_f(c, "logprob_score")
    else:
        quality = _f(c, "beam_score")
    base = _f(c, "vqa_correct") if c.get("vqa_correct") is not None else _f(c, "vqa_acc_score")
    correctness = base if p.option("correctness_mode", "01") == "01" else 2 * base - 1
    alpha, beta = float(p.option("reward_alpha", 1.0)), float(p.option("reward_beta", 1.0))
    return alpha * quality + beta * correctness


MODES: dict[str, RawRewardFn] = {
    "hard_plus_soft": hard_plus_soft,
    "hard_plus_soft_v2": hard_plus_soft_v2,
    "separated": separated,
    "hard_only": hard_only,
    "soft_only": soft_only,
    "hard01_plus_gtprob": hard01_plus_gtprob,
    "hard01_plus_gtprob_separated": hard01_plus_gtprob_separated,
    "hard_plus_gtprob_plus_rel": hard_plus_gtprob_plus_rel,
    "legacy": legacy,
}


@hookimpl
def reward_modes() -> Mapping[str, RawRewardFn]:
    """All nine modes."""
    return MODES


REWARD_ALPHA = Option(
    ("--reward-alpha", "--reward_alpha"),
    "float",
    1.0,
    "legacy mode: weight of the beam quality.",
    commands=DATA_COMMANDS,
)
REWARD_BETA = Option(
    ("--reward-beta", "--reward_beta"),
    "float",
    1.0,
    "legacy mode: weight of the correctness.",
    commands=DATA_COMMANDS,
)
CORRECTNESS_MODE = Option(
    ("--correctness-mode", "--correctness_mode"),
    "choice",
    "01",
    "legacy mode: correctness as 0/1 or -1/+1.",
    choices=("01", "pm1"),
    commands=DATA_COMMANDS,
)
USE_LOGPROB = Option(
    ("--use-logprob", "--use_logprob"),
    "bool",
    False,
    "legacy mode: quality = -logprob_score instead of beam_score.",
    commands=DATA_COMMANDS,
)


@hookimpl
def add_options() -> Sequence[Option]:
    """The settings of the ``legacy`` mode."""
    return [
        REWARD_ALPHA,
        REWARD_BETA,
        CORRECTNESS_MODE,
        USE_LOGPROB,
    ]

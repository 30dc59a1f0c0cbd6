"""Reward formulas and group normalisers (docs/algorithm.md#rewards), supplied by the built-in
``reward-modes`` and ``normalizers`` plugins through the ``reward_modes`` and
``normalizers`` hooks.

Every expected value is worked out by hand from the tables of docs/algorithm.md#rewards in the comment beside it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import Result
from conftest import assert_user_error, builtin_registry, write_json
from safetensors.torch import load_file

from lever_trainer import hookimpl
from lever_trainer.data import DataOptions, cache_path_for, load_rl_data
from lever_trainer.errors import LeverError, PluginError
from lever_trainer.plugins import load_plugins
from lever_trainer.rewards import (
    RAW_REWARD_CLIP,
    RewardParams,
    RewardRegistry,
    registry_from_plugins,
)

Cli = Callable[..., Result]

NINE_MODES = [
    "hard_plus_soft",
    "hard_plus_soft_v2",
    "separated",
    "hard_only",
    "soft_only",
    "hard01_plus_gtprob",
    "hard01_plus_gtprob_separated",
    "hard_plus_gtprob_plus_rel",
    "legacy",
]

# h = vqa_correct, s = vqa_acc_score, g = vqa_gt_prob, l = vqa_rel_score
A = {"vqa_correct": 1, "vqa_acc_score": 0.6, "vqa_gt_prob": 0.8, "vqa_rel_score": 0.5}
B = {"vqa_correct": 0, "vqa_acc_score": 0.3, "vqa_gt_prob": 0.2, "vqa_rel_score": 0.7}
EMPTY: dict[str, Any] = {}  # every field missing: h = s = g = l = 0
DEFAULT = RewardParams()  # wh 1, ws 1, wl 0.1

#: The plugin options behind the legacy mode's and z_score_clamp's settings.
PLUGIN_OPTION = {
    "alpha": "reward_alpha",
    "beta": "reward_beta",
    "correctness": "correctness_mode",
    "use_logprob": "use_logprob",
    "clamp": "normalize_clamp",
}


def params(**kw: Any) -> RewardParams:
    """RewardParams with the legacy/normaliser settings given by their short names."""
    weights = {k: kw.pop(k) for k in ("hard", "soft", "rel") if k in kw}
    return RewardParams(**weights, options={PLUGIN_OPTION[k]: v for k, v in kw.items()})


WEIGHTED = RewardParams(hard=2.0, soft=0.5, rel=0.4)


@pytest.fixture(scope="module")
def registry() -> RewardRegistry:
    return builtin_registry()


def raw(registry: RewardRegistry, mode: str, cand: Mapping[str, Any], p: RewardParams) -> float:
    return float(registry.raw_fn(mode)(cand, p))


# ----------------------------------------------------------------- the nine modes
def test_all_nine_modes_come_from_the_reward_modes_plugin(registry: RewardRegistry) -> None:
    assert sorted(registry.modes) == sorted(NINE_MODES)
    assert {registry.providers[f"mode:{m}"] for m in NINE_MODES} == {"reward-modes"}
    assert sorted(registry.normalizers) == ["rank", "z_score", "z_score_clamp"]
    assert {registry.providers[f"normalizer:{n}"] for n in registry.normalizers} == {"normalizers"}


@pytest.mark.parametrize(
    ("mode", "params", "expected"),
    [
        # hard_plus_soft: wh*h + ws*s
        ("hard_plus_soft", DEFAULT, [1.6, 0.3, 0.0]),  # 1 + 0.6; 0 + 0.3; 0
        ("hard_plus_soft", WEIGHTED, [2.3, 0.15, 0.0]),  # 2*1 + 0.5*0.6; 0.5*0.3
        # hard_plus_soft_v2: ws*s + 2*wh*h
        ("hard_plus_soft_v2", DEFAULT, [2.6, 0.3, 0.0]),  # 0.6 + 2; 0.3
        ("hard_plus_soft_v2", WEIGHTED, [4.3, 0.15, 0.0]),  # 0.3 + 2*2; 0.15
        # separated: 2*wh + ws*s if h == 1 (A) else ws*s (B, EMPTY)
        ("separated", DEFAULT, [2.6, 0.3, 0.0]),  # 2 + 0.6; 0.3
        ("separated", WEIGHTED, [4.3, 0.15, 0.0]),  # 2*2 + 0.3; 0.15
        # hard_only: wh*h
        ("hard_only", DEFAULT, [1.0, 0.0, 0.0]),
        ("hard_only", WEIGHTED, [2.0, 0.0, 0.0]),
        # soft_only: ws*s
        ("soft_only", DEFAULT, [0.6, 0.3, 0.0]),
        ("soft_only", WEIGHTED, [0.3, 0.15, 0.0]),
        # hard01_plus_gtprob: wh*h + ws*g
        ("hard01_plus_gtprob", DEFAULT, [1.8, 0.2, 0.0]),  # 1 + 0.8; 0.2
        ("hard01_plus_gtprob", WEIGHTED, [2.4, 0.1, 0.0]),  # 2 + 0.4; 0.1
        # hard01_plus_gtprob_separated: 2*wh + ws*g if h == 1 else ws*g
        ("hard01_plus_gtprob_separated", DEFAULT, [2.8, 0.2, 0.0]),  # 2 + 0.8; 0.2
        ("hard01_plus_gtprob_separated", WEIGHTED, [4.4, 0.1, 0.0]),  # 4 + 0.4; 0.1
        # hard_plus_gtprob_plus_rel: wh*h + ws*g + wl*(1-h)*l
        # A (h = 1): 1 + 0.8 + 0.1*0*0.5 = 1.8; B (h = 0): 0 + 0.2 + 0.1*1*0.7 = 0.27
        ("hard_plus_gtprob_plus_rel", DEFAULT, [1.8, 0.27, 0.0]),
        # A: 2 + 0.4 + 0 = 2.4; B: 0 + 0.1 + 0.4*0.7 = 0.38
        ("hard_plus_gtprob_plus_rel", WEIGHTED, [2.4, 0.38, 0.0]),
    ],
)
def test_weighted_modes_by_hand(
    registry: RewardRegistry, mode: str, params: RewardParams, expected: list[float]
) -> None:
    got = [raw(registry, mode, c, params) for c in (A, B, EMPTY)]
    assert got == pytest.approx(expected)


def test_separated_modes_branch_on_h_not_on_the_sum(registry: RewardRegistry) -> None:
    # same s and g, only h differs: the "h == 1" branch adds 2*wh, the other does not
    right = {"vqa_correct": 1, "vqa_acc_score": 0.0, "vqa_gt_prob": 0.0}
    wrong = {"vqa_correct": 0, "vqa_acc_score": 1.0, "vqa_gt_prob": 1.0}
    p = RewardParams(hard=1.5, soft=3.0)
    assert raw(registry, "separated", right, p) == pytest.approx(3.0)  # 2*1.5 + 3*0
    assert raw(registry, "separated", wrong, p) == pytest.approx(3.0)  # 3*1
    assert raw(registry, "hard01_plus_gtprob_separated", right, p) == pytest.approx(3.0)
    assert raw(registry, "hard01_plus_gtprob_separated", wrong, p) == pytest.approx(3.0)
    # a missing h is 0: the else branch
    assert raw(registry, "separated", {"vqa_acc_score": 0.5}, p) == pytest.approx(1.5)


BEAM = {"beam_score": 2.0, "logprob_score": -1.5, "vqa_correct": 1, "vqa_acc_score": 0.6}
BEAM_WRONG = {"beam_score": 2.0, "logprob_score": -0.5, "vqa_correct": 0, "vqa_acc_score": 0.9}
NO_H = {"beam_score": 0.5, "vqa_acc_score": 0.75}  # h missing: correctness uses s
NULL_H = {"beam_score": 0.5, "vqa_correct": None, "vqa_acc_score": 0.75}  # null = missing


@pytest.mark.parametrize(
    ("cand", "params", "expected"),
    [
        # alpha*quality + beta*correctness; quality = beam_score, correctness = h (01)
        (BEAM, DEFAULT, 3.0),  # 2 + 1
        (BEAM_WRONG, DEFAULT, 2.0),  # 2 + 0
        (BEAM, params(alpha=0.5, beta=3.0), 4.0),  # 0.5*2 + 3*1
        # use_logprob: quality = -logprob_score
        (BEAM, params(use_logprob=True), 2.5),  # 1.5 + 1
        (BEAM_WRONG, params(use_logprob=True, alpha=2.0), 1.0),  # 2*0.5 + 0
        # pm1: correctness = 2h - 1
        (BEAM, params(correctness="pm1"), 3.0),  # 2 + (2 - 1)
        (BEAM_WRONG, params(correctness="pm1"), 1.0),  # 2 + (0 - 1)
        (BEAM_WRONG, params(correctness="pm1", use_logprob=True, beta=2.0), -1.5),
        # ^ 0.5 + 2*(0 - 1)
        # h missing: correctness = s (01) or 2s - 1 (pm1)
        (NO_H, DEFAULT, 1.25),  # 0.5 + 0.75
        (NO_H, params(correctness="pm1"), 1.0),  # 0.5 + (1.5 - 1)
        (NULL_H, DEFAULT, 1.25),
        (NULL_H, params(correctness="pm1", beta=4.0), 2.5),  # 0.5 + 4*0.5
        # nothing at all: quality 0, correctness 0 (01) or 2*0 - 1 (pm1)
        (EMPTY, DEFAULT, 0.0),
        (EMPTY, params(correctness="pm1"), -1.0),
        ({"vqa_correct": 1}, params(alpha=7.0), 1.0),  # no beam_score: quality 0
    ],
)
def test_legacy_mode_by_hand(
    registry: RewardRegistry, cand: dict[str, Any], params: RewardParams, expected: float
) -> None:
    assert raw(registry, "legacy", cand, params) == pytest.approx(expected)


# ----------------------------------------------------------------- through the loader
def load(
    tmp_path: Path, cands: list[dict[str, Any]], opts: DataOptions
) -> tuple[list[float], list[float]]:
    """One query (id 0) with ``cands``; returns its (raw, normalised) rewards."""
    seqs = [[2 * i + 1, 2 * i + 2] for i in range(len(cands))]
    data = {
        "0": {"pointer_candidates": [{"pointer": s, **c} for s, c in zip(seqs, cands, strict=True)]}
    }
    table, _ = load_rl_data(write_json(tmp_path / "rl.json", data), opts, builtin_registry())
    n = int(table.group_len[0])
    return table.rewards_raw[0, :n].tolist(), table.rewards_norm[0, :n].tolist()


def test_raw_rewards_are_clipped_to_five(tmp_path: Path) -> None:
    assert RAW_REWARD_CLIP == 5.0
    cands = [
        {"beam_score": 2.0, "vqa_correct": 1},  # 10*2 + 1 = 21 -> 5
        {"beam_score": -0.7, "vqa_correct": 0},  # 10*(-0.7) + 0 = -7 -> -5
        {"beam_score": 0.01, "vqa_correct": 0},  # 10*0.01 = 0.1, inside the range
    ]
    opts = DataOptions(reward_mode="legacy", reward_params=params(alpha=10.0))
    got, _ = load(tmp_path, cands, opts)
    assert got == pytest.approx([5.0, -5.0, 0.1])

    # use_logprob: quality = -logprob_score = -3, alpha 10 -> -30 + 1 = -29 -> -5
    opts = DataOptions(reward_mode="legacy", reward_params=params(alpha=10.0, use_logprob=True))
    got, _ = load(tmp_path, [{"logprob_score": 3.0, "vqa_correct": 1}, {}], opts)
    assert got == pytest.approx([-5.0, 0.0])

    # hard_plus_soft_v2 with wh = 3: 0.5 + 2*3*1 = 6.5 -> 5
    opts = DataOptions(reward_mode="hard_plus_soft_v2", reward_params=RewardParams(hard=3.0))
    got, _ = load(tmp_path, [{"vqa_correct": 1, "vqa_acc_score": 0.5}, {}], opts)
    assert got == pytest.approx([5.0, 0.0])


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("hard_plus_soft", [1.6, 0.3, 0.0]),
        ("soft_only", [0.6, 0.3, 0.0]),
        ("hard_plus_gtprob_plus_rel", [1.8, 0.27, 0.0]),
        ("legacy", [1.0, 0.0, 0.0]),  # no beam_score: quality 0, correctness h
    ],
)
def test_loader_uses_the_chosen_mode(tmp_path: Path, mode: str, expected: list[float]) -> None:
    got, _ = load(tmp_path, [A, B, EMPTY], DataOptions(reward_mode=mode))
    assert got == pytest.approx(expected)


# ----------------------------------------------------------------- normalisers
def norm(registry: RewardRegistry, method: str, values: list[float], clamp: float = 3.0) -> Any:
    out = registry.normalize_fn(method)(torch.tensor(values), params(clamp=clamp))
    assert out.dtype == torch.float32
    return out.tolist()


def test_z_score_by_hand(registry: RewardRegistry) -> None:
    # [1, 3, 5]: mean 3, unbiased var (4 + 0 + 4) / 2 = 4, std 2 -> [-1, 0, 1]
    assert norm(registry, "z_score", [1.0, 3.0, 5.0]) == pytest.approx([-1.0, 0.0, 1.0])
    # [1, 0 x 10]: mean 1/11, var ((10/11)^2 + 10*(1/11)^2) / 10 = 1/11, std 1/sqrt(11);
    # z(1) = (10/11)*sqrt(11) = 10/sqrt(11) = 3.015 (no clamp), z(0) = -1/sqrt(11)
    got = norm(registry, "z_score", [1.0] + [0.0] * 10)
    assert got == pytest.approx([10 / math.sqrt(11)] + [-1 / math.sqrt(11)] * 10, abs=1e-6)


def test_z_score_clamp_by_hand(registry: RewardRegistry) -> None:
    # [0, 1, 2]: mean 1, std 1 -> z [-1, 0, 1]; clamp 0.5 -> [-0.5, 0, 0.5]
    assert norm(registry, "z_score_clamp", [0.0, 1.0, 2.0], clamp=0.5) == pytest.approx(
        [-0.5, 0.0, 0.5]
    )
    # default clamp 3 does not bind on [-1, 0, 1]
    assert norm(registry, "z_score_clamp", [0.0, 1.0, 2.0]) == pytest.approx([-1.0, 0.0, 1.0])
    # [1, 0 x 10]: 3.015 -> 3, -1/sqrt(11) = -0.3015 -> -0.25 with clamp 0.25
    got = norm(registry, "z_score_clamp", [1.0] + [0.0] * 10)
    assert got == pytest.approx([3.0] + [-1 / math.sqrt(11)] * 10, abs=1e-6)
    got = norm(registry, "z_score_clamp", [1.0] + [0.0] * 10, clamp=0.25)
    assert got == pytest.approx([0.25] + [-0.25] * 10)


@pytest.mark.parametrize("method", ["z_score", "z_score_clamp"])
@pytest.mark.parametrize(
    "values",
    [[1.5], [2.0, 2.0], [0.0, 0.0, 0.0], [0.3] * 7, [0.1] * 11, [4.9] * 13],
    ids=["n=1", "two-equal", "zeros", "0.3x7", "0.1x11", "4.9x13"],
)
def test_z_scores_keep_raw_rewards_when_std_is_zero(
    registry: RewardRegistry, method: str, values: list[float]
) -> None:
    # n = 1 or std 0: the normalised reward is the raw reward unchanged. 0.3 x 7 has
    # std 0 exactly; in float32 arithmetic it comes out as 3e-8, which once gave 0.93.
    got = norm(registry, method, values, clamp=0.1)
    assert got == torch.tensor(values).tolist()


def test_rank_by_hand(registry: RewardRegistry) -> None:
    # 1 - 2*rank/(n-1), rank 0 = highest; ties: the lower index ranks first.
    # [0.5, 2.0, 0.5, 1.0]: ranks [2, 0, 3, 1], n - 1 = 3 -> [1-4/3, 1, 1-2, 1-2/3]
    got = norm(registry, "rank", [0.5, 2.0, 0.5, 1.0])
    assert got == pytest.approx([-1 / 3, 1.0, -1.0, 1 / 3])
    # all equal: ranks by index [0, 1, 2] -> [1, 0, -1] (no std special case for rank)
    assert norm(registry, "rank", [2.0, 2.0, 2.0]) == pytest.approx([1.0, 0.0, -1.0])
    assert norm(registry, "rank", [-3.0, 4.0]) == pytest.approx([-1.0, 1.0])
    assert norm(registry, "rank", [7.0]) == [0.0]  # n = 1


def test_loader_normalises_each_group(tmp_path: Path) -> None:
    cands = [{"vqa_acc_score": 0.5}, {"vqa_acc_score": 1.0}, {"vqa_correct": 1}]
    # hard_plus_soft raw: [0.5, 1.0, 1.0]; rank: [2, 0, 1] -> [-1, 1, 0]
    raw_, got = load(tmp_path, cands, DataOptions(normalize="rank"))
    assert raw_ == pytest.approx([0.5, 1.0, 1.0])
    assert got == pytest.approx([-1.0, 1.0, 0.0])
    # mean 5/6, deviations [-1/3, 1/6, 1/6], var (1/9 + 1/36 + 1/36) / 2 = 1/12,
    # std 1/sqrt(12): z = [-2/sqrt(3), 1/sqrt(3), 1/sqrt(3)] = [-1.155, 0.577, 0.577]
    _, got = load(tmp_path, cands, DataOptions(normalize="z_score"))
    r3 = math.sqrt(3)
    assert got == pytest.approx([-2 / r3, 1 / r3, 1 / r3], abs=1e-6)
    opts = DataOptions(normalize="z_score_clamp", reward_params=params(clamp=1.0))
    _, got = load(tmp_path, cands, opts)
    assert got == pytest.approx([-1.0, 1 / r3, 1 / r3], abs=1e-6)
    # seven candidates all at 0.3: std 0, normalised = raw
    _, got = load(tmp_path, [{"vqa_acc_score": 0.3}] * 7, DataOptions())
    assert got == pytest.approx([0.3] * 7)


# ----------------------------------------------------------------- the registry
def test_unknown_mode_and_normaliser_name_the_flag_and_the_choices(
    registry: RewardRegistry,
) -> None:
    with pytest.raises(LeverError) as err:
        registry.raw_fn("nope")
    msg = str(err.value)
    assert msg.startswith("--reward-mode") and "'nope'" in msg
    assert "available: " + ", ".join(sorted(NINE_MODES)) in msg
    with pytest.raises(LeverError) as err:
        registry.normalize_fn("minmax")
    assert str(err.value).startswith("--normalize") and "'minmax'" in str(err.value)
    assert "available: rank, z_score, z_score_clamp" in str(err.value)
    with pytest.raises(LeverError, match=r"available: none"):
        RewardRegistry().raw_fn("hard_plus_soft")


def test_registry_add_errors() -> None:
    reg = RewardRegistry()
    reg.add("mode", "one", {"m": lambda c, p: 1.0})
    reg.add("mode", "one", {"m": lambda c, p: 2.0})  # the same plugin again: replaced
    assert reg.raw_fn("m")({}, DEFAULT) == 2.0
    with pytest.raises(PluginError) as err:
        reg.add("mode", "two", {"m": lambda c, p: 3.0})
    assert "one" in str(err.value) and "two" in str(err.value) and "'m'" in str(err.value)
    with pytest.raises(PluginError, match=r"plugin two: normalizer 'n' is not callable"):
        reg.add("normalizer", "two", {"n": 3.0})
    # a mode and a normaliser may share a name
    reg.add("normalizer", "two", {"m": lambda r, p: r})
    assert reg.providers == {"mode:m": "one", "normalizer:m": "two"}


class ExtraModes:
    """An in-test plugin object answering ``reward_modes`` with ``answer``."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer

    @hookimpl
    def reward_modes(self) -> Any:
        return self.answer


def test_a_plugin_adds_a_mode_without_core_edits(tmp_path: Path) -> None:
    plugin = ExtraModes({"acc_cubed": lambda c, p: p.soft * (c.get("vqa_acc_score") or 0) ** 3})
    plugins = load_plugins(enable=["cubed"], extra=[("cubed", plugin)])
    registry = registry_from_plugins(plugins)
    assert registry.providers["mode:acc_cubed"] == "cubed"
    assert "hard_plus_soft" in registry.modes  # the built-ins are still there
    opts = DataOptions(reward_mode="acc_cubed", reward_params=RewardParams(soft=2.0))
    data = {"0": {"pointer_candidates": [{"pointer": [1], "vqa_acc_score": 0.5}, {"pointer": [2]}]}}
    table, _ = load_rl_data(write_json(tmp_path / "rl.json", data), opts, registry=registry)
    assert table.rewards_raw[0].tolist() == pytest.approx([0.25, 0.0])  # 2 * 0.5^3; 0
    # not enabled: the mode does not exist
    with pytest.raises(LeverError, match=r"--reward-mode.*'acc_cubed'"):
        load_rl_data(tmp_path / "rl.json", opts, builtin_registry())


@pytest.mark.parametrize(
    ("answer", "fragments"),
    [
        ({"soft_only": lambda c, p: 0.0}, ["reward-modes", "mine", "'soft_only'", "--no-plugin"]),
        ({"broken": "not a function"}, ["plugin mine", "'broken'", "not callable"]),
        (["soft_only"], ["plugin mine", "reward_modes", "mapping", "list"]),
    ],
    ids=["same-name", "not-callable", "not-a-mapping"],
)
def test_bad_reward_mode_plugins_are_plugin_errors(answer: Any, fragments: list[str]) -> None:
    plugins = load_plugins(enable=["mine"], extra=[("mine", ExtraModes(answer))])
    with pytest.raises(PluginError) as err:
        registry_from_plugins(plugins)
    for frag in fragments:
        assert frag in str(err.value), (frag, str(err.value))


def test_a_failing_mode_names_the_query_and_candidate(tmp_path: Path) -> None:
    plugin = ExtraModes({"boom": lambda c, p: 1.0 / c["vqa_acc_score"]})
    registry = registry_from_plugins(load_plugins(enable=["b"], extra=[("b", plugin)]))
    data = {"4": {"pointer_candidates": [{"pointer": [1], "vqa_acc_score": 0.0}]}}
    path = write_json(tmp_path / "rl.json", data)
    with pytest.raises(PluginError) as err:
        load_rl_data(path, DataOptions(reward_mode="boom"), registry=registry)
    assert "query 4 candidate 0" in str(err.value) and "'boom'" in str(err.value)
    assert "ZeroDivisionError" in str(err.value)


# ----------------------------------------------------------------- the command line
CLI_DATA = {
    # query 1: A, B, EMPTY; query 2: one candidate s = 0.9, h = 0
    "1": {
        "pointer_candidates": [
            {"pointer": [3, 4], **A},
            {"pointer": [4, 5], **B},
            {"pointer": [5, 6]},
        ]
    },
    "2": {"pointer_candidates": [{"pointer": [7, 8], "vqa_correct": 0, "vqa_acc_score": 0.9}]},
}


def prepared(cli: Cli, path: Path, *args: str) -> tuple[list[list[float]], list[list[float]], str]:
    """``lever-train prepare``; the table's real (raw, normalised) rewards and the output."""
    result = cli("prepare", "--beam-data", path, *args)
    assert result.exit_code == 0, result.output
    t = load_file(str(cache_path_for(path)))
    n = t["group_len"].tolist()
    rows = range(len(n))
    rewards_raw = [t["rewards_raw"][i, : n[i]].tolist() for i in rows]
    rewards_norm = [t["rewards_norm"][i, : n[i]].tolist() for i in rows]
    return rewards_raw, rewards_norm, result.output


def test_cli_reward_mode_and_weights(cli: Cli, tmp_path: Path) -> None:
    path = write_json(tmp_path / "rl.json", CLI_DATA)
    got, _, _ = prepared(cli, path)  # default hard_plus_soft
    assert got[0] == pytest.approx([1.6, 0.3, 0.0]) and got[1] == pytest.approx([0.9])
    got, _, _ = prepared(cli, path, "--reward-mode", "soft_only")
    assert got[0] == pytest.approx([0.6, 0.3, 0.0]) and got[1] == pytest.approx([0.9])
    # upstream spellings; ws = 2: [1.2, 0.6, 0], [1.8]
    got, _, _ = prepared(cli, path, "--reward_mode", "soft_only", "--soft_weight", "2")
    assert got[0] == pytest.approx([1.2, 0.6, 0.0]) and got[1] == pytest.approx([1.8])
    # wh*h + ws*g + wl*(1-h)*l with wh 2, ws 0.5, wl 0.4: A 2.4, B 0.38; query 2: 0
    args = ["--reward-mode", "hard_plus_gtprob_plus_rel", "--hard-weight", "2"]
    args += ["--soft-weight", "0.5", "--rel_weight", "0.4"]
    got, _, _ = prepared(cli, path, *args)
    assert got[0] == pytest.approx([2.4, 0.38, 0.0]) and got[1] == pytest.approx([0.0])
    # legacy, pm1, beta 2: A 0 + 2*(2-1) = 2; B 0 + 2*(0-1) = -2; EMPTY 2*(0-1) = -2
    args = ["--reward-mode", "legacy", "--correctness_mode", "pm1", "--reward_beta", "2"]
    got, _, _ = prepared(cli, path, *args)
    assert got[0] == pytest.approx([2.0, -2.0, -2.0]) and got[1] == pytest.approx([-2.0])
    # legacy with alpha 10 and logprobs: query 2's candidate gets -(-1) * 10 + 0 = 10 -> 5
    data = {"2": {"pointer_candidates": [{"pointer": [7, 8], "logprob_score": -1.0}]}}
    path2 = write_json(tmp_path / "lp.json", data)
    args = ["--reward-mode", "legacy", "--use-logprob", "--reward-alpha", "10"]
    got, _, _ = prepared(cli, path2, *args)
    assert got == [[5.0]]


def test_cli_normalisers(cli: Cli, tmp_path: Path) -> None:
    path = write_json(tmp_path / "rl.json", CLI_DATA)
    # raw [1.6, 0.3, 0]: ranks [0, 1, 2] -> [1, 0, -1]; query 2 alone -> 0
    _, got, _ = prepared(cli, path, "--normalize", "rank")
    assert got == [[1.0, 0.0, -1.0], [0.0]]
    # mean 19/30, deviations [29/30, -10/30, -19/30], var (841 + 100 + 361)/900/2 = 0.7233,
    # std 0.8505: z = [1.1366, -0.3919, -0.7447]; clamp 0.5 -> [0.5, -0.3919, -0.5];
    # query 2 alone keeps its raw 0.9
    _, got, out = prepared(
        cli, path, "--normalize_method", "z_score_clamp", "--normalize-clamp-value", "0.5"
    )
    std = math.sqrt((841 + 100 + 361) / 900 / 2)
    assert got[0] == pytest.approx([0.5, -10 / 30 / std, -0.5], abs=1e-6)
    assert got[1] == pytest.approx([0.9])
    assert "1 queries have all-equal rewards" in out  # query 2, a group of one


@pytest.mark.parametrize("flag", ["--reward-mode", "--reward_mode"])
def test_cli_unknown_reward_mode_is_one_error_line(cli: Cli, tmp_path: Path, flag: str) -> None:
    path = write_json(tmp_path / "rl.json", CLI_DATA)
    result = cli("prepare", "--beam-data", path, flag, "nope")
    assert_user_error(result, "--reward-mode", "'nope'", "hard_plus_soft", "legacy")
    assert not cache_path_for(path).exists()


def test_cli_reward_mode_of_a_disabled_plugin_is_an_error(cli: Cli, tmp_path: Path) -> None:
    path = write_json(tmp_path / "rl.json", CLI_DATA)
    result = cli("prepare", "--beam-data", path, "--no-plugin", "reward-modes")
    assert_user_error(result, "--reward-mode", "'hard_plus_soft'", "available: none")
    result = cli("prepare", "--beam-data", path, "--no-plugin", "normalizers")
    assert_user_error(result, "--normalize", "'z_score_clamp'")

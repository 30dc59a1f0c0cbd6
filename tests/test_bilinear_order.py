"""``--bilinear-order auto``: the order the training data's verdicts favour, chosen once
(``reverse``, the default, and ``forward`` are kept as given).

A hand-built task: every query has the same embedding and the same pool of four items,
whose cosine similarities to the query are 0.99 (id 0), 0.71 (id 1), 0 (ids 2, 3). The
untrained policy's top two are ids 0 and 1: decided last-first (``reverse``) the
sequence is [1, 0], decided first-first (``forward``) it is [0, 1]. Each query logs both
orders with a verdict of our choosing, so the counts the run prints are known by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import write_json
from safetensors import safe_open
from safetensors.torch import save_file

FORWARD, REVERSE = [0, 1], [1, 0]


def task(tmp_path: Path, forward: list[int], reverse: list[int], extra: int = 0) -> list[str]:
    """Queries 100.. with ``forward[i]`` / ``reverse[i]`` the verdicts of the two orders;
    ``extra`` more queries log the forward order only (they must not count)."""
    emb = torch.zeros(100 + len(forward) + extra, 4)
    emb[0] = torch.tensor([0.99, 0.141, 0.0, 0.0])
    emb[1] = torch.tensor([0.71, 0.704, 0.0, 0.0])
    emb[2] = torch.tensor([0.0, 0.0, 1.0, 0.0])
    emb[3] = torch.tensor([0.0, 0.0, 0.0, 1.0])
    emb[100:] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    save_file({"image_emb": emb}, str(tmp_path / "emb.safetensors"))

    def cand(pointer: list[int], correct: int) -> dict[str, object]:
        return {
            "pointer": pointer,
            "vqa_correct": correct,
            "vqa_acc_score": 0.3 + 0.4 * correct,
            "vqa_gt_prob": 0.5,
            "vqa_rel_score": 0.5,
        }

    doc: dict[str, object] = {}
    for i, (f, r) in enumerate(zip(forward, reverse, strict=True)):
        pair = [cand(FORWARD, f), cand(REVERSE, r), cand([2, 3], 0)]
        doc[str(100 + i)] = {"candidate_pool_ids": [0, 1, 2, 3], "pointer_candidates": pair}
    for i in range(len(forward), len(forward) + extra):
        pair = [cand(FORWARD, 1), cand([2, 3], 0)]
        doc[str(100 + i)] = {"candidate_pool_ids": [0, 1, 2, 3], "pointer_candidates": pair}
    data = write_json(tmp_path / "rl.json", doc)
    return ["--beam-data", str(data), "--img-emb", str(tmp_path / "emb.safetensors")]


def recorded_order(checkpoint: Path) -> str:
    with safe_open(str(checkpoint), "pt") as f:
        policy = json.loads(f.metadata()["policy"])
    return str(policy["options"]["bilinear_order"])


def train(cli, tmp_path: Path, data: list[str], *extra: str):
    out = tmp_path / "run"
    args = [*data, "--output-dir", out, "--val-ratio", "0", "--rce-epochs", "1"]
    result = cli(
        *args, "--grpo-epochs", "0", "--overwrite", *(extra or ("--bilinear-order", "auto"))
    )
    assert result.exit_code == 0, result.output
    return result, out


def test_auto_takes_the_order_more_often_correct_and_records_it(cli, tmp_path) -> None:
    # forward correct on 6 of 10, reverse on 4; 3 more queries log forward only
    data = task(tmp_path, [1] * 6 + [0] * 4, [1] * 4 + [0] * 6, extra=3)
    result, out = train(cli, tmp_path, data)
    assert (
        "--bilinear-order auto: forward (the starting policy's sequences were correct on 4 "
        "training queries in reverse order and 6 forward, of the 10 whose logged candidates "
        "hold both)"
    ) in result.output
    assert recorded_order(out / "rce_epoch01.safetensors") == "forward"
    # select decodes as the run did: the first slot gets the most similar item
    picks = cli("select", "--ckpt", out / "rce_epoch01.safetensors", *data,
                "--output", tmp_path / "sel.json")  # fmt: skip
    assert picks.exit_code == 0, picks.output
    chosen = json.loads((tmp_path / "sel.json").read_text())
    assert len(chosen) == 13 and all(ids == FORWARD for ids in chosen.values()), chosen


@pytest.mark.parametrize(
    ("forward", "reverse"),
    [([1, 1, 0, 0], [1, 1, 0, 0]), ([0, 0, 1, 0], [1, 1, 1, 0])],
    ids=["tie", "reverse-better"],
)
def test_auto_keeps_reverse_unless_forward_wins(cli, tmp_path, forward, reverse) -> None:
    result, out = train(cli, tmp_path, task(tmp_path, forward, reverse))
    line = (
        f"--bilinear-order auto: reverse (the starting policy's sequences were correct on "
        f"{sum(reverse)} training queries in reverse order and {sum(forward)} forward, of "
        "the 4 whose logged candidates hold both)"
    )
    assert line in result.output
    assert recorded_order(out / "rce_epoch01.safetensors") == "reverse"


@pytest.mark.parametrize("given", [(), ("--bilinear-order", "reverse")], ids=["default", "given"])
def test_reverse_is_kept_as_given_or_by_default(cli, tmp_path, given) -> None:
    data = task(tmp_path, [1] * 4, [0] * 4)  # forward would win under auto
    result, out = train(cli, tmp_path, data, "--seed", "42", *given)
    assert "--bilinear-order auto" not in result.output
    assert recorded_order(out / "rce_epoch01.safetensors") == "reverse"


def test_a_phase_that_learns_the_last_slot_keeps_reverse_under_auto() -> None:
    from lever_trainer_plugins.judge_rank import JudgeRankPhase
    from lever_trainer_plugins.policy_bilinear import CosineBilinearPolicy, on_train_start

    model = CosineBilinearPolicy(4, 2, 0.1, "forward")
    lines: list[str] = []
    rank = JudgeRankPhase()
    state = SimpleNamespace(
        model=model,
        options={"bilinear_order": "auto", rank.epochs_option: 3},
        phases=[rank],
        log=lines.append,
    )
    on_train_start(state=state)  # type: ignore[arg-type]
    assert model.order == "reverse"
    assert lines == ["--bilinear-order auto: reverse (phase judge-rank learns the last slot)"]

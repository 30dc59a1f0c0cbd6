"""Selection for queries without logged sequences, and ``lever-train evaluate``."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import lever_digits_env
import numpy as np
import pytest
from conftest import assert_user_error, signal_when_hung, write_json
from safetensors.torch import load_file

from lever_trainer.checkpoint import save_checkpoint
from lever_trainer.data import load_pools
from lever_trainer.errors import LeverError
from lever_trainer_plugins.policy_bilinear import CosineBilinearPolicy

FILES = lever_digits_env.files()
EMB = load_file(str(FILES["embeddings"]))["embeddings"].numpy().astype(np.float64)
TEST = json.loads(Path(FILES["test"]).read_text())
QIDS = sorted(int(k) for k in TEST if k.isdigit())[:6]


def pools_of(qids) -> dict[str, list[int]]:
    return {str(q): TEST[str(q)]["candidate_pool_ids"] for q in qids}


def cosine_pair(q: int, pool: list[int]) -> list[int]:
    """The two most cosine-similar pool items, by hand in numpy (stable ties)."""
    e, c = EMB[q] / np.linalg.norm(EMB[q]), EMB[pool] / np.linalg.norm(EMB[pool], axis=1)[:, None]
    order = np.argsort(-(c @ e), kind="stable")
    return [pool[order[0]], pool[order[1]]]


@pytest.fixture
def untrained(tmp_path: Path) -> Path:
    """An untrained cosine-bilinear checkpoint: its greedy choice is cosine, reversed."""
    model = CosineBilinearPolicy(32, 2, 0.1, "reverse")
    path = tmp_path / "untrained.safetensors"
    save_checkpoint(
        path,
        model.state_dict(),
        {"policy": {"name": "cosine-bilinear", "input_dim": 32, "options": model.policy_options()}},
    )
    return path


@pytest.mark.parametrize("fmt", ["rl-json", "plain", "jsonl"])
def test_select_reads_pools_only_in_every_format(cli, tmp_path, untrained, fmt) -> None:
    pools = pools_of(QIDS)
    if fmt == "rl-json":  # the test file's own format: label and pool, no logged sequences
        queries = write_json(tmp_path / "q.json", {"_meta": {}, **{q: TEST[q] for q in pools}})
    elif fmt == "plain":
        queries = write_json(tmp_path / "q.json", pools)
    else:
        queries = tmp_path / "q.jsonl"
        queries.write_text(
            "\n".join(
                json.dumps({"query_id": int(q), "candidate_pool_ids": p}) for q, p in pools.items()
            )
        )
    out = tmp_path / "picks.json"
    result = cli(
        "select",
        "--ckpt",
        untrained,
        "--queries",
        queries,
        "--img-emb",
        FILES["embeddings"],
        "--output",
        out,
    )
    assert result.exit_code == 0, result.output
    picks = json.loads(out.read_text())
    assert picks == {q: cosine_pair(int(q), p)[::-1] for q, p in pools.items()}


def test_select_writes_scores_and_jsonl(cli, tmp_path, untrained) -> None:
    queries = write_json(tmp_path / "q.json", pools_of(QIDS[:3]))
    out = tmp_path / "picks.jsonl"
    result = cli(
        "select",
        "--ckpt",
        untrained,
        "--queries",
        queries,
        "--img-emb",
        FILES["embeddings"],
        "--output",
        out,
        "--scores",
        "--shots",
        "3",
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["query_id"] for x in lines] == QIDS[:3]
    for line in lines:
        assert len(line["ids"]) == 3 and len(set(line["ids"])) == 3
        assert all(0 < s <= 1 for s in line["scores"])


def test_select_refuses_pools_outside_the_embeddings_or_too_small(cli, tmp_path, untrained) -> None:
    bad = write_json(tmp_path / "q.json", {"5": [1, 2, 99999]})
    out = tmp_path / "p.json"
    result = cli(
        "select",
        "--ckpt",
        untrained,
        "--queries",
        bad,
        "--img-emb",
        FILES["embeddings"],
        "--output",
        out,
    )
    assert_user_error(result, "query 5's pool names id 99999", "1797 rows")
    small = write_json(tmp_path / "q2.json", {"5": [1, 2], "6": [3]})
    result = cli(
        "select",
        "--ckpt",
        untrained,
        "--queries",
        small,
        "--img-emb",
        FILES["embeddings"],
        "--output",
        out,
    )
    assert_user_error(result, "--shots 2", "query 6's pool holds only 1 ids")
    assert not out.exists()


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"5": [1, 1]}, "query 5: the pool holds duplicate ids"),
        ({"5": "abc"}, "query 5: expected a list of pool ids"),
        ({"5": {"question": "?"}}, "no 'candidate_pool_ids' and no 'pointer_candidates'"),
        ({"x5": [1]}, "no query found"),
    ],
)
def test_bad_pool_files(tmp_path, doc, message) -> None:
    with pytest.raises(LeverError, match=message):
        load_pools(write_json(tmp_path / "q.json", doc))


def test_evaluate_compares_checkpoints_and_baselines(cli, tmp_path, untrained) -> None:
    queries = write_json(tmp_path / "q.json", pools_of(QIDS))
    out = tmp_path / "eval.json"
    result = cli(
        "evaluate",
        untrained,
        "--queries",
        queries,
        "--img-emb",
        FILES["embeddings"],
        "--judge",
        "digits",
        "--store",
        tmp_path / "v.sqlite",
        "--output",
        out,
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    sel = report["selectors"]
    assert set(sel) == {str(untrained), "random", "cosine", "cosine-reversed", "best"}
    env = lever_digits_env.DigitsEnvironment()

    def accuracy(picks: dict[int, list[int]]) -> float:
        verdicts = env.judge(list(picks), list(picks.values()))
        return sum(v["vqa_correct"] for v in verdicts) / len(picks)

    pools = {q: TEST[str(q)]["candidate_pool_ids"] for q in QIDS}
    cosine = {q: cosine_pair(q, p) for q, p in pools.items()}
    assert sel["cosine"]["judge_correct"] == pytest.approx(accuracy(cosine))
    reversed_ = {q: p[::-1] for q, p in cosine.items()}
    assert sel["cosine-reversed"]["judge_correct"] == pytest.approx(accuracy(reversed_))
    # the untrained policy is cosine, reversed
    assert sel[str(untrained)]["judge_correct"] == sel["cosine-reversed"]["judge_correct"]
    # exact random: every ordered pair of every pool; best: any correct pair
    per_query, best = [], []
    for q, pool in pools.items():
        pairs = list(itertools.permutations(pool, 2))
        correct = [v["vqa_correct"] for v in env.judge([q] * len(pairs), pairs)]
        per_query.append(sum(correct) / len(pairs))
        best.append(max(correct))
    assert sel["random"]["judge_correct"] == pytest.approx(sum(per_query) / len(pools))
    assert sel["best"]["judge_correct"] == pytest.approx(sum(best) / len(pools))
    assert "random: exact expectation" in result.output
    assert any(line.startswith("cosine-reversed ") for line in result.output.splitlines())


def test_evaluate_reports_intervals_and_differences_against_the_best_heuristic(
    cli, tmp_path, untrained
) -> None:
    qids = sorted(int(k) for k in TEST if k.isdigit())[:60]
    queries = write_json(tmp_path / "q.json", pools_of(qids))
    out = tmp_path / "eval.json"
    result = cli(
        "evaluate",
        untrained,
        "--queries",
        queries,
        "--img-emb",
        FILES["embeddings"],
        "--judge",
        "digits",
        "--store",
        tmp_path / "v.sqlite",
        "--baselines",
        "cosine,cosine-reversed,start",
        "--output",
        out,
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    env = lever_digits_env.DigitsEnvironment()
    pools = {q: TEST[str(q)]["candidate_pool_ids"] for q in qids}
    fwd = [v["vqa_correct"] for v in env.judge(qids, [cosine_pair(q, pools[q]) for q in qids])]
    rev = [
        v["vqa_correct"] for v in env.judge(qids, [cosine_pair(q, pools[q])[::-1] for q in qids])
    ]
    assert report["query_ids"] == qids
    assert report["per_query"]["cosine"]["judge_correct"] == fwd
    assert report["per_query"]["cosine-reversed"]["judge_correct"] == rev
    best = "cosine-reversed" if sum(rev) > sum(fwd) else "cosine"
    assert report["best_heuristic"] == best
    other = "cosine" if best == "cosine-reversed" else "cosine-reversed"
    diff, low, high = report["intervals"][other]["vs_best_heuristic"]["difference"]
    assert diff == pytest.approx(
        (sum(fwd) - sum(rev)) / len(qids) * (1 if other == "cosine" else -1)
    )
    assert low <= diff <= high
    mean, low, high = report["intervals"][best]["judge_correct"]
    assert mean == pytest.approx(max(sum(fwd), sum(rev)) / len(qids))
    assert low < mean < high or low == mean == high
    # the untrained policy selects exactly cosine-reversed: a difference of 0 with no spread
    untrained_diff = report["intervals"][str(untrained)].get("vs_best_heuristic")
    if best == "cosine-reversed":
        assert untrained_diff["difference"] == [0.0, 0.0, 0.0]
    # the table shows the interval and the difference in points
    assert "95% interval" in result.output and f"vs {best}" in result.output
    assert "(best heuristic)" in result.output


def test_evaluate_without_judge_or_checkpoint_is_refused(cli, tmp_path) -> None:
    queries = write_json(tmp_path / "q.json", pools_of(QIDS))
    result = cli("evaluate", "--queries", queries, "--img-emb", FILES["embeddings"])
    assert_user_error(result, "nothing to measure")
    result = cli(
        "evaluate", "--queries", queries, "--img-emb", FILES["embeddings"], "--judge", "nope"
    )
    assert_user_error(result, "--judge", "'nope'", "digits")


def test_evaluate_offline_metrics_where_sequences_are_logged(cli, tmp_path, untrained) -> None:
    doc = json.loads(Path(FILES["train"]).read_text())
    keys = [k for k in doc if k.isdigit()][:8]
    queries = write_json(tmp_path / "train8.json", {k: doc[k] for k in keys})
    out = tmp_path / "e.json"
    result = cli(
        "evaluate",
        untrained,
        "--queries",
        queries,
        "--img-emb",
        FILES["embeddings"],
        "--output",
        out,
        "--baselines",
        "",
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())["selectors"][str(untrained)]
    assert {"val_loss", "policy_reward@1", "normalized_gain"} <= set(metrics)
    assert "judge_correct" not in metrics


def test_judged_validation_is_a_best_metric(cli, tmp_path) -> None:
    doc = json.loads(Path(FILES["train"]).read_text())
    keys = [k for k in doc if k.isdigit()][:40]
    data = write_json(tmp_path / "train40.json", {k: doc[k] for k in keys})
    out = tmp_path / "run"
    result = cli(
        "--beam-data",
        data,
        "--img-emb",
        FILES["embeddings"],
        "--output-dir",
        out,
        "--policy",
        "cosine-bilinear",
        "--rce-epochs",
        "2",
        "--judge",
        "digits",
        "--store",
        tmp_path / "v.sqlite",
        "--best-metric",
        "judge_correct@greedy",
        "--no-cache",
    )
    assert result.exit_code == 0, result.output
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("judge_correct@greedy" in h for h in history if h.get("epoch", 0) > 0)
    assert (out / "best.safetensors").is_file()
    assert "validation ranks the logged candidates only" not in result.output


def test_without_judge_the_log_says_only_logged_candidates_are_ranked(
    cli, demo_files, tmp_path
) -> None:
    result = cli(
        "--beam-data",
        demo_files[0],
        "--img-emb",
        demo_files[1],
        "--output-dir",
        tmp_path / "r",
        "--rce-epochs",
        "1",
        "--no-cache",
        "--hidden-dim",
        "16",
    )
    assert result.exit_code == 0, result.output
    assert "validation ranks the logged candidates only" in result.output


def test_ctrl_c_in_evaluate_is_one_line_and_the_returned_verdicts_stay(tmp_path) -> None:
    """The judge hangs after 16 verdicts (two batches of 8 came back); SIGINT: the line
    ``interrupted`` with where the verdicts are, exit 130, no traceback; the store holds
    the 16 and a second evaluate asks the judge only for the rest."""
    import os
    import signal
    import subprocess
    import sys

    from lever_trainer.judge import VerdictStore

    test = json.loads(Path(FILES["test"]).read_text())
    keys = [k for k in test if k.isdigit()][:40]
    pools = write_json(tmp_path / "pools.json", {k: test[k]["candidate_pool_ids"] for k in keys})
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent / "fault_judge"), os.environ.get("PYTHONPATH", "")]
        ),
        "OMP_NUM_THREADS": "1",
        "FAULT_JUDGE": "hang:16",
        "FAULT_JUDGE_HUNG": str(tmp_path / "hung"),
    }
    store = tmp_path / "v.sqlite"
    args = [sys.executable, "-m", "lever_trainer", "evaluate", "--queries", str(pools),
            "--img-emb", FILES["embeddings"], "--judge", "faulty", "--baselines", "cosine",
            "--judge-batch-size", "8", "--judge-concurrency", "1", "--store", str(store)]  # fmt: skip
    status, out = signal_when_hung(args, env, tmp_path / "hung", signal.SIGINT)
    assert status == 130, out
    assert "Traceback" not in out
    assert out.strip().splitlines()[-1] == (
        f"interrupted; the verdicts that returned are stored in {store}: run the same "
        "command again to continue"
    )
    assert VerdictStore(store).versions("faulty") == {"1": 16}
    del env["FAULT_JUDGE"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "24 new verdicts" in done.stdout + done.stderr, done.stdout + done.stderr


def test_ctrl_c_in_any_command_is_the_line_interrupted_and_status_130(capsys) -> None:
    from lever_trainer.cli.params import user_errors

    @user_errors
    def command() -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stop:
        command()
    assert stop.value.code == 130
    assert capsys.readouterr().err == "interrupted\n"

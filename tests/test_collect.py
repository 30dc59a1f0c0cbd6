"""``lever-train collect``: beam search over ordered sequences, judged; resume, shards, merge."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path

import lever_digits_env
import pytest
import torch
from conftest import assert_user_error, builtin_registry, signal_when_hung, write_json

from lever_trainer.collect import (
    CollectSpec,
    QueryResult,
    Scored,
    beam_search,
    beam_verdicts,
    collect,
    merge_parts,
    parse_shard,
    query_verdicts,
    random_sequences,
    shard_rows,
)
from lever_trainer.data import DataOptions, PoolTable, load_rl_data
from lever_trainer.errors import LeverError, PluginError
from lever_trainer.judge import Environment, Judge, VerdictStore
from lever_trainer.judge_driver import DriverSettings, PermanentJudgeError

FILES = lever_digits_env.files()
#: Values of the items of the hand-computable judge (exact binary fractions).
VALUE = {10: 0.125, 11: 0.5, 12: 0.375, 13: 0.25, 14: 0.0625}


def weighted_score(seq: Sequence[int], value: dict[int, float] = VALUE) -> float:
    """The hand-computable judge's ``vqa_gt_prob``: item ``i`` (from 0) weighs ``i + 1``,
    ``sum((i + 1) * v[s_i]) / sum(i + 1)``; a later demonstration counts more."""
    return sum((i + 1) * value[g] for i, g in enumerate(seq)) / sum(range(1, len(seq) + 1))


class Weighted(Environment):
    """Judges with :func:`weighted_score`; records every pair it is asked; fails with a
    permanent error once ``fail_after`` verdicts were answered (when set)."""

    name, version, cheap = "weighted", "1", True

    def __init__(self, value: dict[int, float] = VALUE, fail_after: int | None = None) -> None:
        self.value = value
        self.fail_after = fail_after
        self.asked: list[tuple[int, tuple[int, ...]]] = []

    def judge(self, query_ids: Sequence[int], sequences: Sequence[Sequence[int]]) -> list[dict]:
        if self.fail_after is not None and len(self.asked) + len(sequences) > self.fail_after:
            raise PermanentJudgeError("the model server was killed")
        self.asked += [(q, tuple(s)) for q, s in zip(query_ids, sequences, strict=True)]
        out = []
        for s in sequences:
            g = weighted_score(s, self.value)
            out.append(
                {
                    "vqa_correct": float(g >= 0.4),
                    "vqa_acc_score": g,
                    "vqa_gt_prob": g,
                    "vqa_rel_score": 0.0,
                }
            )
        return out


def make_judge(env: Environment, store: Path | None = None, batch: int | None = None) -> Judge:
    def reward(v):
        return v["vqa_correct"] + v["vqa_acc_score"]

    return Judge(
        env,
        "test",
        VerdictStore(store) if store else None,
        reward,
        driver=DriverSettings(batch_size=batch),
    )


def table(pools: dict[int, list[int]]) -> PoolTable:
    width = max(len(p) for p in pools.values())
    ids = torch.tensor([p + [0] * (width - len(p)) for p in pools.values()])
    return PoolTable(torch.tensor(list(pools)), ids, torch.tensor([len(p) for p in pools.values()]))


# ---------------------------------------------------------------- the search
@pytest.mark.parametrize(
    ("pool", "expected"),
    [
        ([10, 11, 12, 13], [(12, 11), (11, 12), (13, 11)]),
        ([13, 12, 11, 10], [(12, 11), (13, 11), (11, 12)]),
    ],
)
def test_beam_search_by_hand(pool, expected) -> None:
    """S = 2, B = 3, values v = 10: 1/8, 11: 1/2, 12: 3/8, 13: 1/4.

    Step 1 judges the 4 items alone (score v): 11 (0.5), 12 (0.375), 13 (0.25) are kept,
    10 (0.125) is dropped. Step 2 judges the 3 * 3 extensions, score (v_a + 2 v_b) / 3,
    times 3: (11,10) 0.75, (11,12) 1.25, (11,13) 1.0, (12,10) 0.625, (12,11) 1.375,
    (12,13) 0.875, (13,10) 0.5, (13,11) 1.25, (13,12) 1.0. Best is (12,11); (11,12) and
    (13,11) tie at 1.25: the one whose pool positions come first wins, (11,12) in pool
    order 10..13 (positions (1,2) < (3,1)), (13,11) in pool order 13..10 ((0,2) < (2,1)).
    The judge is asked 4 + 9 = 13 sequences."""
    env = Weighted()
    judge = make_judge(env)
    spec = CollectSpec(shots=2, beam_size=3)
    found = beam_search(judge, {7: pool}, {7: pool}, spec)[7]
    assert [s.sequence for s in found] == expected
    assert [s.score * 3 for s in found] == [1.375, 1.25, 1.25]
    assert len(env.asked) == 13 == beam_verdicts(4, 2, 3)
    assert [len(s) for _, s in env.asked] == [1] * 4 + [2] * 9  # partial sequences first


def test_beam_search_keeping_every_prefix_is_the_brute_force_ranking() -> None:
    """With B >= the number of prefixes of length S - 1 (5 * 4 = 20 for S = 3 over 5
    items), no prefix is ever dropped, so the B sequences kept are exactly the B best of
    all 5 * 4 * 3 = 60 ordered sequences, ranked (independently here) by the score of
    :func:`weighted_score` and the pool-position tie-break."""
    pool = [14, 12, 10, 13, 11]
    env = Weighted()
    found = beam_search(make_judge(env), {3: pool}, {3: pool}, CollectSpec(shots=3, beam_size=20))
    every = sorted(
        itertools.permutations(pool, 3),
        key=lambda s: (-weighted_score(s), [pool.index(g) for g in s]),
    )
    assert [s.sequence for s in found[3]] == every[:20]
    assert len(env.asked) == 5 + 5 * 4 + 20 * 3 == beam_verdicts(5, 3, 20)


def test_beam_search_with_the_digits_judge_matches_brute_force() -> None:
    """The digits environment judges partial sequences (one demonstration) too; with B = 6
    (every prefix of one item kept) the 6 beams are the 6 best of the 30 ordered pairs
    of a 6-item pool, each judged directly."""
    test = json.loads(Path(FILES["test"]).read_text())
    qids = [int(k) for k in test if k.isdigit()][:3]
    pools = {q: test[str(q)]["candidate_pool_ids"][:6] for q in qids}
    env = lever_digits_env.DigitsEnvironment()
    for field in ("vqa_gt_prob", "vqa_acc_score"):
        spec = CollectSpec(shots=2, beam_size=6, score=field)
        found = beam_search(make_judge(env), pools, pools, spec)
        for q, pool in pools.items():
            pairs = list(itertools.permutations(pool, 2))
            scores = [v[field] for v in env.judge([q] * len(pairs), pairs)]
            ranked = sorted(
                zip(pairs, scores, strict=True),
                key=lambda x: (-x[1], [pool.index(g) for g in x[0]]),
            )
            assert [s.sequence for s in found[q]] == [p for p, _ in ranked[:6]]
            assert [s.score for s in found[q]] == [sc for _, sc in ranked[:6]]


def test_cost_per_query() -> None:
    """c items, S = 2, B = 5: c + min(5, c) * (c - 1); c = 64: 64 + 5 * 63 = 379.
    S = 3 adds B * (c - 2): 379 + 5 * 62 = 689. A pool smaller than S: nothing."""
    assert beam_verdicts(64, 2, 5) == 379
    assert beam_verdicts(64, 3, 5) == 689
    assert beam_verdicts(3, 2, 5) == 3 + 3 * 2  # fewer items than beams
    assert beam_verdicts(1, 2, 5) == 0
    # --beam-candidates 16 over a pool of 64: 16 + 5 * 15; + 4 random + 2 cosine
    spec = CollectSpec(shots=2, beam_size=5, candidates=16, random=4, cosine=True)
    assert query_verdicts(64, spec) == 16 + 75 + 4 + 2


def test_random_sequences_are_seeded_distinct_and_per_query() -> None:
    pool = [5, 6, 7, 8, 9]
    a = random_sequences(pool, 2, 6, seed=1, query=4)
    assert a == random_sequences(pool, 2, 6, seed=1, query=4)
    assert len(set(a)) == 6 and all(len(set(s)) == 2 and set(s) <= set(pool) for s in a)
    assert a != random_sequences(pool, 2, 6, seed=2, query=4)
    assert a != random_sequences(pool, 2, 6, seed=1, query=5)
    # more than the pool holds (5 * 4 = 20 ordered pairs): every one, once
    assert sorted(random_sequences(pool, 2, 50, seed=0, query=0)) == sorted(
        itertools.permutations(pool, 2)
    )
    # a large pool: drawn without listing every sequence
    big = list(range(1000))
    drawn = random_sequences(big, 3, 10, seed=0, query=0)
    assert len(set(drawn)) == 10


def test_output_entry_positions_methods_and_duplicates() -> None:
    verdict = {"vqa_correct": 1.0, "vqa_acc_score": 0.5, "vqa_gt_prob": 0.75, "vqa_rel_score": 0.0}
    result = QueryResult(
        4,
        [30, 20, 10],
        [Scored((10, 20), verdict, 0.75), Scored((20, 30), verdict, 0.5)],
        [("cosine", Scored((20, 30), verdict, 0.5)), ("random", Scored((30, 10), verdict, 0.2))],
    )
    entry = result.entry()
    assert entry["candidate_pool_ids"] == [30, 20, 10]
    cands = entry["pointer_candidates"]
    # the cosine sequence is the second beam: written once, as beam
    assert [c["gen_method"] for c in cands] == ["beam", "beam", "random"]
    assert [c["pointer"] for c in cands] == [[2, 1], [1, 0], [0, 2]]
    assert [c["beam_rank"] for c in cands] == [0, 1, None]
    assert cands[0]["vqa_correct"] == 1 and isinstance(cands[0]["vqa_correct"], int)
    assert cands[2]["beam_score"] == 0.2 and cands[2]["vqa_gt_prob"] == 0.75


# ---------------------------------------------------------------- resume
def test_a_killed_collect_run_again_asks_nothing_twice(tmp_path: Path) -> None:
    """The judge dies after 20 verdicts (batches of 4, so 5 batches are stored); the
    run again with a new judge process asks only what is missing, and together the two
    asked exactly what one uninterrupted run asks; a third run asks nothing."""
    pools = table({1: [10, 11, 12, 13, 14], 2: [14, 13, 12, 11], 3: [11, 12, 13]})
    spec = CollectSpec(shots=2, beam_size=2, random=3)
    store = tmp_path / "v.sqlite"
    first = Weighted(fail_after=20)
    with pytest.raises(PluginError, match="killed"):
        collect(make_judge(first, store, batch=4), pools, None, spec)
    assert len(first.asked) == 20
    second = Weighted()
    doc = collect(make_judge(second, store, batch=4), pools, None, spec)
    assert not set(first.asked) & set(second.asked)
    whole = Weighted()
    reference = collect(make_judge(whole, tmp_path / "other.sqlite", batch=4), pools, None, spec)
    assert sorted(first.asked + second.asked) == sorted(whole.asked)
    assert doc == reference
    third = Weighted()
    assert collect(make_judge(third, store), pools, None, spec) == reference
    assert third.asked == []


# ---------------------------------------------------------------- shards and merging
def test_shards_partition_the_queries() -> None:
    for n_queries, n in ((10, 3), (2, 4), (7, 1)):
        parts = [shard_rows(n_queries, i, n) for i in range(n)]
        assert sorted(r for p in parts for r in p) == list(range(n_queries))
    assert shard_rows(10, 1, 3) == [1, 4, 7]
    assert parse_shard("2/5") == (2, 5)


@pytest.mark.parametrize("text", ["5/5", "-1/2", "1", "a/b", "1/0", "1/2/3", ""])
def test_bad_shard_specs(text) -> None:
    with pytest.raises(LeverError, match="--shard"):
        parse_shard(text)


def _part(shard: str | None, queries: dict[str, list], **meta) -> dict:
    doc = {"_meta": {"source": "lever-train collect", "env": "e", "shots": 2, **meta}}
    if shard:
        doc["_meta"]["shard"] = shard
    doc.update({k: {"pointer_candidates": v} for k, v in queries.items()})
    return doc


def test_merge_refuses_what_does_not_fit() -> None:
    a, b = _part("0/2", {"3": [], "1": []}), _part("1/2", {"2": []})
    merged = merge_parts([("a", a), ("b", b)])
    assert list(merged) == ["_meta", "1", "2", "3"] and merged["_meta"]["queries"] == 3
    assert "shard" not in merged["_meta"]
    cases = [
        ([("a", a)], "shard 1/2 is missing"),
        ([("a", a), ("a2", a), ("b", b)], "a2: shard 0/2 is also a"),
        ([("a", a), ("c", _part("1/2", {"1": []}))], "c: query 1 is also in a"),
        ([("a", a), ("d", _part("1/2", {"2": []}, shots=3))], "d: collected with other settings"),
        ([("x", {"1": {}})], "x: not an output of lever-train collect"),
    ]
    for parts, message in cases:
        with pytest.raises(LeverError, match=message):
            merge_parts(parts)


# ---------------------------------------------------------------- the command
def _queries(tmp_path: Path, n: int = 6, pool: int = 7) -> Path:
    test = json.loads(Path(FILES["test"]).read_text())
    keys = [k for k in test if k.isdigit()][:n]
    return write_json(
        tmp_path / "pools.json", {k: test[k]["candidate_pool_ids"][:pool] for k in keys}
    )


def _collect_args(pools: Path, store: Path, out: Path, *more: object) -> list[object]:
    return [
        "collect", pools, "--judge", "digits", "--shots", "2", "--beam-size", "3",
        "--random", "2", "--cosine", "--img-emb", FILES["embeddings"], "--store", store,
        "--output", out, *more,
    ]  # fmt: skip


def test_collect_writes_rl_data_that_trains_and_resumes_from_the_store(cli, tmp_path) -> None:
    pools = _queries(tmp_path)
    out = tmp_path / "rl.json"
    result = cli(*_collect_args(pools, tmp_path / "v.sqlite", out))
    assert result.exit_code == 0, result.output
    # planned per query: 7 + 3 * 6 beams, 2 random, 2 cosine = 29; 6 queries: 174
    assert "174 sequences to judge" in result.output
    assert "planned 174, 29.0 per query" in result.output
    doc = json.loads(out.read_text())
    meta = doc["_meta"]
    assert (meta["env"], meta["shots"], meta["beam_size"], meta["queries"]) == ("digits", 2, 3, 6)
    for key, value in doc.items():
        if key == "_meta":
            continue
        cands = value["pointer_candidates"]
        beams = [c for c in cands if c["gen_method"] == "beam"]
        assert [c["beam_rank"] for c in beams] == [0, 1, 2]
        assert [c["beam_score"] for c in beams] == sorted(
            (c["beam_score"] for c in beams), reverse=True
        )
        assert {c["gen_method"] for c in cands} <= {"beam", "random", "cosine", "cosine-reversed"}
        for c in cands:
            assert [value["candidate_pool_ids"][p] for p in c["pointer"]] == c["pointer_global"]
            assert c["beam_score"] == c["vqa_gt_prob"]
            assert {"vqa_correct", "vqa_acc_score", "vqa_gt_prob", "vqa_rel_score"} <= set(c)
        # the logged verdicts are the judge's
        env = lever_digits_env.DigitsEnvironment()
        again = env.judge([int(key)] * len(cands), [c["pointer_global"] for c in cands])
        assert [v["vqa_acc_score"] for v in again] == [c["vqa_acc_score"] for c in cands]
    table_, report = load_rl_data(out, DataOptions(), builtin_registry())
    assert report.queries_total == 6 and len(table_.query_ids) == 6
    run = cli(
        "--beam-data", out, "--img-emb", FILES["embeddings"], "--output-dir", tmp_path / "run",
        "--rce-epochs", "1", "--grpo-epochs", "1", "--val-ratio", "0.34", "--no-cache",
        "--hidden-dim", "16", "--device", "cpu",
    )  # fmt: skip
    assert run.exit_code == 0, run.output
    assert (tmp_path / "run" / "best.safetensors").is_file()
    # run again: everything comes from the store, the output is the same
    before = out.read_bytes()
    again = cli(*_collect_args(pools, tmp_path / "v.sqlite", out))
    assert again.exit_code == 0, again.output
    assert "0 asked of the environment in 0 calls" in again.output
    assert out.read_bytes() == before


def test_shards_merged_equal_the_unsharded_run(cli, tmp_path) -> None:
    pools = _queries(tmp_path, n=7, pool=5)
    whole = tmp_path / "whole.json"
    assert cli(*_collect_args(pools, tmp_path / "a.sqlite", whole)).exit_code == 0
    parts = []
    for i in range(3):
        part = tmp_path / f"part{i}.json"
        result = cli(*_collect_args(pools, tmp_path / f"s{i}.sqlite", part, "--shard", f"{i}/3"))
        assert result.exit_code == 0, result.output
        parts.append(part)
    queries = [sorted(k for k in json.loads(p.read_text()) if k != "_meta") for p in parts]
    assert sum(map(len, queries)) == 7 and not set(queries[0]) & set(queries[1])
    merged = tmp_path / "merged.json"
    result = cli("collect", "--merge", *parts, "--output", merged)
    assert result.exit_code == 0, result.output
    assert merged.read_bytes() == whole.read_bytes()
    missing = cli("collect", "--merge", *parts[:2], "--output", tmp_path / "m2.json")
    assert_user_error(missing, "shard 2/3 is missing")


def test_beam_candidates_restrict_the_extensions_to_the_cosine_top_k(cli, tmp_path) -> None:
    """--beam-candidates 3 over pools of 7: 3 + 3 * 2 = 9 sequences per query, every
    beam item among the query's 3 items most cosine-similar to it."""
    from lever_trainer.data import load_embeddings
    from lever_trainer.selectors import cosine_selection

    pools = _queries(tmp_path, n=3, pool=7)
    out = tmp_path / "rl.json"
    result = cli(
        "collect", pools, "--judge", "digits", "--beam-size", "3", "--beam-candidates", "3",
        "--img-emb", FILES["embeddings"], "--no-store", "--output", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "27 sequences to judge" in result.output
    doc = json.loads(out.read_text())
    emb = load_embeddings(FILES["embeddings"])
    raw = json.loads(pools.read_text())
    top = cosine_selection(table({int(k): v for k, v in raw.items()}), emb, 3)
    for (key, _), best in zip(raw.items(), top, strict=True):
        for cand in doc[key]["pointer_candidates"]:
            assert set(cand["pointer_global"]) <= set(best)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--shots", "8"], ["pool holds 7 ids", "--shots 8"]),
        (["--shard", "3/3"], ["--shard", "'3/3'"]),
        (["--shard", "x"], ["--shard"]),
        (["--beam-candidates", "1"], ["--beam-candidates 1", "--shots"]),
        (["--beam-score", "vqa_nothing"], ["--beam-score"]),
        (["--merge", "--shard", "0/2"], ["--merge", "--shard"]),
    ],
)
def test_bad_options_are_one_line(cli, tmp_path, args, fragments) -> None:
    pools = _queries(tmp_path)
    base = ["collect", pools, "--judge", "digits", "--no-store", "--output", tmp_path / "o.json"]
    assert_user_error(cli(*base, *args), *fragments)
    assert not (tmp_path / "o.json").exists()


def test_bad_inputs_are_one_line(cli, tmp_path) -> None:
    out = ["--output", tmp_path / "o.json"]
    pools = _queries(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"1": [3, 4], "2": ')
    assert_user_error(cli("collect", bad, "--judge", "digits", "--no-store", *out), str(bad))
    dup = write_json(tmp_path / "dup.json", {"1": [3, 3, 4]})
    assert_user_error(cli("collect", dup, "--judge", "digits", *out), "duplicate")
    assert_user_error(
        cli("collect", tmp_path / "none.json", "--judge", "digits", *out), "not found"
    )
    assert_user_error(cli("collect", pools, *out), "missing option --judge")
    assert_user_error(cli("collect", pools, "--judge", "digits"), "missing option --output")
    assert_user_error(cli("collect", pools, pools, "--judge", "digits", *out), "--merge")
    assert_user_error(cli("collect", pools, "--judge", "nope", "--no-store", *out), "'nope'")
    assert_user_error(
        cli("collect", pools, "--judge", "digits", "--cosine", "--no-store", *out), "--img-emb"
    )
    outside = write_json(tmp_path / "outside.json", {"1": [3, 99999]})
    assert_user_error(
        cli(
            "collect",
            outside,
            "--judge",
            "digits",
            "--cosine",
            "--img-emb",
            FILES["embeddings"],
            *out,
        ),
        "99999",
    )
    assert_user_error(
        cli("collect", "--merge", pools, *out), "not an output of lever-train collect"
    )
    assert not (tmp_path / "o.json").exists()


def test_an_unusable_score_field_names_the_flag() -> None:
    """An environment may leave a field unavailable (no log-probabilities, say): ranking
    by it is refused with one line naming --beam-score and the query."""
    from lever_trainer.collect import _score

    judge = make_judge(Weighted())
    for value in (None, math.nan, "0.5"):
        with pytest.raises(LeverError, match=r"--beam-score vqa_gt_prob.*query 4"):
            _score({"vqa_gt_prob": value}, "vqa_gt_prob", judge, 4, [1, 2])


def test_a_collect_stopped_by_its_budget_asks_only_the_rest_when_run_again(cli, tmp_path) -> None:
    """--judge-max-calls 60 with batches of 10: the first run stores 60 verdicts and stops
    with one line; the same command without the budget asks the environment only for the
    planned sequences it lacks. 5 queries, pool 6, S 2, B 3, no extras: 6 + 3 * 5 = 21
    per query, 105 in all (no sequence repeats within a query)."""
    pools = _queries(tmp_path, n=5, pool=6)
    out = tmp_path / "rl.json"
    args = ["collect", pools, "--judge", "digits", "--beam-size", "3", "--store",
            tmp_path / "v.sqlite", "--judge-batch-size", "10", "--output", out]  # fmt: skip
    stopped = cli(*args, "--judge-max-calls", "60")
    assert_user_error(stopped, "--judge-max-calls 60", "run again")
    assert not out.exists()
    stored = VerdictStore(tmp_path / "v.sqlite").versions("digits")
    assert stored == {"1": 60}
    again = cli(*args)
    assert again.exit_code == 0, again.output
    assert "105 verdicts for 5 queries (planned 105" in again.output
    assert "45 asked of the environment in 5 calls" in again.output
    assert "60 already known" in again.output
    whole = tmp_path / "whole.json"
    fresh = cli(*args[:-4], "--no-store", "--output", whole)
    assert fresh.exit_code == 0, fresh.output
    assert out.read_bytes() == whole.read_bytes()


def test_collect_to_standard_output_and_the_progress_lines(cli_apart, tmp_path, capsys) -> None:
    pools = _queries(tmp_path, n=2, pool=4)
    result = cli_apart("collect", pools, "--judge", "digits", "--no-store", "--output", "-")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["_meta"]["queries"] == 2 and len(doc) == 3
    assert "wrote 2 queries" in result.stderr and "wrote" not in result.stdout

    from lever_trainer.cli.collect import CollectProgress

    class Round:
        done, cache_hits = 3, 2

    progress = CollectProgress(20, "digits", every=0.0)
    progress.within_round(Round())
    progress.round_done(10)
    progress.round_done(10)  # all done: no line
    progress.close()
    assert capsys.readouterr().err.splitlines() == [
        "collect (digits): 5/20 verdicts",
        "collect (digits): 10/20 verdicts",
    ]


def test_export_verdicts_after_collect_names_the_length(cli, tmp_path) -> None:
    """collect stores its partial (one-item) sequences too: export-verdicts asks which
    length to write, and --shots 2 gives RL data that loads."""
    pools = _queries(tmp_path, n=3, pool=4)
    store = tmp_path / "v.sqlite"
    assert (
        cli(
            "collect", pools, "--judge", "digits", "--store", store, "-o", tmp_path / "c.json"
        ).exit_code
        == 0
    )
    base = ["export-verdicts", "--store", store, "--judge", "digits", "--output"]
    assert_user_error(cli(*base, tmp_path / "e.json"), "--shots", "1 and 2 demonstrations")
    assert not (tmp_path / "e.json").exists()
    done = cli(*base, tmp_path / "e.json", "--shots", "2")
    assert done.exit_code == 0, done.output
    # per query: 4 + 4 * 3 judged (B 5 > 4 keeps every prefix), 12 of them pairs
    assert "wrote 36 verdicts of 3 queries" in done.output
    table_, report = load_rl_data(tmp_path / "e.json", DataOptions(), builtin_registry())
    assert report.candidates_total == 36 and table_.seq_len == 2
    assert_user_error(
        cli(*base, tmp_path / "e3.json", "--shots", "3"), "--shots", "no sequence of 3"
    )


def test_a_signal_stops_collect_with_one_line_and_keeps_what_returned(tmp_path) -> None:
    """The judge hangs at the 25th verdict (batches of 8: 3 batches, 24 verdicts, came
    back); SIGTERM ends the wait: exit 3, one line saying how to continue, and the run
    again asks the judge only for the rest."""
    import os
    import signal
    import subprocess
    import sys

    fault = Path(__file__).parent / "fault_judge"
    pools = _queries(tmp_path, n=4, pool=6)  # 6 + 3 * 5 = 21 per query, 84 in all
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(fault), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "FAULT_JUDGE": "hang:24",
        "FAULT_JUDGE_HUNG": str(tmp_path / "hung"),
    }
    store = tmp_path / "v.sqlite"
    args = [sys.executable, "-m", "lever_trainer", "collect", str(pools), "--judge", "faulty",
            "--beam-size", "3", "--judge-batch-size", "8", "--store", str(store),
            "--output", str(tmp_path / "rl.json")]  # fmt: skip
    status, out = signal_when_hung(args, env, tmp_path / "hung", signal.SIGTERM)
    assert status == 3, out
    assert "stopped by SIGTERM; the verdicts that returned are stored in" in out
    assert "run the same command again" in out and "Traceback" not in out
    assert VerdictStore(store).versions("faulty") == {"1": 24}
    del env["FAULT_JUDGE"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "60 asked of the environment" in done.stdout and "24 already known" in done.stdout


def test_memory_holds_one_chunk_at_a_time() -> None:
    """After each chunk the judge forgets its verdicts (the store keeps them): without a
    store, asking again for a sequence of an earlier chunk reaches the environment."""
    env = Weighted()
    judge = make_judge(env)
    pools = table({1: [10, 11, 12], 2: [12, 13, 14]})
    collect(judge, pools, None, CollectSpec(shots=2, beam_size=2), chunk=1)
    assert len(env.asked) == 2 * (3 + 2 * 2)
    judge.verdicts([1], [[10, 11]])
    assert env.asked[-1] == (1, (10, 11)) and len(env.asked) == 15

"""Property-based tests (Hypothesis) of the parsers and writers: RL data, query (pool)
files, config files, a run's ``steps.jsonl``/``metrics.jsonl``, the verdict store and its
export, and the select writer.

Each parser is fed generated inputs, most of them malformed (valid files mutated: fields
dropped, retyped or replaced, bytes cut or flipped), and must either give a correct
result or raise a :class:`LeverError` whose message is one line, never another
exception, and must leave its input file exactly as it was.
"""

from __future__ import annotations

import io
import json
import math
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import builtin_registry
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lever_trainer.config import OptionNames, load_config
from lever_trainer.data import DataOptions, load_pools, load_rl_data
from lever_trainer.errors import LeverError
from lever_trainer.judge import (
    OPTIONAL_FIELDS,
    VERDICT_FIELDS,
    VerdictStore,
    export_rl_data,
    sequence_key,
)
from lever_trainer.plot import read_run

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------ generators
json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
small_id = st.integers(min_value=0, max_value=40)


@st.composite
def rl_query(draw: Any) -> dict[str, Any]:
    """A well-formed query of RL data: a pool, candidates that point into it."""
    pool = draw(st.lists(small_id, min_size=2, max_size=8, unique=True))
    cands = []
    for _ in range(draw(st.integers(1, 4))):
        pointer = draw(st.permutations(range(len(pool))))[:2]
        cands.append(
            {
                "pointer": pointer,
                "pointer_global": [pool[i] for i in pointer],
                "vqa_correct": draw(st.sampled_from([0, 1])),
                "vqa_acc_score": draw(st.floats(0, 1)),
            }
        )
    return {"candidate_pool_ids": pool, "pointer_candidates": cands}


def mutate(draw: Any, value: Any, depth: int = 0) -> Any:
    """``value`` with one part dropped, retyped or replaced by anything JSON can hold."""
    if depth > 6 or draw(st.integers(0, 3)) == 0:
        return draw(json_value)
    if isinstance(value, dict) and value:
        key = draw(st.sampled_from(sorted(value)))
        out = dict(value)
        if draw(st.booleans()):
            del out[key]
        else:
            out[key] = mutate(draw, value[key], depth + 1)
        return out
    if isinstance(value, list) and value:
        i = draw(st.integers(0, len(value) - 1))
        return [*value[:i], mutate(draw, value[i], depth + 1), *value[i + 1 :]]
    return draw(json_value)


@st.composite
def rl_document_bytes(draw: Any) -> bytes:
    """RL data as bytes: valid, mutated, cut short or with flipped bytes."""
    doc: dict[str, Any] = {"_meta": {"x": 1}}
    for qid in draw(st.lists(st.integers(0, 40), min_size=1, max_size=4, unique=True)):
        doc[str(qid)] = draw(rl_query())
    if draw(st.booleans()):
        doc = mutate(draw, doc)
    data = json.dumps(doc).encode()
    damage = draw(st.sampled_from(["none", "cut", "flip"]))
    if damage == "cut" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif damage == "flip" and data:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1 :]
    return data


def check_parse(path: Path, data: bytes, parse: Callable[[], Any]) -> Any:
    """Run ``parse`` on the file ``path`` holding ``data``: a result, or one-line
    LeverError (returned as None); the file is left exactly as it was."""
    path.write_bytes(data)
    before = path.stat()
    try:
        result = parse()
    except LeverError as exc:
        assert str(exc) and "\n" not in str(exc), repr(exc)
        result = None
    after = path.stat()
    assert path.read_bytes() == data
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
    return result


def fresh_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="lever-prop-"))


# ------------------------------------------------------------------ RL data
@PROPERTY
@given(data=rl_document_bytes())
def test_rl_data_parses_or_refuses_in_one_line(data: bytes) -> None:
    path = fresh_dir() / "rl.json"
    result = check_parse(
        path, data, lambda: load_rl_data(path, DataOptions(), builtin_registry(), cache=False)
    )
    if result is not None:
        table, _ = result
        assert len(table) >= 1
        assert bool((table.sequences < table.pool_len[:, None, None]).all())
        assert bool(table.rewards_raw.isfinite().all())


@PROPERTY
@given(queries=st.lists(rl_query(), min_size=1, max_size=4))
def test_valid_rl_data_keeps_every_candidate(queries: list[dict[str, Any]]) -> None:
    """The correct result: every query, every candidate, its reward by the raw-reward formula (docs/algorithm.md#raw-rewards)."""
    doc = {str(i): q for i, q in enumerate(queries)}
    path = fresh_dir() / "rl.json"
    table, _ = check_parse(
        path,
        json.dumps(doc).encode(),
        lambda: load_rl_data(path, DataOptions(), builtin_registry(), cache=False),
    )
    assert table.query_ids.tolist() == list(range(len(queries)))
    for row, query in enumerate(queries):
        cands = query["pointer_candidates"]
        assert int(table.group_len[row]) == len(cands)
        for j, cand in enumerate(cands):
            assert table.sequences[row, j].tolist() == cand["pointer"]
            expected = cand["vqa_correct"] + cand["vqa_acc_score"]  # hard_plus_soft
            assert math.isclose(float(table.rewards_raw[row, j]), expected, abs_tol=1e-6)


# ------------------------------------------------------------------ query (pool) files
@st.composite
def pool_file(draw: Any) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["json", "jsonl"]))
    pools = draw(st.dictionaries(st.integers(0, 60), st.lists(small_id, max_size=6), max_size=5))
    if kind == "json":
        doc: Any = {str(q): p for q, p in pools.items()}
        if draw(st.booleans()):
            doc = mutate(draw, doc)
        data = json.dumps(doc).encode()
    else:
        lines = [json.dumps({"query_id": q, "pool": p}) for q, p in pools.items()]
        if lines and draw(st.booleans()):
            i = draw(st.integers(0, len(lines) - 1))
            lines[i] = json.dumps(mutate(draw, json.loads(lines[i])))
        data = ("\n".join(lines) + "\n").encode()
    if data and draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return kind, data


@PROPERTY
@given(file=pool_file(), max_pool=st.integers(1, 8))
def test_query_files_parse_or_refuse_in_one_line(file: tuple[str, bytes], max_pool: int) -> None:
    kind, data = file
    path = fresh_dir() / f"q.{kind}"
    table = check_parse(path, data, lambda: load_pools(path, max_pool))
    if table is not None:
        assert len(table) >= 1
        assert table.query_ids.tolist() == sorted(table.query_ids.tolist())
        assert bool((table.pool_len <= max_pool).all())


@PROPERTY
@given(pools=st.dictionaries(st.integers(0, 10**6), st.lists(small_id, min_size=1, max_size=6, unique=True), min_size=1, max_size=6))  # fmt: skip
def test_valid_query_files_give_every_pool(pools: dict[int, list[int]]) -> None:
    path = fresh_dir() / "q.jsonl"
    data = "".join(json.dumps([q, p]) + "\n" for q, p in pools.items()).encode()
    table = check_parse(path, data, lambda: load_pools(path, 64))
    got = {
        int(q): table.pool_ids[i, : int(n)].tolist()
        for i, (q, n) in enumerate(zip(table.query_ids, table.pool_len, strict=True))
    }
    assert got == pools


# ------------------------------------------------------------------ configs
NAMES = OptionNames(
    {"rce_lr": "rce_lr", "rce-lr": "rce_lr", "seed": "seed", "beam_data": "beam_data",
     "plugin": "plugins_on", "plugins_on": "plugins_on"},
    paths=frozenset({"beam_data"}),
    multiple=frozenset({"plugins_on"}),
)  # fmt: skip


@st.composite
def config_file(draw: Any) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["toml", "json"]))
    values = draw(
        st.dictionaries(
            st.sampled_from(["rce_lr", "rce-lr", "seed", "beam_data", "plugin", "preset", "x"]),
            json_value,
            max_size=4,
        )
    )
    if kind == "json":
        data = json.dumps(values).encode()
    else:
        data = draw(
            st.one_of(
                st.just("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())),
                st.text(max_size=60),
            )
        ).encode("utf-8", "surrogatepass")
    return kind, data


@PROPERTY
@given(file=config_file())
def test_config_files_parse_or_refuse_in_one_line(file: tuple[str, bytes]) -> None:
    kind, data = file
    path = fresh_dir() / f"c.{kind}"
    layer = check_parse(path, data, lambda: load_config(path, NAMES))
    if layer is not None:
        assert set(layer.values) <= {"rce_lr", "seed", "beam_data", "plugins_on"}


# ------------------------------------------------------------------ a run's logs
record = st.fixed_dictionaries(
    {"phase": st.one_of(st.sampled_from(["start", "rce", "grpo"]), json_leaf)},
    optional={
        "epoch": json_leaf,
        "step": json_leaf,
        "steps_per_epoch": json_leaf,
        "val_loss": json_leaf,
        "loss": json_leaf,
    },
)


@st.composite
def run_logs(draw: Any) -> tuple[bytes, bytes | None]:
    def lines() -> bytes:
        rows = draw(st.lists(st.one_of(record, json_value), max_size=5))
        text = "".join(json.dumps(r) + "\n" for r in rows).encode()
        if text and draw(st.booleans()):
            text = text[: draw(st.integers(0, len(text)))]
        return text

    return lines(), (lines() if draw(st.booleans()) else None)


@PROPERTY
@given(logs=run_logs())
def test_run_logs_read_or_refuse_in_one_line(logs: tuple[bytes, bytes | None]) -> None:
    metrics, steps = logs
    run = fresh_dir()
    if steps is not None:
        (run / "steps.jsonl").write_bytes(steps)
    curves = check_parse(run / "metrics.jsonl", metrics, lambda: read_run(run))
    if steps is not None:
        assert (run / "steps.jsonl").read_bytes() == steps
    if curves is not None:
        for entry in [*curves.epochs, *curves.steps]:
            if entry.get("phase") != "start":
                assert math.isfinite(curves.x_of_epoch(entry))
        for step in curves.steps:
            assert math.isfinite(curves.x_of_step(step))
        for key in ("val_loss", "loss"):
            xs, ys = curves.series(key)
            assert all(math.isfinite(v) for v in xs + ys)


# ------------------------------------------------------------------ the store
verdict_value = st.fixed_dictionaries(
    {
        "vqa_correct": st.sampled_from([0.0, 1.0]),
        "vqa_acc_score": st.floats(0, 1),
        "vqa_gt_prob": st.floats(0, 1),
        "vqa_rel_score": st.floats(0, 1),
    }
)


@st.composite
def judged(draw: Any) -> list[tuple[int, list[int], dict[str, float], list[int]]]:
    """Verdicts of a few queries, each judged with one of two pools (runs that differ)."""
    out = []
    for q in draw(st.lists(st.integers(0, 30), min_size=1, max_size=4, unique=True)):
        pools = draw(
            st.lists(
                st.lists(small_id, min_size=2, max_size=6, unique=True), min_size=1, max_size=2
            )
        )
        for _ in range(draw(st.integers(1, 4))):
            pool = draw(st.sampled_from(pools))
            seq = draw(st.permutations(pool))[:2]
            out.append((q, seq, draw(verdict_value), pool))
    return out


@PROPERTY
@given(items=judged())
def test_the_export_holds_every_verdict_and_trains(items) -> None:
    """Whatever pools the runs had, the export keeps each verdict once (the first given),
    with its sequence in global ids, and loads as RL data."""
    folder = fresh_dir()
    store = VerdictStore(folder / "v.sqlite")
    for q, seq, verdict, pool in items:
        store.put("toy", "1", [(q, sequence_key(seq), verdict)], {q: pool})
    first: dict[tuple[int, tuple[int, ...]], dict[str, float]] = {}
    for q, seq, verdict, _ in items:
        first.setdefault((q, tuple(seq)), verdict)
    doc = export_rl_data(store, "toy", "1")
    got = {}
    for key, entry in doc.items():
        if key.isdigit():
            pool = entry["candidate_pool_ids"]
            assert len(set(pool)) == len(pool)
            for cand in entry["pointer_candidates"]:
                assert [pool[i] for i in cand["pointer"]] == cand["pointer_global"]
                fields = {f: float(cand[f]) for f in VERDICT_FIELDS}
                got[(int(key), tuple(cand["pointer_global"]))] = fields
    assert got == first
    path = folder / "export.json"
    table, _ = check_parse(
        path,
        json.dumps(doc).encode(),
        lambda: load_rl_data(path, DataOptions(max_pool=64), builtin_registry()),
    )
    assert int(table.group_len.sum()) == len(first)


@settings(max_examples=40, deadline=None)
@given(
    column=st.sampled_from(["sequence", "correct", "acc", "gt_prob", "rel", "pool_id"]),
    value=json_leaf,
)
def test_a_damaged_row_is_refused_in_one_line(column: str, value: Any) -> None:
    folder = fresh_dir()
    store = VerdictStore(folder / "v.sqlite")
    store.put("toy", "1", [(3, "1,2", dict.fromkeys(VERDICT_FIELDS, 1.0))], {3: [1, 2, 5]})
    store.close()
    db = sqlite3.connect(folder / "v.sqlite")
    try:
        with db:
            stored = value if not isinstance(value, int) or abs(value) < 2**63 else str(value)
            db.execute(f"UPDATE verdicts SET {column} = ?", (stored,))
    except sqlite3.IntegrityError:  # a NOT NULL column refuses None: nothing to test
        return
    finally:
        db.close()
    try:
        doc = export_rl_data(VerdictStore(folder / "v.sqlite"), "toy", "1")
    except LeverError as exc:
        assert "\n" not in str(exc) and "v.sqlite" in str(exc)
        return
    cand = doc["3"]["pointer_candidates"][0]
    # NULL in an optional field is a verdict the environment could not give (format 3)
    assert all(
        isinstance(cand[f], int | float) or (cand[f] is None and f in OPTIONAL_FIELDS)
        for f in VERDICT_FIELDS
    )


# ------------------------------------------------------------------ the select writer
@PROPERTY
@given(
    picks=st.dictionaries(
        st.integers(0, 10**9), st.lists(st.integers(0, 10**9), max_size=3), max_size=30
    ),
    chunk=st.integers(1, 7),
    lines=st.booleans(),
    scores=st.booleans(),
)
def test_the_select_writer_round_trips(picks, chunk, lines, scores) -> None:
    from lever_trainer.cli import SelectionWriter
    from lever_trainer.select import Selection

    buffer = io.BytesIO()
    writer = SelectionWriter(buffer, "out.jsonl" if lines else "out.json", scores)
    items = list(picks.items())
    for start in range(0, len(items), chunk):
        part = items[start : start + chunk]
        writer.write(
            Selection([q for q, _ in part], [p for _, p in part], [[0.5] * len(p) for _, p in part])
        )
    writer.close()
    text = buffer.getvalue().decode()
    if lines:
        rows = [json.loads(line) for line in text.splitlines()]
        assert {r["query_id"]: r["ids"] for r in rows} == picks
        assert all(("scores" in r) == scores for r in rows)
    else:
        doc = json.loads(text)
        assert {int(q): (v["ids"] if scores else v) for q, v in doc.items()} == picks


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_an_empty_selection_is_valid(suffix) -> None:
    from lever_trainer.cli import SelectionWriter

    buffer = io.BytesIO()
    writer = SelectionWriter(buffer, f"out{suffix}", False)
    writer.close()
    assert buffer.getvalue() == (b"{}\n" if suffix == ".json" else b"")

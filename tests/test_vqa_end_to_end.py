"""From a VQA dataset and a served vision-language model to a trained selector, with
lever-train alone, on the toy task of examples/vqa_toy (docs/vqa.md walks the same path).

make_task.py writes the task; the stand-in VLM (standin_vlm.py) is started on 127.0.0.1
in its own process, as a real server would be; then, through the real command line:
``embed`` (a tiny random CLIP built here) -> ``collect`` (beam search judged by
``--judge openai-vlm`` over HTTP) -> training (RCE, then the online ``judge-rank`` phase
judged by the same server) -> ``select`` -> ``evaluate`` on the held-out test queries.

The claim: the trained selector beats cosine top-2 in both orders on the test queries by
at least ``MARGIN``. Measured with this very recipe on task seeds 0-4 (``make_task.py
--seed S``, the same commands, 2 CPU threads), accuracy on the 60 test queries:

    seed   trained   cosine   cosine-reversed   gap to the better cosine order
    0      1.000     0.683    0.733             +26.7 points
    1      1.000     0.533    0.650             +35.0
    2      1.000     0.683    0.733             +26.7
    3      0.950     0.450    0.533             +41.7
    4      1.000     0.650    0.600             +35.0

The margin asserted (15 points) is well inside the smallest gap, and the paired 95 %
interval of the difference must exclude 0. The whole test takes about 50 s.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import Result

pytestmark = pytest.mark.vqa

pytest.importorskip("transformers")
pytest.importorskip("PIL")
pytest.importorskip("httpx")

from lever_trainer.api import vqa_accuracy  # noqa: E402

TOY = Path(__file__).resolve().parents[1] / "examples" / "vqa_toy"
if str(TOY) not in sys.path:
    sys.path.insert(0, str(TOY))

import make_task  # noqa: E402
import standin_vlm  # noqa: E402
from tiny_clip import toy_clip  # noqa: E402  (tests/tiny_clip.py loads the example's by path)

#: The task seed CI runs.
SEED = 0
#: The least gain, in accuracy on the test queries, over each cosine order.
MARGIN = 0.15
SHOTS = 2


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The task and the tiny CLIP model."""
    root = tmp_path_factory.mktemp("vqa-e2e")
    make_task.make_task(root / "task", seed=SEED)
    toy_clip.make_tiny_clip(root / "clip")  # the walk-through's model, width 32
    return root


@pytest.fixture(scope="module")
def standin(workdir: Path) -> Iterator[str]:
    """The stand-in VLM in its own process; its base URL."""
    proc = subprocess.Popen(
        [sys.executable, str(TOY / "standin_vlm.py"), "--port", "0",
         "--manifest", str(workdir / "task" / "manifest.jsonl")],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert " on http://127.0.0.1:" in line, line
        yield line.split(" on ")[1].split()[0]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def stats(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/stats", timeout=10) as response:
        return json.load(response)  # type: ignore[no-any-return]


def test_dataset_to_selector_beats_cosine(
    cli: Callable[..., Result], workdir: Path, standin: str
) -> None:
    task = workdir / "task"
    manifest = task / "manifest.jsonl"
    emb, rl, run = workdir / "emb.safetensors", workdir / "rl.json", workdir / "run"
    judge = [
        "--judge", "openai-vlm", "--vlm-url", standin, "--vlm-model", "toy-vlm",
        "--vlm-manifest", manifest, "--store", workdir / "verdicts.sqlite",
    ]  # fmt: skip
    started = time.perf_counter()

    # 1. embed: image and question side by side
    result = cli("embed", manifest, "--model", workdir / "clip", "--modality", "both",
                 "--output", emb)  # fmt: skip
    assert result.exit_code == 0, result.output

    # 2. collect: beam search over the 8 most cosine-similar pool items, plus the cosine
    # pair in both orders and 4 random pairs, every sequence judged over HTTP
    result = cli("collect", task / "train_pools.json", *judge, "--img-emb", emb,
                 "--shots", SHOTS, "--beam-size", 4, "--beam-candidates", 8, "--cosine",
                 "--random", 4, "--output", rl)  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(rl.read_text())
    queries = {k: v for k, v in data.items() if k.isdigit()}
    assert len(queries) == 80
    items, _ = standin_vlm.load_items(manifest)
    model = standin_vlm.StandinModel(items)
    answers = {int(json.loads(t)["id"]): json.loads(t)["answers"] for t in manifest.open()}
    methods = set()
    for qid, entry in queries.items():
        for cand in entry["pointer_candidates"]:
            methods.add(cand["gen_method"])
            # each verdict is what the stand-in answers to that ordered pair, scored
            # with the VQA accuracy against the query's ten answers
            reply = model.reply(int(qid), cand["pointer_global"])
            assert cand["vqa_pred_answer"] == reply.answer
            accuracy = vqa_accuracy(reply.answer, answers[int(qid)])
            assert cand["vqa_acc_score"] == pytest.approx(accuracy)
            assert cand["vqa_correct"] == int(accuracy > 0)
    assert methods == {"beam", "cosine", "cosine-reversed", "random"}

    # 3. train: RCE on the collected sequences, then judge-rank judged by the server
    result = cli("--beam-data", rl, "--img-emb", emb, *judge, "--plugin", "judge-rank",
                 "--output-dir", run)  # fmt: skip
    assert result.exit_code == 0, result.output
    checkpoint = run / "judge-rank_epoch30.safetensors"
    assert checkpoint.is_file()

    # 4. select on the held-out queries, 5. evaluate them against both cosine orders
    picks_file = workdir / "picks.json"
    result = cli("select", "--ckpt", checkpoint, "--queries", task / "test_pools.json",
                 "--img-emb", emb, "--output", picks_file)  # fmt: skip
    assert result.exit_code == 0, result.output
    picks = {int(q): ids for q, ids in json.loads(picks_file.read_text()).items()}
    pools = {int(q): ids for q, ids in json.loads((task / "test_pools.json").read_text()).items()}
    assert sorted(picks) == sorted(pools)
    for q, ids in picks.items():
        assert len(set(ids)) == SHOTS and set(ids) <= set(pools[q])
    report_file = workdir / "eval.json"
    result = cli("evaluate", checkpoint, "--queries", task / "test_pools.json", "--img-emb",
                 emb, *judge, "--baselines", "cosine,cosine-reversed", "--output",
                 report_file)  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(report_file.read_text())
    name = str(checkpoint)
    per_query = report["per_query"][name]["judge_correct"]
    # evaluate judged exactly what select picked: the stand-in's rule on those picks
    expected = [
        float(vqa_accuracy(model.reply(q, picks[q]).answer, answers[q]) > 0)
        for q in report["query_ids"]
    ]
    assert per_query == expected
    trained = report["selectors"][name]["judge_correct"]
    for baseline in ("cosine", "cosine-reversed"):
        assert trained >= report["selectors"][baseline]["judge_correct"] + MARGIN, report
    low = report["intervals"][name]["vs_best_heuristic"]["difference"][1]
    assert low > 0, report["intervals"]

    # nothing refused or failed on the server's side
    counts = stats(standin)
    assert set(counts["by_status"]) == {"200"}, counts  # type: ignore[arg-type]
    print(f"end to end in {time.perf_counter() - started:.0f} s; {counts}; {report['selectors']}")


# --- a server that fails: nothing lost --------------------------------------------
#
# A small task (12 training queries, pools of 10), collected with a beam of 2 over the
# whole pool and no embeddings: 10 + 2 * 9 = 28 sequences per query, 336 in all. The
# stand-in runs in this process, so each test sets its faults.


@pytest.fixture(scope="module")
def small_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vqa-faults")
    make_task.make_task(root, seed=0, demos=60, train=12, test=6, pool=10)
    return root


@pytest.fixture
def server(small_task: Path) -> Iterator[standin_vlm.StandinServer]:
    srv = standin_vlm.start(small_task / "manifest.jsonl")
    yield srv
    srv.shutdown()
    srv.server_close()


def collect(
    cli: Callable[..., Result], task: Path, url: str, store: Path, out: Path, timeout: float = 20
) -> Result:
    return cli("collect", task / "train_pools.json", "--judge", "openai-vlm", "--vlm-url", url,
               "--vlm-model", "toy-vlm", "--vlm-manifest", task / "manifest.jsonl",
               "--vlm-timeout", timeout, "--store", store, "--shots", SHOTS, "--beam-size", 2,
               "--output", out)  # fmt: skip


def queries_of(path: Path) -> dict[str, object]:
    return {k: v for k, v in json.loads(path.read_text()).items() if k != "_meta"}


@pytest.fixture(scope="module")
def clean(cli_module: Callable[..., Result], small_task: Path, tmp_path_factory) -> dict:
    """What a healthy server gives: the requests it answered and the RL data."""
    root = tmp_path_factory.mktemp("clean")
    srv = standin_vlm.start(small_task / "manifest.jsonl")
    try:
        result = collect(cli_module, small_task, srv.url, root / "v.sqlite", root / "rl.json")
        assert result.exit_code == 0, result.output
        return {"requests": srv.requests, "queries": queries_of(root / "rl.json")}
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(scope="module")
def cli_module() -> Callable[..., Result]:
    from click.testing import CliRunner

    from lever_trainer.cli import main

    return lambda *args: CliRunner().invoke(main, [str(a) for a in args])


def stored_verdicts(store: Path) -> int:
    with sqlite3.connect(store) as db:
        return int(db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0])


def test_clean_collect_asks_each_sequence_once(clean: dict) -> None:
    assert clean["requests"] == 12 * 28
    assert len(clean["queries"]) == 12


def test_a_refusal_stops_with_one_line_and_the_verdicts_stay(
    cli: Callable[..., Result], small_task: Path, server, clean: dict, tmp_path: Path
) -> None:
    pools = json.loads((small_task / "train_pools.json").read_text())
    query = sorted(map(int, pools))[5]  # the sixth query: batches before it succeed
    server.settings.fault = standin_vlm.Fault("context-too-long", queries=frozenset({query}))
    store = tmp_path / "v.sqlite"
    result = collect(cli, small_task, server.url, store, tmp_path / "rl.json")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert f"query {query} sequence [" in errors[0]
    assert "maximum context length is 4096 tokens" in errors[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "rl.json").exists()
    kept = stored_verdicts(store)
    assert 0 < kept <= server.settings.counts[200]
    # the server mended, the same command asks only what the store lacks
    server.settings.fault = None
    before = server.requests
    result = collect(cli, small_task, server.url, store, tmp_path / "rl.json")
    assert result.exit_code == 0, result.output
    assert server.requests - before == clean["requests"] - kept
    assert queries_of(tmp_path / "rl.json") == clean["queries"]


@pytest.mark.parametrize(
    ("fault", "status"),
    [
        (standin_vlm.Fault("server-error", first=3), 500),
        (standin_vlm.Fault("rate-limit", first=2), 429),
        (standin_vlm.Fault("drop", first=2), None),
        (standin_vlm.Fault("slow", first=1, delay=3.0), None),  # past --vlm-timeout 1
    ],
    ids=["500", "429", "drop", "timeout"],
)
def test_transient_failures_are_retried_and_change_nothing(
    cli: Callable[..., Result], small_task: Path, server, clean: dict, tmp_path: Path,
    fault: standin_vlm.Fault, status: int | None,
) -> None:  # fmt: skip
    server.settings.fault = fault
    timeout = 1.0 if fault.mode == "slow" else 20.0
    result = collect(
        cli, small_task, server.url, tmp_path / "v.sqlite", tmp_path / "rl.json", timeout
    )
    assert result.exit_code == 0, result.output
    assert queries_of(tmp_path / "rl.json") == clean["queries"]
    if status is not None:
        assert server.settings.counts[status] >= 1
    # every sequence answered once, plus the retried requests
    assert server.settings.counts[200] >= clean["requests"]
    assert server.requests > clean["requests"]


def test_an_answer_that_is_not_json_is_one_line(
    cli: Callable[..., Result], small_task: Path, server, tmp_path: Path
) -> None:
    server.settings.fault = standin_vlm.Fault("non-json", first=1)
    result = collect(cli, small_task, server.url, tmp_path / "v.sqlite", tmp_path / "rl.json")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not JSON" in errors[0] and "sequence [" in errors[0], errors


def test_a_server_that_is_down_is_one_line_after_the_retries(
    cli: Callable[..., Result], small_task: Path, tmp_path: Path
) -> None:
    srv = standin_vlm.start(small_task / "manifest.jsonl")
    url = srv.url
    srv.shutdown()
    srv.server_close()  # nothing listens on that port any more
    result = collect(cli, small_task, url, tmp_path / "v.sqlite", tmp_path / "rl.json")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert f"cannot reach {url}" in errors[0] and "sequence [" in errors[0], errors
    assert "Traceback" not in result.output
    assert not (tmp_path / "rl.json").exists()

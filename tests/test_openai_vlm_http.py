"""The ``openai-vlm`` environment against a fake OpenAI-compatible server on 127.0.0.1
(tests/vlm_fake.py): the request it sends, the verdicts it scores, each failure class,
and the API key kept out of everything written."""

from __future__ import annotations

import base64
import json
import math
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import builtin_registry
from safetensors.torch import save_file
from vlm_fake import FakeVLM

from lever_trainer.errors import LeverError, PluginError
from lever_trainer.judge import Judge, VerdictStore
from lever_trainer.judge_driver import DriverSettings
from lever_trainer.rewards import RewardParams, clip_reward
from lever_trainer_plugins.openai_vlm import OpenAIVLMEnvironment

pytest.importorskip("httpx")
pytestmark = pytest.mark.vqa

# item 0 is the query: ten human answers, three of them "red"
QUERY_ANSWERS = ["red"] * 3 + ["blue"] * 7
ITEMS = [
    (0, "What colour is the square?", QUERY_ANSWERS),
    (1, "What colour is the sky?", ["blue", "blue", "Red"]),  # most common: "blue"
    (2, "What colour is the apple?", ["Red", "red", "green"]),  # most common: "Red"
    (3, "How many circles?", ["two", "2", "2"]),
    (4, "Is it big?", ["yes"]),
]


@pytest.fixture
def fake():
    server = FakeVLM().start()
    yield server
    server.stop()


@pytest.fixture
def task(tmp_path: Path) -> dict[str, Path]:
    """A manifest of five items (PNG stand-ins: the judge never decodes them; item 4's
    image is a URL) and a [5, 2] embedding table."""
    lines = []
    for gid, question, answers in ITEMS:
        image: str = f"img/{gid}.png"
        if gid == 4:
            image = "https://example.org/4.png"
        else:
            (tmp_path / "img").mkdir(exist_ok=True)
            (tmp_path / image).write_bytes(b"\x89PNG fake image %d" % gid)
        lines.append(
            json.dumps({"id": gid, "image": image, "question": question, "answers": answers})
        )
    manifest = tmp_path / "items.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    emb = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [-1.0, 0.0]])
    save_file({"emb": emb}, str(tmp_path / "emb.safetensors"))
    return {"manifest": manifest, "emb": tmp_path / "emb.safetensors", "root": tmp_path}


def configured(fake: FakeVLM, task: dict[str, Path], **extra: Any) -> OpenAIVLMEnvironment:
    env = OpenAIVLMEnvironment()
    options = {
        "vlm_url": fake.url,
        "vlm_model": "tiny-vlm",
        "vlm_manifest": str(task["manifest"]),
        "img_emb": str(task["emb"]),
        "vlm_timeout": 5.0,
        **extra,
    }
    env.configure(options)
    return env


def hard_plus_soft(verdict) -> float:
    raw = builtin_registry().raw_fn("hard_plus_soft")
    return clip_reward(float(raw(verdict, RewardParams())))


def judge_of(env, store=None, retries: int = 0) -> Judge:
    settings = DriverSettings(retries=retries, backoff=0.01, backoff_max=0.02)
    return Judge(env, "openai-vlm", store, hard_plus_soft, driver=settings)


def test_the_request_layout(fake: FakeVLM, task) -> None:
    env = configured(fake, task)
    judge_of(env).verdicts([0], [[1, 2]])
    (body,) = fake.requests
    assert body["model"] == "tiny-vlm"
    assert body["temperature"] == 0 and body["max_tokens"] == 16 and body["logprobs"] is True
    (message,) = body["messages"]
    assert message["role"] == "user"

    def data_url(gid: int) -> str:
        raw = (task["root"] / f"img/{gid}.png").read_bytes()
        return "data:image/png;base64," + base64.b64encode(raw).decode()

    # demonstrations in sequence order, each image then its question and most common
    # answer, then the query's image and question
    assert message["content"] == [
        {"type": "image_url", "image_url": {"url": data_url(1)}},
        {"type": "text", "text": "Question:What colour is the sky? Short answer:blue\n"},
        {"type": "image_url", "image_url": {"url": data_url(2)}},
        {"type": "text", "text": "Question:What colour is the apple? Short answer:Red\n"},
        {"type": "image_url", "image_url": {"url": data_url(0)}},
        {"type": "text", "text": "Question:What colour is the square? Short answer:"},
    ]
    # the order of the sequence is the order of the prompt
    judge_of(env).verdicts([0], [[2, 1]])
    texts = [p["text"] for p in fake.requests[1]["messages"][0]["content"] if p["type"] == "text"]
    assert texts[0].startswith("Question:What colour is the apple?")


def test_a_url_image_is_passed_as_its_url(fake: FakeVLM, task) -> None:
    judge_of(configured(fake, task)).verdicts([0], [[4, 1]])
    first = fake.requests[0]["messages"][0]["content"][0]
    assert first == {"type": "image_url", "image_url": {"url": "https://example.org/4.png"}}


def test_the_verdict_fields(fake: FakeVLM, task, tmp_path: Path) -> None:
    store = VerdictStore(tmp_path / "v.sqlite")
    judge = judge_of(configured(fake, task), store)
    right, wrong = judge.verdicts([0, 0], [[1, 2], [2, 1]])
    # [1, 2]: the fake copies the last demonstration's answer "Red" -> "red": 3 of the
    # 10 humans; leave-one-out accuracy (3 * 2/3 + 7 * 1) / 10 = 0.9
    assert right["vqa_pred_answer"] == "Red"
    assert right["vqa_acc_score"] == pytest.approx(0.9)
    assert right["vqa_correct"] == 1.0
    # gt_prob: the answer's probability 0.8 (its one token, ln 0.8) times its accuracy
    assert right["vqa_gt_prob"] == pytest.approx(0.8 * 0.9)
    # rel: query row [1, 0]; cos with [2, 0] is 1, with [0, 3] is 0: mean 0.5
    assert right["vqa_rel_score"] == pytest.approx(0.5)
    # [2, 1]: "blue", given by 7 of 10: every subset keeps >= 6 matches: 1.0
    assert wrong["vqa_pred_answer"] == "blue" and wrong["vqa_acc_score"] == 1.0
    assert wrong["vqa_gt_prob"] == pytest.approx(0.8)
    # the answer is in the store
    with sqlite3.connect(tmp_path / "v.sqlite") as db:
        rows = dict(db.execute("SELECT sequence, answer FROM verdicts").fetchall())
    assert rows == {"1,2": "Red", "2,1": "blue"}


def test_whole_set_accuracy_and_negative_cosine(fake: FakeVLM, task) -> None:
    env = configured(fake, task, vlm_accuracy="whole-set")
    (v,) = judge_of(env).verdicts([0], [[4, 2]])
    # whole set: min(3 / 3, 1) = 1; rel: cos([1,0],[-1,0]) = -1, cos([1,0],[0,3]) = 0:
    # mean -0.5, clipped to 0
    assert v["vqa_acc_score"] == 1.0 and v["vqa_rel_score"] == 0.0


def test_no_logprobs_means_unavailable(fake: FakeVLM, task, tmp_path: Path) -> None:
    fake.mode = "nologprobs"
    store = VerdictStore(tmp_path / "v.sqlite")
    judge = judge_of(configured(fake, task), store)
    (v,) = judge.verdicts([0], [[1, 2]])
    assert v["vqa_gt_prob"] is None and v["vqa_acc_score"] == pytest.approx(0.9)
    assert judge.rewards([0], [[1, 2]]) == ([1.9], [1.0])
    with sqlite3.connect(tmp_path / "v.sqlite") as db:
        assert db.execute("SELECT gt_prob FROM verdicts").fetchall() == [(None,)]
    # not even asked for
    env = configured(fake, task, vlm_no_logprobs=True)
    judge_of(env).verdicts([0], [[2, 1]])
    assert "logprobs" not in fake.requests[-1]


def test_without_embeddings_rel_is_unavailable(fake: FakeVLM, task) -> None:
    env = configured(fake, task, img_emb=None)
    (v,) = judge_of(env).verdicts([0], [[1, 2]])
    assert v["vqa_rel_score"] is None


def test_the_api_key_is_sent_and_never_written(
    fake: FakeVLM, task, tmp_path, monkeypatch, cli
) -> None:
    secret = "sk-test-7f3a9c"
    monkeypatch.setenv("LEVER_VLM_API_KEY", secret)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-other")
    queries = tmp_path / "queries.json"
    queries.write_text(json.dumps({"0": [1, 2, 3]}))
    out = tmp_path / "out"
    result = cli(
        "evaluate", "--queries", queries, "--img-emb", task["emb"], "--judge", "openai-vlm",
        "--vlm-url", fake.url, "--vlm-model", "tiny-vlm", "--vlm-manifest", task["manifest"],
        "--store", out / "store.sqlite", "--baselines", "cosine", "--shots", "2",
        "--output", out / "eval.json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert fake.requests and all(h["authorization"] == f"Bearer {secret}" for h in fake.headers)
    assert secret not in result.output
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "store.sqlite" for p in written)
    for path in written:
        assert secret.encode() not in path.read_bytes(), path
    # without LEVER_VLM_API_KEY, OPENAI_API_KEY is used
    monkeypatch.delenv("LEVER_VLM_API_KEY")
    judge_of(configured(fake, task)).verdicts([0], [[3, 1]])
    assert fake.headers[-1]["authorization"] == "Bearer sk-other"


def test_a_transient_failure_is_retried(fake: FakeVLM, task) -> None:
    fake.script = ["status:503", "status:429"]
    (v,) = judge_of(configured(fake, task), retries=2).verdicts([0], [[1, 2]])
    assert v["vqa_pred_answer"] == "Red" and len(fake.requests) == 3


def test_a_transient_failure_past_its_retries_is_one_line(fake: FakeVLM, task) -> None:
    fake.mode = "status:503"
    with pytest.raises(PluginError) as err:
        judge_of(configured(fake, task), retries=1).verdicts([0], [[1, 2]])
    line = str(err.value)
    assert "\n" not in line and "query 0 sequence [1, 2]" in line
    assert "HTTP 503: server busy" in line and "2 attempts" in line
    assert len(fake.requests) == 2


@pytest.mark.parametrize(
    ("mode", "said"),
    [
        ("status:400", "HTTP 400): This model's maximum context length is 4096 tokens"),
        ("status:413", "HTTP 413): image too large"),
        ("nonjson", "not JSON: '<html>proxy error</html>'"),
        ("nochoices", "without choices"),
    ],
)
def test_a_refusal_or_a_malformed_answer_is_not_retried(fake: FakeVLM, task, mode, said) -> None:
    fake.mode = mode
    with pytest.raises(PluginError) as err:
        judge_of(configured(fake, task), retries=3).verdicts([0], [[1, 2]])
    line = str(err.value)
    assert "\n" not in line and "query 0 sequence [1, 2]" in line and said in line, line
    assert "PermanentJudgeError" in line and len(fake.requests) == 1


def test_a_server_that_is_down_or_slow(fake: FakeVLM, task) -> None:
    fake.mode, fake.delay = "slow", 2.0
    env = configured(fake, task, vlm_timeout=0.3)
    with pytest.raises(PluginError, match=r"query 0 sequence \[1, 2\]: .* gave no answer within 0\.3 s \(--vlm-timeout\)"):  # fmt: skip
        judge_of(env, retries=1).verdicts([0], [[1, 2]])
    url = fake.url
    fake.stop()
    env = configured(fake, task)
    env.url = url  # nothing listens there any more
    with pytest.raises(
        PluginError, match=r"query 0 sequence \[1, 2\]: cannot reach .*ConnectError"
    ):
        judge_of(env, retries=1).verdicts([0], [[1, 2]])


def test_an_empty_answer_scores_zero(fake: FakeVLM, task) -> None:
    fake.mode = "empty"
    (v,) = judge_of(configured(fake, task)).verdicts([0], [[1, 2]])
    assert v == {
        "vqa_correct": 0.0,
        "vqa_acc_score": 0.0,
        "vqa_gt_prob": 0.0,
        "vqa_rel_score": pytest.approx(0.5),
        "vqa_pred_answer": "",
    }


def test_an_absurdly_long_answer_is_a_wrong_answer_cut_in_the_store(
    fake: FakeVLM, task, tmp_path
) -> None:
    fake.mode = "long"
    store = VerdictStore(tmp_path / "v.sqlite")
    (v,) = judge_of(configured(fake, task), store).verdicts([0], [[1, 2]])
    assert v["vqa_correct"] == 0.0 and v["vqa_acc_score"] == 0.0 and v["vqa_gt_prob"] == 0.0
    with sqlite3.connect(tmp_path / "v.sqlite") as db:
        (answer,) = db.execute("SELECT answer FROM verdicts").fetchone()
    assert len(answer) == 2000 and answer.startswith("word word")


def test_verdicts_obtained_before_a_failure_stay_in_the_store(
    fake: FakeVLM, task, tmp_path
) -> None:
    fake.script = ["ok", "ok", "status:400"]
    store = VerdictStore(tmp_path / "v.sqlite")
    env = configured(fake, task, vlm_concurrency=1)  # one pair per call: stored one by one
    with pytest.raises(PluginError, match="HTTP 400"):
        judge_of(env, store).verdicts([0, 0, 0], [[1, 2], [2, 1], [3, 1]])
    with sqlite3.connect(tmp_path / "v.sqlite") as db:
        assert sorted(r[0] for r in db.execute("SELECT sequence FROM verdicts")) == ["1,2", "2,1"]
    # a second run asks only what is missing
    fake.requests.clear()
    judge_of(configured(fake, task, vlm_concurrency=1), store).verdicts(
        [0, 0, 0], [[1, 2], [2, 1], [3, 1]]
    )
    assert len(fake.requests) == 1


def test_an_image_over_the_limit_stops_before_sending(fake: FakeVLM, task) -> None:
    env = configured(fake, task, vlm_max_image_mb=1e-5)  # about 10 bytes
    with pytest.raises(LeverError, match=r"--vlm-max-image-mb: image .*1\.png of item 1 is"):
        judge_of(env).verdicts([0], [[1, 2]])
    assert fake.requests == []


def test_concurrent_requests_of_one_call(fake: FakeVLM, task) -> None:
    """Eight pairs, eight slow requests at once: the call takes about one delay."""
    import time

    fake.mode, fake.delay = "slow", 0.5
    env = configured(fake, task, vlm_concurrency=8)
    pairs = [[a, b] for a in (1, 2, 3, 4) for b in (1, 2, 3, 4) if a != b][:8]
    started = time.monotonic()
    got = judge_of(env).verdicts([0] * 8, pairs)
    assert len(got) == 8 and len(fake.requests) == 8
    assert time.monotonic() - started < 0.5 * 8 / 2
    assert all(math.isfinite(v["vqa_acc_score"]) for v in got)


def test_served_by_serve_judge_and_judged_remotely(fake: FakeVLM, task) -> None:
    """serve-judge hosting openai-vlm: the answer and the unavailable field cross HTTP,
    and the remote environment takes the served optional fields."""
    pytest.importorskip("uvicorn")
    from test_serve import remote, serving

    fake.mode = "nologprobs"
    env = configured(fake, task)
    with serving(env) as url:
        client = remote(url)
        assert client.name == "openai-vlm" and client.version == env.version
        assert client.optional_fields == ("vqa_gt_prob",)
        (v,) = judge_of(client).verdicts([0], [[1, 2]])
    assert v["vqa_pred_answer"] == "Red" and v["vqa_gt_prob"] is None
    assert v["vqa_acc_score"] == pytest.approx(0.9)


def training_task(tmp_path: Path) -> list[Any]:
    """Twelve items, six queries of RL data over the pool 6..11: train's arguments."""
    (tmp_path / "img").mkdir()
    lines = []
    for gid in range(12):
        (tmp_path / f"img/{gid}.png").write_bytes(b"png %d" % gid)
        answers = ["red"] * 10 if gid % 2 else ["blue"] * 10
        lines.append(
            json.dumps(
                {"id": gid, "image": f"img/{gid}.png", "question": f"q{gid}?", "answers": answers}
            )
        )
    (tmp_path / "items.jsonl").write_text("\n".join(lines) + "\n")
    torch.manual_seed(0)
    save_file({"emb": torch.randn(12, 8)}, str(tmp_path / "emb.safetensors"))
    pool = list(range(6, 12))
    data = {
        str(q): {
            "candidate_pool_ids": pool,
            "pointer_candidates": [
                {
                    "pointer": [0, 1],
                    "pointer_global": [6, 7],
                    "vqa_correct": q % 2,
                    "vqa_acc_score": float(q % 2),
                },
                {
                    "pointer": [1, 0],
                    "pointer_global": [7, 6],
                    "vqa_correct": 1 - q % 2,
                    "vqa_acc_score": float(1 - q % 2),
                },
            ],
        }
        for q in range(6)
    }
    (tmp_path / "rl.json").write_text(json.dumps(data))
    return [
        "train", "--beam-data", tmp_path / "rl.json", "--img-emb", tmp_path / "emb.safetensors",
        "--output-dir", tmp_path / "run", "--store", tmp_path / "store.sqlite",
        "--rce-epochs", "1", "--grpo-epochs", "0", "--val-ratio", "0.5", "--hidden-dim", "16",
        "--judge", "openai-vlm", "--vlm-model", "tiny-vlm",
        "--vlm-manifest", tmp_path / "items.jsonl",
    ]  # fmt: skip


def test_a_training_run_judged_by_the_vlm_never_writes_the_key(
    fake: FakeVLM, tmp_path, monkeypatch, cli
) -> None:
    """train with --judge openai-vlm: validation judges the greedy selections over HTTP;
    the run folder, its logs and the store hold the answers but never the key."""
    secret = "sk-train-41d0e2"
    monkeypatch.setenv("LEVER_VLM_API_KEY", secret)
    run = tmp_path / "run"
    result = cli(*training_task(tmp_path), "--vlm-url", fake.url)
    assert result.exit_code == 0, result.output
    assert fake.requests, "validation asked the VLM nothing"
    config = json.loads((run / "run_config.json").read_text())
    assert config["plugin_options"]["openai-vlm"]["vlm_model"] == "tiny-vlm"
    with sqlite3.connect(tmp_path / "store.sqlite") as db:
        answers = [a for (a,) in db.execute("SELECT answer FROM verdicts")]
    assert answers and set(answers) <= {"red", "blue"}
    for path in [*run.rglob("*"), tmp_path / "store.sqlite"]:
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert secret not in result.output


def test_bad_settings_are_one_line(fake: FakeVLM, task, tmp_path, cli) -> None:
    from conftest import assert_user_error

    queries = tmp_path / "queries.json"
    queries.write_text(json.dumps({"0": [1, 2, 3]}))
    base = ["evaluate", "--queries", queries, "--img-emb", task["emb"], "--judge", "openai-vlm"]
    base += ["--no-store", "--baselines", "cosine", "--shots", "2"]
    full = ["--vlm-url", fake.url, "--vlm-model", "m", "--vlm-manifest", task["manifest"]]
    assert_user_error(cli(*base, *full[2:]), "--vlm-url")
    assert_user_error(cli(*base, *full[:2], *full[4:]), "--vlm-model")
    assert_user_error(cli(*base, *full[:4]), "--vlm-manifest")
    assert_user_error(cli(*base, *full[2:], "--vlm-url", "ftp://x"), "--vlm-url", "not an http")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"id": 0, "image": "https://e/0.png", "question": "q", "answers": []}\n{"id": 0\n'
    )
    assert_user_error(cli(*base, *full[:4], "--vlm-manifest", bad), f"{bad}:2")
    # a query the manifest lacks: one line naming the item, the query and the sequence
    small = tmp_path / "small.jsonl"
    small.write_text('{"id": 0, "image": "https://e/0.png", "question": "q", "answers": ["a"]}\n')
    assert_user_error(cli(*base, *full[:4], "--vlm-manifest", small), "has no item", "query 0")
    assert fake.requests == []


def test_a_query_without_answers_is_one_line(fake: FakeVLM, task, tmp_path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        '{"id": 0, "image": "https://e/0.png", "question": "q", "answers": []}\n'
        '{"id": 1, "image": "https://e/1.png", "question": "r", "answers": ["a"]}\n'
    )
    env = configured(fake, task, vlm_manifest=str(manifest), img_emb=None)
    with pytest.raises(LeverError, match=r"m\.jsonl:1: query 0 has no human answers"):
        judge_of(env).verdicts([0], [[1, 1]])
    assert fake.requests == []


def test_a_reward_mode_needing_what_the_settings_turn_off_stops_at_start(
    fake: FakeVLM, task, tmp_path, cli
) -> None:
    from conftest import assert_user_error

    queries = tmp_path / "queries.json"
    queries.write_text(json.dumps({"0": [1, 2, 3]}))
    args = ["evaluate", "--queries", queries, "--img-emb", task["emb"], "--judge", "openai-vlm"]
    args += ["--no-store", "--baselines", "cosine", "--shots", "2", "--vlm-url", fake.url]
    args += ["--vlm-model", "m", "--vlm-manifest", task["manifest"]]
    result = cli(*args, "--vlm-no-logprobs", "--reward-mode", "hard01_plus_gtprob")
    assert_user_error(result, "--reward-mode needs vqa_gt_prob", "environment openai-vlm")
    assert fake.requests == []
    # with log-probabilities asked for, the same mode runs
    fine = cli(*args, "--reward-mode", "hard01_plus_gtprob", "--output", tmp_path / "e.json")
    assert fine.exit_code == 0, fine.output


def test_a_reward_mode_meeting_an_unavailable_field_mid_run_is_one_line(
    fake: FakeVLM, tmp_path, cli
) -> None:
    from conftest import assert_user_error

    fake.mode = "nologprobs"
    args = [*training_task(tmp_path), "--vlm-url", fake.url]
    assert_user_error(
        cli(*args, "--reward-mode", "hard01_plus_gtprob"),
        "--reward-mode needs vqa_gt_prob",
        "environment openai-vlm",
    )
    # what the server answered before the stop is in the store
    with sqlite3.connect(tmp_path / "store.sqlite") as db:
        stored = db.execute("SELECT COUNT(*), COUNT(gt_prob) FROM verdicts").fetchone()
    assert stored[0] == len(fake.requests) > 0 and stored[1] == 0


def test_one_client_serves_the_calls_of_a_run(fake: FakeVLM, task) -> None:
    env = configured(fake, task)
    judge = judge_of(env)
    judge.verdicts([0], [[1, 2]])
    first = env._client
    judge.verdicts([0], [[2, 1]])
    assert first is not None and env._client is first and len(fake.requests) == 2


def test_a_retry_asks_only_the_pairs_that_failed(fake: FakeVLM, task) -> None:
    """Four pairs in one call, the second request answered 503: the other three finish,
    and the retry sends one request, not four."""
    fake.script = ["ok", "status:503"]
    env = configured(fake, task, vlm_concurrency=4)
    got = judge_of(env, retries=1).verdicts([0] * 4, [[1, 2], [2, 1], [3, 1], [1, 3]])
    # item 3's answers "two", "2", "2" are one answer normalised, shown as first written
    assert [v["vqa_pred_answer"] for v in got] == ["Red", "blue", "blue", "two"]
    assert len(fake.requests) == 5
    assert env._answered == {}  # nothing kept once the call returned

"""The toy VQA task of examples/vqa_toy: its generator (make_task.py) and the stand-in
vision-language model (standin_vlm.py), its rule and its OpenAI-compatible server.

The rule's cases below are derived by hand from the stand-in's documented rule: a
demonstration of the query's question type supports it by 1 (clear picture) or 0.25
(murky), times 0.5 per place before the last; a clear query needs 0.5, a murky one 1.0;
short of that the model copies its last demonstration's most common answer.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import math
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from lever_trainer.data import load_pools
from lever_trainer.manifest import read_manifest

TOY = Path(__file__).resolve().parents[1] / "examples" / "vqa_toy"
if str(TOY) not in sys.path:
    sys.path.insert(0, str(TOY))

import make_task  # noqa: E402
import standin_vlm  # noqa: E402


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small task: 60 pool items, 12 training and 9 test queries, pools of 10."""
    out = tmp_path_factory.mktemp("toy")
    make_task.make_task(out, seed=5, demos=60, train=12, test=9, pool=10)
    return out


@pytest.fixture(scope="module")
def lines(task: Path) -> dict[int, dict[str, Any]]:
    """The manifest's lines by id."""
    rows = [json.loads(t) for t in (task / "manifest.jsonl").read_text().splitlines()]
    return {row["id"]: row for row in rows}


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --- the generator ------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_task(tmp_path: Path) -> None:
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        make_task.make_task(tmp_path / name, seed=seed, demos=30, train=6, test=6, pool=8)
    a, b, c = (files_of(tmp_path / n) for n in "abc")
    assert a == b
    assert len(a) == 30 + 6 + 6 + 4  # pictures, manifest, two pool files, task.json
    assert a["manifest.jsonl"] != c["manifest.jsonl"]


def test_the_manifest_reads_as_a_lever_manifest(task: Path, lines: dict[int, dict]) -> None:
    items = read_manifest(task / "manifest.jsonl")  # checks every picture exists
    assert sorted(items) == list(range(60 + 12 + 9))
    splits = Counter(item.extra["split"] for item in items.values())
    assert splits == {"pool": 60, "train": 12, "test": 9}
    # ids: pool items first, then training, then test queries
    assert [items[i].extra["split"] for i in (0, 59, 60, 71, 72, 80)] == [
        "pool", "pool", "train", "train", "test", "test",
    ]  # fmt: skip
    for item in items.values():
        assert len(item.answers) == 10
        assert Path(item.image).is_file()


def test_answers_are_mostly_the_truth_with_more_non_answers_for_murky_pictures(
    lines: dict[int, dict],
) -> None:
    for row in lines.values():
        truth = {"colour": row["colour"], "shape": row["shape"], "count": str(row["count"])}[
            row["question_type"]
        ]
        spellings = {truth, *make_task.VARIANTS[truth]}
        wrong = [a for a in row["answers"] if a not in spellings]
        # clear pictures: 0 or 1 wrong answers; murky: 2 or 3 (make_answers), each a
        # non-answer, never a value some question could have
        assert len(wrong) in ((0, 1) if row["background"] == "clear" else (2, 3)), row
        assert set(wrong) <= set(make_task.NON_ANSWERS)
        assert not set(make_task.NON_ANSWERS) & {v for vs in make_task.VALUES.values() for v in vs}


def test_pictures_are_32_by_32_rgb_pngs_showing_the_colour(
    task: Path, lines: dict[int, dict]
) -> None:
    for item_id in (0, 1, 2, 70):
        data = (task / lines[item_id]["image"]).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height, depth, colour_type = (
            int.from_bytes(data[16:20], "big"),
            int.from_bytes(data[20:24], "big"),
            data[24],
            data[25],
        )
        assert (width, height, depth, colour_type) == (32, 32, 8, 2)
        # one IDAT chunk right after IHDR (8 + 25 bytes in)
        size = int.from_bytes(data[33:37], "big")
        assert data[37:41] == b"IDAT"
        raw = zlib.decompress(data[41 : 41 + size])
        assert len(raw) == 32 * (1 + 32 * 3)  # each row: filter byte + 32 RGB pixels
        pixels = {
            tuple(raw[r * 97 + 1 + 3 * x : r * 97 + 4 + 3 * x])
            for r in range(32)
            for x in range(32)
        }
        if lines[item_id]["background"] == "clear":  # shapes in their full colour
            assert make_task.COLOURS[lines[item_id]["colour"]] in pixels


def test_pool_files_load_as_query_files(task: Path, lines: dict[int, dict]) -> None:
    for split, count in (("train", 12), ("test", 9)):
        pools = load_pools(task / f"{split}_pools.json")
        assert len(pools) == count
        assert {lines[q]["split"] for q in pools.query_ids.tolist()} == {split}
        assert pools.pool_len.tolist() == [10] * count
        for row in pools.pool_ids.tolist():
            assert len(set(row)) == 10
            assert {lines[i]["split"] for i in row} == {"pool"}


def test_a_pool_larger_than_the_demonstrations_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(TOY / "make_task.py"), str(tmp_path), "--demos", "5", "--pool", "8"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "make_task.py: --pool 8 is larger than --demos 5"


# --- the stand-in's rule ------------------------------------------------------------


def _item(qtype: str, background: str, truth: str, shown: str, item_id: int = 0):
    return standin_vlm.ToyItem(item_id, qtype, truth, background, shown)


def _model(*items: standin_vlm.ToyItem) -> standin_vlm.StandinModel:
    return standin_vlm.StandinModel({item.id: item for item in items})


def test_murky_query_needs_a_clear_same_type_demonstration_last() -> None:
    query = _item("colour", "murky", "red", "red", 0)
    clear_same = _item("colour", "clear", "blue", "blue", 1)
    other_type = _item("shape", "clear", "circle", "circle", 2)
    model = _model(query, clear_same, other_type)
    # [other, clear same-type]: support 1 * 1.0 = 1.0 >= 1.0 -> correct
    assert model.reply(0, [2, 1]).answer == "red"
    assert model.reply(0, [2, 1]).support == 1.0
    # [clear same-type, other]: support 0.5 * 1.0 = 0.5 < 1.0 -> copies the last: "circle"
    reply = model.reply(0, [1, 2])
    assert (reply.support, reply.need, reply.answer) == (0.5, 1.0, "circle")


def test_clear_query_is_answered_with_the_helper_in_either_place() -> None:
    query = _item("count", "clear", "2", "2", 0)
    clear_same = _item("count", "clear", "3", "3", 1)
    other_type = _item("colour", "clear", "green", "green", 2)
    model = _model(query, clear_same, other_type)
    assert model.reply(0, [2, 1]).answer == "2"  # support 1.0 >= 0.5
    assert model.reply(0, [1, 2]).answer == "2"  # support 0.5 >= 0.5


def test_murky_demonstrations_fall_short_and_the_last_answer_is_copied() -> None:
    query = _item("shape", "clear", "square", "square", 0)
    murky_a = _item("shape", "murky", "circle", "circle", 1)
    murky_b = _item("shape", "murky", "triangle", "triangle", 2)
    model = _model(query, murky_a, murky_b)
    reply = model.reply(0, [1, 2])
    # support 0.25 (last) + 0.5 * 0.25 = 0.375 < 0.5
    assert reply.support == pytest.approx(0.375)
    assert reply.answer == "triangle"
    # distribution over the shape answers: logits square 4 * (0.375 - 0.5) = -0.5,
    # triangle (copied) 0, circle -3
    z = {"square": -0.5, "triangle": 0.0, "circle": -3.0}
    total = sum(math.exp(v) for v in z.values())
    assert dict(reply.distribution) == pytest.approx({a: math.exp(v) / total for a, v in z.items()})
    assert reply.distribution[0][0] == "triangle"


def test_copying_the_right_answer_is_right() -> None:
    query = _item("colour", "murky", "red", "red", 0)
    murky_red = _item("colour", "murky", "red", "red", 1)
    model = _model(query, murky_red)
    reply = model.reply(0, [1])
    assert (reply.support, reply.answer) == (0.25, "red")  # short of 1.0, but copies "red"
    # logits: red max(0, 4 * (0.25 - 1)) = 0, green/blue/yellow -3
    p_red = 1 / (1 + 3 * math.exp(-3))
    assert dict(reply.distribution)["red"] == pytest.approx(p_red)


# --- the server ---------------------------------------------------------------------


def _data_url(task: Path, row: dict[str, Any]) -> str:
    return "data:image/png;base64," + base64.b64encode((task / row["image"]).read_bytes()).decode()


def _request(task: Path, lines: dict[int, dict], ids: list[int], **extra: Any) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    for item_id in ids:
        row = lines[item_id]
        content.append({"type": "image_url", "image_url": {"url": _data_url(task, row)}})
        content.append({"type": "text", "text": f"Question: {row['question']} Short answer:"})
    return {"model": "toy-vlm", "messages": [{"role": "user", "content": content}], **extra}


def _post(url: str, body: Any, raw: bytes | None = None) -> tuple[int, bytes, str]:
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(
        url + "/chat/completions", data, {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers["Content-Type"]


@pytest.fixture
def server(task: Path):
    srv = standin_vlm.start(task / "manifest.jsonl")
    yield srv
    srv.shutdown()
    srv.server_close()


def _find(lines: dict[int, dict], **want: Any) -> int:
    return next(i for i, row in lines.items() if all(row[k] == v for k, v in want.items()))


@pytest.mark.vqa
def test_models_and_a_chat_completion(server, task: Path, lines: dict[int, dict]) -> None:
    with urllib.request.urlopen(server.url + "/models") as response:
        models = json.load(response)
    assert [m["id"] for m in models["data"]] == ["toy-vlm"]
    query, demos = 72, [3, 7]
    status, body, kind = _post(server.url, _request(task, lines, [*demos, query], temperature=0))
    assert (status, kind) == (200, "application/json")
    answer = json.loads(body)
    expected = server.model.reply(query, demos).answer
    assert answer["choices"][0]["message"]["content"] == expected
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["choices"][0]["logprobs"] is None  # not asked for
    # 3 images of 64 pseudo-tokens, each followed by "Question: ... Short answer:"
    words = sum(len(f"Question: {lines[i]['question']} Short answer:".split()) for i in (3, 7, 72))
    assert answer["usage"]["prompt_tokens"] == 3 * 64 + words
    # the same request, the same answer (all but the id, which numbers the requests)
    again = json.loads(_post(server.url, _request(task, lines, [*demos, query], temperature=0))[1])
    assert (answer.pop("id"), again.pop("id")) == ("chatcmpl-standin-1", "chatcmpl-standin-2")
    assert again == answer
    with urllib.request.urlopen(server.url.removesuffix("/v1") + "/stats") as response:
        assert json.load(response) == {"requests": 2, "by_status": {"200": 2}}


@pytest.mark.vqa
def test_the_order_of_demonstrations_changes_the_answer(
    server, task: Path, lines: dict[int, dict]
) -> None:
    query = _find(lines, split="test", background="murky")
    qtype = lines[query]["question_type"]
    helper = _find(lines, split="pool", background="clear", question_type=qtype)
    other = _find(
        lines,
        split="pool",
        question_type=next(t for t in ("colour", "shape", "count") if t != qtype),
    )
    truth = server.model.items[query].truth

    def answer(ids: list[int]) -> str:
        return json.loads(_post(server.url, _request(task, lines, ids))[1])["choices"][0][
            "message"
        ]["content"]

    assert answer([other, helper, query]) == truth  # the helper last: support 1.0
    assert answer([helper, other, query]) == server.model.items[other].shown_answer  # 0.5


@pytest.mark.vqa
def test_logprobs_when_asked_and_allowed(server, task: Path, lines: dict[int, dict]) -> None:
    ids = [3, 7, 72]
    reply = server.model.reply(72, [3, 7])
    body = _request(task, lines, ids, logprobs=True, top_logprobs=2)
    choice = json.loads(_post(server.url, body)[1])["choices"][0]
    (token,) = choice["logprobs"]["content"]
    probs = dict(reply.distribution)
    assert token["token"] == reply.answer
    assert token["logprob"] == pytest.approx(math.log(probs[reply.answer]))
    assert [t["token"] for t in token["top_logprobs"]] == [a for a, _ in reply.distribution[:2]]
    server.settings.logprobs = False
    assert json.loads(_post(server.url, body)[1])["choices"][0]["logprobs"] is None


@pytest.mark.vqa
def test_latency_delays_each_answer(server, task: Path, lines: dict[int, dict]) -> None:
    server.settings.latency = 0.3
    start = time.perf_counter()
    assert _post(server.url, _request(task, lines, [3, 72]))[0] == 200
    assert time.perf_counter() - start >= 0.3


@pytest.mark.vqa
def test_bad_requests_are_refused_with_a_message(
    server, task: Path, lines: dict[int, dict]
) -> None:
    status, body, _ = _post(server.url, None, raw=b"{not json")
    assert (status, json.loads(body)["message"]) == (400, "the request body is not JSON")
    unknown = _request(task, lines, [3, 72])
    unknown["messages"][0]["content"][0]["image_url"]["url"] = "data:image/png;base64," + (
        base64.b64encode(b"not a picture of the task").decode()
    )
    status, body, _ = _post(server.url, unknown)
    assert (status, json.loads(body)["message"]) == (
        400,
        "image 1 is not a picture of the task's manifest",
    )
    no_image = {"messages": [{"role": "user", "content": "What colour?"}]}
    assert _post(server.url, no_image)[0] == 400
    wrong_model = _request(task, lines, [3, 72])
    wrong_model["model"] = "gpt-9"
    status, body, _ = _post(server.url, wrong_model)
    assert (status, json.loads(body)["error"]["message"]) == (
        404,
        "The model `gpt-9` does not exist.",
    )


@pytest.mark.vqa
@pytest.mark.parametrize(
    ("mode", "status", "message"),
    [
        ("context-too-long", 400, "This model's maximum context length is 4096 tokens."),
        ("image-too-large", 400, "image 2 is too large"),
        ("rate-limit", 429, "Too many requests"),
        ("server-error", 500, "internal error (injected)"),
    ],
)
def test_error_faults(server, task, lines, mode: str, status: int, message: str) -> None:
    server.settings.fault = standin_vlm.Fault(mode)
    got, body, _ = _post(server.url, _request(task, lines, [3, 72]))
    assert got == status
    assert json.loads(body)["error"]["message"].startswith(message)
    assert json.loads(body)["message"].startswith(message)  # vLLM's layout too


@pytest.mark.vqa
def test_answer_faults(server, task: Path, lines: dict[int, dict]) -> None:
    body = _request(task, lines, [3, 72], max_tokens=12)
    server.settings.fault = standin_vlm.Fault("empty")
    choice = json.loads(_post(server.url, body)[1])["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == ("", "stop")
    server.settings.fault = standin_vlm.Fault("long")
    choice = json.loads(_post(server.url, body)[1])["choices"][0]
    assert choice["finish_reason"] == "length"
    assert len(choice["message"]["content"].split()) == 12  # runs to max_tokens
    server.settings.fault = standin_vlm.Fault("malformed")
    status, raw, _ = _post(server.url, body)
    assert status == 200 and "choices" not in json.loads(raw)
    server.settings.fault = standin_vlm.Fault("non-json")
    status, raw, kind = _post(server.url, body)
    assert (status, kind) == (200, "text/html")
    with pytest.raises(json.JSONDecodeError):
        json.loads(raw)


@pytest.mark.vqa
def test_drop_closes_the_connection_without_an_answer(server, task, lines) -> None:
    server.settings.fault = standin_vlm.Fault("drop")
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=5)
    conn.request("POST", "/v1/chat/completions", json.dumps(_request(task, lines, [3, 72])))
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        conn.getresponse()


@pytest.mark.vqa
def test_faults_chosen_by_count_and_by_query(server, task, lines) -> None:
    server.settings.fault = standin_vlm.Fault("server-error", first=2)
    statuses = [_post(server.url, _request(task, lines, [3, 72]))[0] for _ in range(3)]
    assert statuses == [500, 500, 200]
    server.settings.fault = standin_vlm.Fault("server-error", every=2)
    statuses = [_post(server.url, _request(task, lines, [3, 72]))[0] for _ in range(4)]
    # requests 4..7 of the server: the even ones fail
    assert statuses == [500, 200, 500, 200]
    server.settings.fault = standin_vlm.Fault("rate-limit", queries=frozenset({73}))
    assert _post(server.url, _request(task, lines, [3, 72]))[0] == 200
    assert _post(server.url, _request(task, lines, [3, 73]))[0] == 429


@pytest.mark.vqa
def test_slow_fault_and_real_limits(server, task, lines) -> None:
    server.settings.fault = standin_vlm.Fault("slow", delay=0.4)
    start = time.perf_counter()
    assert _post(server.url, _request(task, lines, [3, 72]))[0] == 200
    assert time.perf_counter() - start >= 0.4
    server.settings.fault = None
    # a real limit: 2 images (128 pseudo-tokens) + words + max_tokens 256 > 200
    server.settings.max_context = 200
    status, body, _ = _post(server.url, _request(task, lines, [3, 72]))
    assert status == 400 and "maximum context length is 200 tokens" in json.loads(body)["message"]
    server.settings.max_context = 4096
    size = len((task / lines[3]["image"]).read_bytes())
    server.settings.max_image_bytes = size - 1
    status, body, _ = _post(server.url, _request(task, lines, [3, 72]))
    assert (status, json.loads(body)["message"]) == (
        400,
        f"image 1 is too large: {size} bytes, at most {size - 1} bytes are accepted",
    )


@pytest.mark.vqa
def test_the_command_line_serves_and_prints_its_url(task: Path, lines: dict[int, dict]) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(TOY / "standin_vlm.py"), "--manifest", str(task / "manifest.jsonl"),
         "--port", "0", "--fault", "rate-limit", "--fault-query", "73"],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("standin_vlm: serving toy-vlm on http://127.0.0.1:")
        url = line.split(" on ")[1].split()[0]
        assert _post(url, _request(task, lines, [3, 72]))[0] == 200
        assert _post(url, _request(task, lines, [3, 73]))[0] == 429
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_manifest_without_the_hidden_fields_is_refused(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": 0, "image": "a.png", "question": "?", "answers": []}))
    result = subprocess.run(
        [sys.executable, str(TOY / "standin_vlm.py"), "--manifest", str(manifest)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"standin_vlm.py: {manifest}:1: not an item of the toy task (no question_type, shape, "
        "colour, count, background); the stand-in reads manifests written by make_task.py"
    )


def test_images_are_recognised_by_the_hash_of_their_bytes(task: Path, lines) -> None:
    _, images = standin_vlm.load_items(task / "manifest.jsonl")
    for item_id in (0, 60, 80):
        digest = hashlib.sha256((task / lines[item_id]["image"]).read_bytes()).hexdigest()
        assert images[digest] == item_id
    assert len(images) == len(lines)  # no two pictures share their bytes


def test_the_walkthrough_script_parses_and_runs_the_tested_recipe() -> None:
    script = TOY / "walkthrough.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    # the recipe tests/test_vqa_end_to_end.py checks, flag for flag
    for flags in (
        "--modality both",
        "--shots 2 --beam-size 4 --beam-candidates 8 --cosine --random 4",
        "--plugin judge-rank",
        "--baselines cosine,cosine-reversed",
    ):
        assert flags in text, flags

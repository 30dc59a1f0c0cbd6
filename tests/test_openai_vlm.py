"""The ``openai-vlm`` environment without a server: the prompt it builds, its template
file, its version, and how it reads and scores a completion."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lever_trainer.errors import LeverError
from lever_trainer.manifest import ManifestItem
from lever_trainer_plugins.openai_vlm import (
    DEFAULT_TEMPLATE,
    OpenAIVLMEnvironment,
    Template,
    answer_logprob,
    answer_text,
    build_messages,
    check_url,
    load_template,
    score,
)


def item(gid: int, question: str, answers: tuple[str, ...] = ()) -> ManifestItem:
    return ManifestItem(id=gid, image=f"/x/{gid}.png", question=question, answers=answers)


def url(i: ManifestItem) -> str:
    return f"img:{i.id}"


def test_default_template_is_the_short_answer_layout() -> None:
    demos = [item(1, "Q one?", ("cat", "dog", "dog")), item(2, "Q two?", ("2",))]
    messages = build_messages(Template(), demos, item(0, " Q zero? "), url)
    assert messages == [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "img:1"}},
                {"type": "text", "text": "Question:Q one? Short answer:dog\n"},
                {"type": "image_url", "image_url": {"url": "img:2"}},
                {"type": "text", "text": "Question:Q two? Short answer:2\n"},
                {"type": "image_url", "image_url": {"url": "img:0"}},
                {"type": "text", "text": "Question:Q zero? Short answer:"},
            ],
        }
    ]


def test_a_template_file(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(
        'system = "Answer in one word."\n'
        'instruction = "Look at the examples.\\n"\n'
        'demonstration = "Q: {question} A: {answer} <image>\\n"\n'
        'query = "Q: {question} {odd} A:"\n'
    )
    template = load_template(path)
    messages = build_messages(template, [item(1, "a {b}?", ("x",))], item(0, "c?"), url)
    assert messages[0] == {"role": "system", "content": "Answer in one word."}
    # text parts that meet are merged; a query without <image> has no image part;
    # braces of a question or an unknown placeholder stay as written
    assert messages[1]["content"] == [
        {"type": "text", "text": "Look at the examples.\nQ: a {b}? A: x "},
        {"type": "image_url", "image_url": {"url": "img:1"}},
        {"type": "text", "text": "\nQ: c? {odd} A:"},
    ]


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ('quey = "x"', "unknown key 'quey'"),
        ("query = 3", "query must be a string"),
        ('query = "no question"', "query must contain {question}"),
        ('query = "{question} {answer}"', "query must not contain {answer}"),
        ("query = ", "is not a TOML file"),
    ],
)
def test_a_bad_template_is_one_line(tmp_path: Path, text: str, said: str) -> None:
    path = tmp_path / "t.toml"
    path.write_text(text + "\n")
    with pytest.raises(LeverError, match=r"^--vlm-template: ") as err:
        load_template(path)
    assert said in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(LeverError, match="cannot read"):
        load_template(tmp_path / "missing.toml")


def env_for(tmp_path: Path, **fields) -> OpenAIVLMEnvironment:
    manifest = tmp_path / "m.jsonl"
    if not manifest.exists():
        manifest.write_text(
            json.dumps({"id": 0, "image": "https://e/0.png", "question": "q", "answers": []}) + "\n"
        )
    env = OpenAIVLMEnvironment()
    env.model = "m1"
    for k, v in fields.items():
        setattr(env, k, v)
    env.version = env.digest(manifest)
    return env


def test_the_version_changes_with_what_decides_a_verdict(tmp_path: Path) -> None:
    base = env_for(tmp_path).version
    assert env_for(tmp_path).version == base  # deterministic
    changed = {
        "model": env_for(tmp_path, model="m2").version,
        "template": env_for(tmp_path, template=Template(query="Q {question}")).version,
        "max tokens": env_for(tmp_path, max_tokens=32).version,
        "logprobs": env_for(tmp_path, logprobs=False).version,
        "accuracy": env_for(tmp_path, leave_one_out=False).version,
    }
    assert len({base, *changed.values()}) == 6, changed
    # the server's URL, the timeout and the concurrency change how it asks, not what
    same = env_for(tmp_path, url="http://other:1/v1", timeout=1.0, concurrency=2).version
    assert same == base
    # another manifest (other answers) is another version
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"id": 0, "image": "https://e/0.png", "question": "q", "answers": ["a"]}) + "\n"
    )
    assert env_for(tmp_path).version != base


def test_the_version_covers_the_embeddings(tmp_path: Path) -> None:
    import torch

    one = env_for(tmp_path, query_emb=torch.ones(2, 3), cand_emb=torch.ones(2, 3)).version
    two = env_for(tmp_path, query_emb=torch.ones(2, 3), cand_emb=torch.zeros(2, 3)).version
    assert one != two != env_for(tmp_path).version


def test_answer_text_is_the_first_line() -> None:
    assert answer_text("  red\nQuestion: what? Short answer: blue") == "red"
    assert answer_text("\n\n Two dogs \n") == "Two dogs"
    assert answer_text("") == "" and answer_text("\n \n") == ""
    # a repeated prompt label is not part of the answer
    assert answer_text("Short answer: two dogs\nQuestion:") == "two dogs"
    assert answer_text("ANSWER:yes") == "yes"
    assert answer_text("Answers: many") == "Answers: many"


def test_answer_logprob_sums_the_answer_tokens() -> None:
    tokens = [
        {"token": "\n", "logprob": -0.1},
        {"token": "red", "logprob": -0.2},
        {"token": " car", "logprob": -0.3},
        {"token": "\n", "logprob": -0.4},
        {"token": "Question", "logprob": -5.0},
    ]
    # the answer "red car" ends at character 8 of "\nred car\nQuestion": tokens up to it
    assert answer_logprob(tokens, "\nred car\nQuestion") == pytest.approx(-0.6)
    assert answer_logprob([{"token": "red", "logprob": None}], "red") is None
    assert answer_logprob([{"token": "red", "logprob": float("nan")}], "red") is None
    assert answer_logprob([], "") == 0.0
    # an echoed label's tokens come before the answer's end: counted
    echo = [{"token": "Answer:", "logprob": -0.5}, {"token": " no", "logprob": -0.25}]
    assert answer_logprob(echo, "Answer: no") == pytest.approx(-0.75)


def test_score_of_a_completion() -> None:
    answers = ["2"] * 4 + ["3"] * 6
    tokens = [{"token": "two", "logprob": math.log(0.5)}]
    got = score("two", answers, tokens, leave_one_out=True)
    # "two" -> "2": 4 humans, every leave-one-out subset keeps >= 3: accuracy 1
    assert got == {
        "vqa_correct": 1.0,
        "vqa_acc_score": 1.0,
        "vqa_gt_prob": 0.5,
        "vqa_pred_answer": "two",
    }
    # 1 human of 10: leave-one-out 9 * (1/3) / 10 = 0.3; correct (> 0), as upstream
    one = score("cat", ["cat"] + ["dog"] * 9, tokens, leave_one_out=True)
    assert one["vqa_acc_score"] == pytest.approx(0.3) and one["vqa_correct"] == 1.0
    assert one["vqa_gt_prob"] == pytest.approx(0.5 * 0.3)
    # no log-probabilities: unavailable, not 0
    assert score("two", answers, None, leave_one_out=True)["vqa_gt_prob"] is None
    # a wrong answer: 0 everywhere
    assert score("seven", answers, tokens, leave_one_out=False)["vqa_gt_prob"] == 0.0


def test_check_url() -> None:
    assert check_url(" http://h:8000/v1/ ") == "http://h:8000/v1"
    with pytest.raises(LeverError, match="--vlm-url: 'ftp://h' is not an http"):
        check_url("ftp://h")
    with pytest.raises(LeverError, match="LEVER_VLM_API_KEY, not in the URL"):
        check_url("http://user:pw@h/v1")


def test_default_template_constant() -> None:
    assert Template().canonical() == json.dumps(DEFAULT_TEMPLATE, sort_keys=True)


def test_without_httpx_one_line_says_what_to_install(monkeypatch, tmp_path: Path) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "httpx", None)  # import httpx now fails
    with pytest.raises(
        LeverError, match=r"--judge openai-vlm needs httpx: pip install 'lever-trainer\[vlm\]'"
    ):
        OpenAIVLMEnvironment().configure({"vlm_url": "http://h/v1"})

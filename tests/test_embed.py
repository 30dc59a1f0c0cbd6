"""``lever-train embed`` with a tiny, randomly initialised CLIP built locally (nothing is
downloaded; tests/tiny_clip.py): the table's shape, row lengths and bytes, each
modality, the table in training and ``select``, and the one-line errors.

Needs the clip extra (transformers, Pillow): ``tox -e vqa``.
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import json
import math
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, candidate, write_json
from safetensors import safe_open
from tiny_clip import MAX_TOKENS, PROJECTION, make_picture, make_tiny_clip

from lever_trainer.data import load_embeddings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a name that is not a folder never goes online
HAVE_CLIP = all(importlib.util.find_spec(m) for m in ("transformers", "PIL"))
pytestmark = [
    pytest.mark.vqa,
    pytest.mark.skipif(not HAVE_CLIP, reason="the clip extra (transformers, Pillow) is missing"),
]

#: The manifest's ids: 3 is absent, so its row is padding.
IDS = [0, 1, 2, 4, 5]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny")


def write_manifest(folder: Path, ids: list[int] = IDS, **questions: str) -> Path:
    """A manifest of ``ids``, each with its own generated picture (images/ID.png)."""
    lines = []
    for i in ids:
        make_picture(folder / "images" / f"{i}.png", i)
        question = questions.get(f"q{i}", f"what colour is square {i}?")
        lines.append({"id": i, "image": f"images/{i}.png", "question": question, "answers": ["x"]})
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    return write_manifest(tmp_path / "data")


def embed(cli, manifest: Path, model: Path, output: Path, *extra: str):
    return cli("embed", manifest, "--model", model, "--output", output, "--device", "cpu", *extra)


def read_table(path: Path) -> tuple[torch.Tensor, dict[str, str]]:
    with safe_open(str(path), "pt") as fh:
        return fh.get_tensor("embeddings"), fh.metadata()


def reference(model: Path, manifest: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit image and text embeddings of the manifest's items in id order, computed here
    straight from transformers (not through lever_trainer)."""
    from PIL import Image
    from transformers import AutoProcessor, CLIPModel

    clip, processor = CLIPModel.from_pretrained(model).eval(), AutoProcessor.from_pretrained(model)
    items = sorted(
        (json.loads(line) for line in manifest.read_text().splitlines()), key=lambda x: x["id"]
    )
    pictures = [Image.open(manifest.parent / x["image"]).convert("RGB") for x in items]
    with torch.inference_mode():
        image = clip.get_image_features(**processor(images=pictures, return_tensors="pt"))
        text = clip.get_text_features(
            **processor.tokenizer([x["question"] for x in items], padding=True, return_tensors="pt")
        )
    unit = [
        (out if isinstance(out, torch.Tensor) else out.pooler_output).float()
        for out in (image, text)
    ]
    return tuple(torch.nn.functional.normalize(u, dim=1) for u in unit)  # type: ignore[return-value]


def test_each_modality_writes_unit_rows_indexed_by_id(cli, tmp_path, manifest, model) -> None:
    image_ref, text_ref = reference(model, manifest)
    tables = {}
    for modality in ("image", "text", "both"):
        out = tmp_path / f"{modality}.safetensors"
        result = embed(cli, manifest, model, out, "--modality", modality, "--batch-size", "2")
        assert result.exit_code == 0, result.output
        assert "5 items, [6, " in result.output and "1 row of padding" in result.output
        table, meta = read_table(out)
        width = PROJECTION * (2 if modality == "both" else 1)
        assert table.shape == (6, width) and table.dtype == torch.float32
        # rows of the items have length 1; row 3 (no item 3) is zero padding
        norms = table.norm(dim=1)
        assert torch.allclose(norms[IDS], torch.ones(5), atol=1e-5)
        assert norms[3] == 0
        assert meta["ids"] == "0-2,4-5" and meta["items"] == "5"
        assert meta["modality"] == modality and meta["model"] == str(model)
        assert meta["dim"] == str(width) and meta["format"] == "lever-trainer-embeddings"
        tables[modality] = table
    # row of id i = the i-th item in id order, equal to transformers' own unit embedding
    assert torch.allclose(tables["image"][IDS], image_ref, atol=1e-5)
    assert torch.allclose(tables["text"][IDS], text_ref, atol=1e-5)
    # both = [image / |image|, text / |text|] / sqrt(2): each half times sqrt(2) is the
    # unit embedding of one modality, and the row's length is sqrt((1 + 1) / 2) = 1
    both = tables["both"][IDS] * math.sqrt(2)
    assert torch.allclose(both[:, :PROJECTION], image_ref, atol=1e-5)
    assert torch.allclose(both[:, PROJECTION:], text_ref, atol=1e-5)
    # five different pictures, five different rows
    assert len({tuple(r.tolist()) for r in tables["image"][IDS]}) == 5


def test_the_same_inputs_give_the_same_bytes(cli, tmp_path, manifest, model) -> None:
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert embed(cli, manifest, model, first, "--modality", "both").exit_code == 0
    assert embed(cli, manifest, model, second, "--modality", "both").exit_code == 0
    assert first.read_bytes() == second.read_bytes()
    # the items in another line order: the same table (rows are ids, items go by id)
    lines = manifest.read_text().splitlines()
    shuffled = manifest.with_name("shuffled.jsonl")
    shuffled.write_text("\n".join([lines[3], lines[0], lines[4], lines[2], lines[1]]) + "\n")
    third = tmp_path / "c.safetensors"
    assert embed(cli, shuffled, model, third, "--modality", "both").exit_code == 0
    assert torch.equal(read_table(third)[0], read_table(first)[0])
    assert read_table(third)[1]["manifest_sha256"] != read_table(first)[1]["manifest_sha256"]
    # another process (the safetensors library writes its header keys in an order that
    # changes between processes; the table's writer sorts them), writing to a pipe
    command = [sys.executable, "-m", "lever_trainer", "embed", str(manifest), "--model"]
    command += [str(model), "--output", "-", "--modality", "both", "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == first.read_bytes()
    assert b"wrote standard output: 5 items" in done.stderr


def test_the_table_trains_and_selects(cli, tmp_path, manifest, model) -> None:
    emb = tmp_path / "emb.safetensors"
    assert embed(cli, manifest, model, emb, "--modality", "both").exit_code == 0
    loaded = load_embeddings(emb)
    assert loaded.dim == 2 * PROJECTION and loaded.query_items is not None
    # queries 0, 1, 2 choose two of the items 4, 5 and each other
    data = {
        str(q): {
            "pointer_candidates": [
                candidate([4, 5], 1, 1.0),
                candidate([5, (q + 1) % 3], 0, 0.2),
                candidate([(q + 2) % 3, 4], 0, 0.0),
            ]
        }
        for q in (0, 1, 2)
    }
    rl = write_json(tmp_path / "rl.json", data)
    run = tmp_path / "run"
    result = cli(
        "--beam-data", rl, "--img-emb", emb, "--output-dir", run, "--rce-epochs", "2",
        "--grpo-epochs", "0", "--batch-size", "2", "--val-ratio", "0.34", "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    ckpt = run / "rce_epoch02.safetensors"
    assert ckpt.is_file()
    picks = tmp_path / "picks.json"
    queries = write_json(tmp_path / "q.json", {"0": [1, 2, 4, 5], "2": [0, 1, 4, 5]})
    result = cli(
        "select", "--ckpt", ckpt, "--queries", queries, "--img-emb", emb, "--output", picks
    )
    assert result.exit_code == 0, result.output
    chosen = json.loads(picks.read_text())
    assert set(chosen["0"]) <= {1, 2, 4, 5} and len(set(chosen["0"])) == 2
    assert set(chosen["2"]) <= {0, 1, 4, 5} and len(set(chosen["2"])) == 2
    # the padding row of the absent id 3 is refused, not selected from
    bad = write_json(tmp_path / "bad.json", {"0": [1, 3, 4]})
    result = cli("select", "--ckpt", ckpt, "--queries", bad, "--img-emb", emb, "--output", picks)
    assert_user_error(result, "candidate id 3", "not an item of this table")


def test_a_picture_shared_by_several_items_is_embedded_once(cli, tmp_path, model) -> None:
    # six questions about three pictures, in batches of 2 that cut across them: items
    # 0, 1, 2 show picture a; 3 shows b; 4 and 5 show c
    folder = tmp_path / "data"
    shown = {0: "a", 1: "a", 2: "a", 3: "b", 4: "c", 5: "c"}
    for index, name in enumerate("abc"):
        make_picture(folder / f"{name}.png", index + 1)
    manifest = folder / "m.jsonl"
    manifest.write_text(
        "".join(
            json.dumps({"id": i, "image": f"{p}.png", "question": f"q{i}?", "answers": []}) + "\n"
            for i, p in shown.items()
        )
    )
    out = tmp_path / "t.safetensors"
    result = embed(cli, manifest, model, out, "--batch-size", "2")
    assert result.exit_code == 0, result.output
    assert "6 items, [6, 8] (image," in result.output and "3 distinct images" in result.output
    table = read_table(out)[0]
    assert torch.equal(table[0], table[1]) and torch.equal(table[0], table[2])
    assert torch.equal(table[4], table[5]) and not torch.allclose(table[0], table[3])
    # the same rows as a manifest of one item per picture (pictures a, b, c as items 0-2)
    single = folder / "single.jsonl"
    single.write_text(
        "".join(
            json.dumps({"id": i, "image": f"{p}.png", "question": "q?", "answers": []}) + "\n"
            for i, p in enumerate("abc")
        )
    )
    alone = tmp_path / "alone.safetensors"
    assert embed(cli, single, model, alone, "--batch-size", "2").exit_code == 0
    by_picture = read_table(alone)[0]
    assert torch.allclose(table[[0, 3, 4]], by_picture, atol=1e-5)


def test_a_long_question_is_cut_with_a_warning(cli, tmp_path, model) -> None:
    long = "why " * 10  # 40 characters, each a token with this vocabulary: over MAX_TOKENS
    assert len(long.replace(" ", "")) + 2 > MAX_TOKENS
    manifest = write_manifest(tmp_path / "data", [0, 1], q1=long)
    out = tmp_path / "t.safetensors"
    result = embed(cli, manifest, model, out, "--modality", "text")
    assert result.exit_code == 0, result.output
    assert f"1 questions were longer than the model's {MAX_TOKENS} tokens" in result.output
    assert torch.allclose(read_table(out)[0].norm(dim=1), torch.ones(2), atol=1e-5)


@pytest.fixture
def image_server(tmp_path: Path) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 serving ``tmp_path/served``; yields its base URL."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_url_images_are_fetched(cli, tmp_path, manifest, model, image_server) -> None:
    local = tmp_path / "local.safetensors"
    assert embed(cli, manifest, model, local).exit_code == 0
    lines = [json.loads(x) for x in manifest.read_text().splitlines()]
    for line in lines:
        served = tmp_path / "served" / f"{line['id']}.png"
        served.write_bytes((manifest.parent / line["image"]).read_bytes())
        line["image"] = f"{image_server}/{line['id']}.png"
    remote = tmp_path / "remote.jsonl"
    remote.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "remote.safetensors"
    result = embed(cli, remote, model, out)
    assert result.exit_code == 0, result.output
    assert torch.equal(read_table(out)[0], read_table(local)[0])
    # a URL that does not answer: one line naming the manifest line, nothing written,
    # and a previous table left as it was
    lines[2]["image"] = f"{image_server}/missing.png"
    remote.write_text("".join(json.dumps(x) + "\n" for x in lines))
    before = out.read_bytes()
    result = embed(cli, remote, model, out, "--overwrite")
    assert_user_error(result, "remote.jsonl:3", "missing.png", "HTTP 404", "local paths")
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".remote")] == []


def test_manifest_errors_come_before_the_model_loads(cli, tmp_path, manifest) -> None:
    # the model does not exist: had it been loaded first, the error would name --model
    nowhere = tmp_path / "no-model"
    out = tmp_path / "e.safetensors"
    text = manifest.read_text().splitlines()
    bad = manifest.with_name("bad.jsonl")
    bad.write_text("\n".join([text[0], '{"id": 1, "image": "images/1.png"}', *text[2:]]) + "\n")
    assert_user_error(embed(cli, bad, nowhere, out), "bad.jsonl:2", "missing field")
    (manifest.parent / "images" / "4.png").unlink()
    assert_user_error(embed(cli, manifest, nowhere, out), "manifest.jsonl:4", "not found")
    assert not out.exists()


def test_model_errors_are_one_line(cli, tmp_path, manifest, model) -> None:
    out = tmp_path / "e.safetensors"
    nowhere = tmp_path / "no-model"
    assert_user_error(embed(cli, manifest, nowhere, out), "--model: cannot load", "no-model")
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert_user_error(embed(cli, manifest, other, out), "--model:", "'bert' model", "CLIP")
    # a CLIP model without its processor files (tokenizer, image processor)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((model / name).read_bytes())
    assert_user_error(embed(cli, manifest, bare, out), "--model: cannot load", "bare")
    assert not out.exists()
    if not torch.cuda.is_available():
        result = embed(cli, manifest, model, out, "--device", "cuda")
        assert_user_error(result, "--device cuda: CUDA is not available")


def test_output_rules(cli, tmp_path, manifest, model) -> None:
    out = tmp_path / "e.safetensors"
    out.write_bytes(b"previous")
    assert_user_error(
        embed(cli, manifest, model, out), "--output:", "already exists", "--overwrite"
    )
    assert out.read_bytes() == b"previous"
    result = embed(cli, manifest, model, tmp_path / "e.pt")
    assert_user_error(result, "--output:", "e.pt", "*.safetensors")
    assert_user_error(embed(cli, manifest, model, tmp_path), "--output:", "directory")
    assert embed(cli, manifest, model, out, "--overwrite").exit_code == 0
    assert read_table(out)[0].shape == (6, PROJECTION)


def test_progress_lines_when_stderr_is_not_a_terminal(cli, tmp_path, manifest, model, monkeypatch):
    from lever_trainer.cli import embed as embed_cli

    monkeypatch.setattr(embed_cli, "PROGRESS_LINE_SECONDS", 0.0)  # a line after every batch
    out = tmp_path / "e.safetensors"
    result = embed(cli, manifest, model, out, "--batch-size", "2")
    assert result.exit_code == 0, result.output
    # 5 items in batches of 2: after 2 and 4 (the end, 5, is the summary line's)
    lines = [ln for ln in result.output.splitlines() if ln.startswith("embed: ")]
    assert lines == ["embed: 2/5 items", "embed: 4/5 items"]


def shared_pictures_manifest(folder: Path) -> Path:
    """Nine questions about five pictures; with batches of 2 a picture is shared across
    batch boundaries (items 1-2 show picture 1, 3-4 picture 2, ...)."""
    for p in range(5):
        make_picture(folder / f"p{p}.png", p + 1)
    manifest = folder / "m.jsonl"
    manifest.write_text(
        "".join(
            json.dumps(
                {"id": i, "image": f"p{(i + 1) // 2}.png", "question": f"q {i}?", "answers": []}
            )
            + "\n"
            for i in range(9)
        )
    )
    return manifest


def test_an_interrupted_embedding_continues_to_the_same_bytes(
    cli, tmp_path, model, monkeypatch
) -> None:
    from lever_trainer.embed import ClipEncoder

    manifest = shared_pictures_manifest(tmp_path / "data")
    args = ("--modality", "both", "--batch-size", "2", "--save-every", "3")
    whole = tmp_path / "whole.safetensors"
    assert embed(cli, manifest, model, whole, *args).exit_code == 0
    assert not (tmp_path / "whole.safetensors.partial").exists()

    seen: list[str] = []
    texts = ClipEncoder.texts

    def counting(self, questions):
        if stop_at and len(seen) >= stop_at:
            raise KeyboardInterrupt
        seen.extend(questions)
        return texts(self, questions)

    stop_at = 6  # three batches of two, then Ctrl-C
    monkeypatch.setattr(ClipEncoder, "texts", counting)
    out = tmp_path / "t.safetensors"
    result = embed(cli, manifest, model, out, *args)
    assert result.exit_code == 130, result.output
    partial = tmp_path / "t.safetensors.partial"
    # saves every 4 items (3 rounded up to whole batches): items 0-3 are kept
    assert result.output.strip().splitlines()[-1] == (
        f"interrupted; 4 of 9 items embedded are kept in {partial}: run the same command "
        "again to continue"
    )
    assert not out.exists() and len(list(partial.glob("part-*.safetensors"))) == 1

    seen.clear()
    stop_at = 0
    result = embed(cli, manifest, model, out, *args)
    assert result.exit_code == 0, result.output
    assert f"continuing the unfinished embedding kept in {partial}" in result.output
    assert seen == [f"q {i}?" for i in range(4, 9)]  # only the items not kept
    assert out.read_bytes() == whole.read_bytes()
    assert not partial.exists()


def test_unfinished_work_of_another_embedding_is_refused_with_one_line(
    cli, tmp_path, model, monkeypatch
) -> None:
    from lever_trainer.embed import ClipEncoder

    manifest = shared_pictures_manifest(tmp_path / "data")
    texts = ClipEncoder.texts
    calls = []

    def stop_second(self, questions):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return texts(self, questions)

    monkeypatch.setattr(ClipEncoder, "texts", stop_second)
    out = tmp_path / "t.safetensors"
    base = ("--modality", "text", "--save-every", "1")
    assert embed(cli, manifest, model, out, *base, "--batch-size", "2").exit_code == 130
    monkeypatch.setattr(ClipEncoder, "texts", texts)
    result = embed(cli, manifest, model, out, *base, "--batch-size", "4")
    assert_user_error(
        result,
        f"{out}.partial holds the unfinished work of another embedding (batch_size '2' "
        "there, '4' now)",
        "remove",
    )
    assert len(list(Path(f"{out}.partial").glob("part-*"))) == 1  # nothing lost
    # a torn part is one line too
    next(Path(f"{out}.partial").glob("part-*")).write_bytes(b"torn")
    result = embed(cli, manifest, model, out, *base, "--batch-size", "2")
    assert_user_error(result, "not a part of this embedding", "to start over")

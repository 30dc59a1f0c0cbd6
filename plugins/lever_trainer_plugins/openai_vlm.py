"""Environment ``openai-vlm``: a vision-language model behind an OpenAI-compatible server
judges each (query, ordered demonstration sequence) pair.

``--judge openai-vlm --vlm-url http://host:8000/v1 --vlm-model NAME --vlm-manifest
items.jsonl``. For each pair the environment builds one chat request: the demonstrations'
images and question/answer lines, then the query's image and question, laid out by the
prompt template (``--vlm-template``, a TOML file; the default is the short-answer VQA
layout described in docs/vlm-judge.md). Local images travel inline as base64 data URLs,
URL images as their URL. It sends ``POST {url}/chat/completions`` with temperature 0 and
log-probabilities requested, and scores the answer with the VQAv2 rules
(:mod:`lever_trainer.vqa_eval`):

- ``vqa_acc_score``: the VQA accuracy of the answer against the query's human answers;
- ``vqa_correct``: 1 when that accuracy is above 0 (at least one human gave the answer),
  as the upstream Lever-Plus data does;
- ``vqa_gt_prob``: the probability the model gives its own answer (the product of its
  tokens' probabilities, from the server's log-probabilities) times its accuracy; it is
  *unavailable* (None, stored as NULL) when the server returns no log-probabilities or
  ``--vlm-no-logprobs`` is set: never a made-up number;
- ``vqa_rel_score``: the mean cosine similarity between the query's embedding and each
  demonstration's (``--img-emb`` / ``--cand-emb``), clipped to [0, 1]; unavailable
  without an embedding table;
- ``vqa_pred_answer``: the answer text, kept in the verdict store.

``version`` is a hash of everything that decides a verdict: the model name, the
template, the decoding settings, the accuracy rule, the manifest's bytes and the
embedding table; a changed prompt never reuses old verdicts. The server's URL and the
API key are not part of it.

The API key comes from ``LEVER_VLM_API_KEY`` (else ``OPENAI_API_KEY``) only: it is no
option, so it never reaches ``run_config.json``, a checkpoint, a log or the store.

Failures: no connection, a timeout (``--vlm-timeout``), HTTP 408, 429 or 5xx are
:class:`TransientJudgeError` (the judge driver asks again, ``--judge-retries``, with
backoff; the other requests of the call finish first and only the failed pairs are sent
again); a refusal (another 4xx: context too long, image too large) and an answer that
is not the expected JSON are :class:`PermanentJudgeError`, one line naming the query, the
sequence and the server's message. httpx comes with the ``vlm`` extra.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import os
import re
import sys
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lever_trainer.api import (
    CAND_EMB,
    EMB_KEY,
    IMG_EMB,
    About,
    Environment,
    LeverError,
    ManifestItem,
    Option,
    PermanentJudgeError,
    TransientJudgeError,
    hookimpl,
    image_data,
    load_embeddings,
    most_common_answer,
    read_manifest,
    vqa_accuracy,
)

from ._http import check_server_url

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

NAME = "openai-vlm"
#: Environment variables holding the API key, first found wins.
KEY_VARIABLES = ("LEVER_VLM_API_KEY", "OPENAI_API_KEY")
INSTALL_HINT = "pip install 'lever-trainer[vlm]'"
#: Where the image of an item goes in a template's text.
IMAGE_MARK = "<image>"
#: Placeholders a template may use.
PLACEHOLDERS = ("{question}", "{answer}")
#: Keys of a template file.
TEMPLATE_KEYS = ("system", "instruction", "demonstration", "query")
#: The default template: upstream Lever-Plus's short-answer VQA layout.
DEFAULT_TEMPLATE: dict[str, str] = {
    "system": "",
    "instruction": "",
    "demonstration": "<image>Question:{question} Short answer:{answer}\n",
    "query": "<image>Question:{question} Short answer:",
}
#: Encoded images kept in memory (a pool's demonstrations come back often).
IMAGE_CACHE = 512
#: Characters of a server's message shown in an error line.
MESSAGE_CHARS = 200
#: Verdicts kept for the retry of calls that failed transiently (then forgotten).
ANSWERED_KEPT = 4096
#: Rows of an embedding table hashed at once (``version``).
HASH_ROWS = 65536
#: How the answer text is read from a completion (part of ``version``).
ANSWER_RULE = "first-line-v2"
#: A label a chat model may repeat before its answer.
_ECHOED_LABEL = re.compile(r"^(short\s+)?answer\s*:", re.IGNORECASE)


# ----------------------------------------------------------------------------- template
@dataclass(frozen=True)
class Template:
    """A prompt layout: an optional system message, then one user message made of the
    ``instruction``, each demonstration's ``demonstration`` text and the query's
    ``query`` text. ``{question}`` and ``{answer}`` are replaced by the item's question
    and (demonstrations only) its most common answer; ``<image>`` is where its image goes."""

    system: str = DEFAULT_TEMPLATE["system"]
    instruction: str = DEFAULT_TEMPLATE["instruction"]
    demonstration: str = DEFAULT_TEMPLATE["demonstration"]
    query: str = DEFAULT_TEMPLATE["query"]

    def canonical(self) -> str:
        """The template as one JSON text (what ``version`` hashes)."""
        return json.dumps({k: getattr(self, k) for k in TEMPLATE_KEYS}, sort_keys=True)


def load_template(path: str | os.PathLike[str] | None) -> Template:
    """The template in TOML file ``path`` (None: the default). Missing keys take the
    default's value; an unknown key, a non-string value, a query without ``{question}``
    or a query using ``{answer}`` is a :class:`LeverError` naming the file and key."""
    if path is None:
        return Template()
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise LeverError(f"--vlm-template: cannot read {path} ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise LeverError(f"--vlm-template: {path} is not a TOML file ({exc})") from None
    unknown = sorted(set(doc) - set(TEMPLATE_KEYS))
    if unknown:
        raise LeverError(
            f"--vlm-template: {path}: unknown key {unknown[0]!r} (a template has "
            f"{', '.join(TEMPLATE_KEYS)})"
        )
    for key, value in doc.items():
        if not isinstance(value, str):
            raise LeverError(f"--vlm-template: {path}: {key} must be a string")
    template = Template(**doc)
    if "{question}" not in template.query:
        raise LeverError(f"--vlm-template: {path}: query must contain {{question}}")
    if "{answer}" in template.query:
        raise LeverError(
            f"--vlm-template: {path}: query must not contain {{answer}} (the model gives it)"
        )
    return template


def _fill(text: str, item: ManifestItem, answer: str | None) -> str:
    # replace, not str.format: a question may hold braces
    out = text.replace("{question}", item.question.strip())
    if answer is not None:
        out = out.replace("{answer}", answer)
    return out


def build_messages(
    template: Template,
    demonstrations: Sequence[ManifestItem],
    query: ManifestItem,
    image_url: Any,
) -> list[dict[str, Any]]:
    """The chat messages of one request: the system message (when the template has one)
    and one user message whose content alternates text and image parts, in order:
    instruction, each demonstration, the query. ``image_url(item)`` gives an item's
    image as a URL (a ``data:`` URL for a local file)."""
    parts: list[dict[str, Any]] = []

    def add_text(text: str) -> None:
        if not text:
            return
        if parts and parts[-1]["type"] == "text":
            parts[-1]["text"] += text
        else:
            parts.append({"type": "text", "text": text})

    def add(text: str, item: ManifestItem) -> None:
        for i, piece in enumerate(text.split(IMAGE_MARK)):
            if i:
                parts.append({"type": "image_url", "image_url": {"url": image_url(item)}})
            add_text(piece)

    add_text(template.instruction)
    for demo in demonstrations:
        add(_fill(template.demonstration, demo, most_common_answer(demo.answers)), demo)
    add(_fill(template.query, query, None), query)
    messages: list[dict[str, Any]] = []
    if template.system:
        messages.append({"role": "system", "content": template.system})
    messages.append({"role": "user", "content": parts})
    return messages


# ----------------------------------------------------------------------------- scoring
def answer_text(content: str) -> str:
    """The answer in a completion: its first non-empty line, stripped (a model that goes
    on with another "Question:" line is cut there), without a leading ``Answer:`` or
    ``Short answer:`` that echoes the prompt."""
    for line in content.splitlines():
        if line.strip():
            return _ECHOED_LABEL.sub("", line.strip(), count=1).strip()
    return ""


def answer_logprob(tokens: Sequence[Mapping[str, Any]], content: str) -> float | None:
    """The sum of the log-probabilities of the tokens that make up ``answer_text``:
    tokens are taken in order until their text covers the answer's line; None when the
    log-probabilities are unusable (a token without a finite ``logprob``)."""
    answer = answer_text(content)
    if not answer:
        return 0.0  # no token spells an empty answer; its probability does not matter
    end = content.find(answer) + len(answer)
    total, covered = 0.0, 0
    for token in tokens:
        if covered >= end:
            break
        value = token.get("logprob") if isinstance(token, Mapping) else None
        text = token.get("token") if isinstance(token, Mapping) else None
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        if not math.isfinite(float(value)) or not isinstance(text, str):
            return None
        total += float(value)
        covered += len(text)
    return min(total, 0.0)


def score(
    content: str,
    answers: Sequence[str],
    tokens: Sequence[Mapping[str, Any]] | None,
    leave_one_out: bool,
) -> dict[str, Any]:
    """The verdict fields of one completion but ``vqa_rel_score``: accuracy, correctness,
    ``vqa_gt_prob`` (None without ``tokens``) and the answer text."""
    answer = answer_text(content)
    acc = vqa_accuracy(answer, answers, leave_one_out=leave_one_out)
    gt_prob: float | None = None
    if tokens is not None:
        logprob = answer_logprob(tokens, content)
        if logprob is not None:
            gt_prob = min(1.0, max(0.0, math.exp(logprob) * acc))
    return {
        "vqa_correct": 1.0 if acc > 0.0 else 0.0,
        "vqa_acc_score": acc,
        "vqa_gt_prob": gt_prob,
        "vqa_pred_answer": answer,
    }


def short(text: Any) -> str:
    """A server's message on one line, at most ``MESSAGE_CHARS`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= MESSAGE_CHARS else line[: MESSAGE_CHARS - 3] + "..."


def server_message(response: Any) -> str:
    """The error message a server sent (OpenAI's ``{"error": {"message"}}`` or vLLM's
    ``{"message"}``), else the start of its body."""
    try:
        doc = response.json()
    except ValueError:
        return short(response.text)
    if isinstance(doc, dict):
        error = doc.get("error")
        if isinstance(error, dict) and error.get("message"):
            return short(error["message"])
        if isinstance(error, str):
            return short(error)
        if doc.get("message"):
            return short(doc["message"])
        if doc.get("detail"):
            return short(doc["detail"])
    return short(response.text)


def check_url(url: Any) -> str:
    """``url`` without a trailing slash; LeverError unless http(s) without credentials."""
    return check_server_url(url, "--vlm-url", KEY_VARIABLES[0])


def api_key() -> str | None:
    """The API key from the environment (``LEVER_VLM_API_KEY``, else ``OPENAI_API_KEY``)."""
    for name in KEY_VARIABLES:
        value = os.environ.get(name)
        if value:
            return value
    return None


# ----------------------------------------------------------------------------- environment
class OpenAIVLMEnvironment(Environment):
    """Judges with a VLM behind an OpenAI-compatible server (see the module docstring)."""

    name = NAME
    version = "0"
    optional_fields: tuple[str, ...] = ("vqa_gt_prob",)
    unavailable_fields: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.url = ""
        self.model = ""
        self.template = Template()
        self.max_tokens = 16
        self.timeout = 60.0
        self.max_image_bytes = 10 * 2**20
        self.concurrency = 8
        self.batch_size: int | None = self.concurrency
        self.logprobs = True
        self.leave_one_out = True
        self.items: dict[int, ManifestItem] = {}
        self.manifest_path = ""
        self.query_emb: Any = None
        self.cand_emb: Any = None
        self._images: OrderedDict[int, str] = OrderedDict()
        self._client: Any = None
        self._client_loop: Any = None
        #: verdicts of a call that failed transiently, for its retry
        self._answered: dict[tuple[int, tuple[int, ...]], dict[str, Any]] = {}

    # ------------------------------------------------------------------ set-up
    def configure(self, options: Mapping[str, Any]) -> None:
        """Read the options, the manifest, the template and the embedding table; set
        ``version``."""
        try:
            import httpx  # noqa: F401  (checked now: one line, before anything starts)
        except ImportError:
            raise LeverError(f"--judge {NAME} needs httpx: {INSTALL_HINT}") from None
        if not VLM_URL.of(options):
            raise LeverError(
                f"--judge {NAME}: name the server with --vlm-url (e.g. http://127.0.0.1:8000/v1)"
            )
        self.url = check_url(VLM_URL.of(options))
        model = VLM_MODEL.of(options)
        if not model:
            raise LeverError(f"--judge {NAME}: name the served model with --vlm-model")
        self.model = str(model)
        manifest = VLM_MANIFEST.of(options)
        if not manifest:
            raise LeverError(
                f"--judge {NAME}: give the items (images, questions, answers) with "
                "--vlm-manifest FILE.jsonl"
            )
        self.manifest_path = str(manifest)
        self.items = read_manifest(manifest)
        self.template = load_template(VLM_TEMPLATE.of(options))
        self.max_tokens = int(VLM_MAX_TOKENS.of(options) or 16)
        self.timeout = float(VLM_TIMEOUT.of(options) or 60.0)
        self.max_image_bytes = int(float(VLM_MAX_IMAGE_MB.of(options) or 10.0) * 2**20)
        self.concurrency = int(VLM_CONCURRENCY.of(options) or 8)
        self.batch_size = self.concurrency
        self.logprobs = not VLM_NO_LOGPROBS.of(options)
        self.leave_one_out = (VLM_ACCURACY.of(options) or "leave-one-out") == "leave-one-out"
        self._images.clear()
        self._answered.clear()
        self._client = self._client_loop = None  # new settings (timeout): a new client
        emb_path = IMG_EMB.of(options)
        never: list[str] = [] if self.logprobs else ["vqa_gt_prob"]
        if emb_path:
            emb = load_embeddings(emb_path, CAND_EMB.of(options), EMB_KEY.of(options))
            self.query_emb, self.cand_emb = emb.query, emb.cand
            self.optional_fields = ("vqa_gt_prob",)
        else:
            self.query_emb = self.cand_emb = None
            self.optional_fields = ("vqa_gt_prob", "vqa_rel_score")
            never.append("vqa_rel_score")
        self.unavailable_fields = tuple(never)
        self.version = self.digest(manifest)

    def settings(self) -> dict[str, Any]:
        """What decides a verdict besides the manifest and the embeddings (hashed)."""
        return {
            "model": self.model,
            "template": self.template.canonical(),
            "temperature": 0,
            "max_tokens": self.max_tokens,
            "logprobs": self.logprobs,
            "accuracy": "leave-one-out" if self.leave_one_out else "whole-set",
            "answer": ANSWER_RULE,
        }

    def digest(self, manifest: Any) -> str:
        """``version``: a short hash of :meth:`settings`, the manifest's bytes and the
        embedding tables."""
        h = hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode())
        with open(manifest, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        for table in (self.query_emb, self.cand_emb):
            if table is not None:
                h.update(str(tuple(table.shape)).encode())
                for start in range(0, int(table.shape[0]), HASH_ROWS):  # no copy of it all
                    h.update(table[start : start + HASH_ROWS].contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ one request
    def item(self, gid: int, role: str, query: int, seq: Sequence[int]) -> ManifestItem:
        found = self.items.get(int(gid))
        if found is None:
            raise LeverError(
                f"--vlm-manifest: {self.manifest_path} has no item {gid} (the {role} of "
                f"query {query}, sequence {list(seq)})"
            )
        return found

    def image_url(self, item: ManifestItem) -> str:
        """The item's image as a URL: the URL as written, or a base64 ``data:`` URL
        (cached); a local image over ``--vlm-max-image-mb`` is a LeverError."""
        if item.is_url:
            return item.image
        cached = self._images.get(item.id)
        if cached is not None:
            self._images.move_to_end(item.id)
            return cached
        data, mime = image_data(item)
        if len(data) > self.max_image_bytes:
            raise LeverError(
                f"--vlm-max-image-mb: image {item.image} of item {item.id} is "
                f"{len(data) / 2**20:.1f} MiB, over the limit of "
                f"{self.max_image_bytes / 2**20:g} MiB"
            )
        url = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
        self._images[item.id] = url
        if len(self._images) > IMAGE_CACHE:
            self._images.popitem(last=False)
        return url

    def request(self, query: int, seq: Sequence[int]) -> dict[str, Any]:
        """The body of the chat completion request for one pair."""
        q = self.item(query, "query", query, seq)
        if not q.answers:
            raise LeverError(
                f"--vlm-manifest: {self.manifest_path}:{q.line}: query {query} has no human "
                "answers, so no answer to it can be scored"
            )
        demos = [self.item(g, "demonstration", query, seq) for g in seq]
        body: dict[str, Any] = {
            "model": self.model,
            "messages": build_messages(self.template, demos, q, self.image_url),
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        if self.logprobs:
            body["logprobs"] = True
        return body

    def rel_score(self, query: int, seq: Sequence[int]) -> float | None:
        """Mean cosine similarity between the query's and each demonstration's embedding,
        clipped to [0, 1]; None without an embedding table."""
        if self.query_emb is None or self.cand_emb is None:
            return None
        rows_q, rows_c = int(self.query_emb.shape[0]), int(self.cand_emb.shape[0])
        if not 0 <= query < rows_q or any(not 0 <= g < rows_c for g in seq):
            raise LeverError(
                f"--img-emb: query {query} or a demonstration of {list(seq)} has no row in "
                f"the embedding table ({rows_q} query rows, {rows_c} candidate rows)"
            )
        qv = self.query_emb[query]
        total = 0.0
        for g in seq:
            cv = self.cand_emb[g]
            denom = float(qv.norm() * cv.norm())
            total += float(qv @ cv) / denom if denom > 0 else 0.0
        return min(1.0, max(0.0, total / max(len(seq), 1)))

    async def ask(self, client: Any, query: int, seq: Sequence[int]) -> dict[str, Any]:
        """The verdict of one pair from the server."""
        import httpx

        body = self.request(query, seq)
        where = f"query {query} sequence {list(seq)}"
        try:
            response = await client.post(f"{self.url}/chat/completions", json=body)
        except httpx.TimeoutException:
            raise TransientJudgeError(
                f"{where}: {self.url} gave no answer within {self.timeout:g} s (--vlm-timeout)"
            ) from None
        except httpx.TransportError as exc:
            raise TransientJudgeError(
                f"{where}: cannot reach {self.url} ({type(exc).__name__}: {short(exc)})"
            ) from None
        except httpx.HTTPError as exc:  # e.g. a body that cannot be decoded
            raise PermanentJudgeError(
                f"{where}: {self.url}: {type(exc).__name__}: {short(exc)}"
            ) from None
        code = int(response.status_code)
        if code in (408, 429) or code >= 500:
            raise TransientJudgeError(
                f"{where}: {self.url} answered HTTP {code}: {server_message(response)}"
            )
        if code in (401, 403):
            given = "the key in" if api_key() else "no key: set"
            raise LeverError(
                f"{self.url} refused the request (HTTP {code}, {given} "
                f"{' or '.join(KEY_VARIABLES)}): {server_message(response)}"
            )
        if code >= 400 or code < 200:
            raise PermanentJudgeError(
                f"{where}: {self.url} refused the request (HTTP {code}): {server_message(response)}"
            )
        content, tokens = self.parse(response, where)
        q = self.items[int(query)]
        verdict = score(content, q.answers, tokens, self.leave_one_out)
        verdict["vqa_rel_score"] = self.rel_score(query, seq)
        return verdict

    def parse(self, response: Any, where: str) -> tuple[str, list[Any] | None]:
        """The completion's text and its token log-probabilities (None when absent);
        PermanentJudgeError when the answer is not a chat completion."""
        try:
            doc = response.json()
        except ValueError:
            raise PermanentJudgeError(
                f"{where}: {self.url} answered something that is not JSON: "
                f"{short(response.text[:80])!r}"
            ) from None
        choices = doc.get("choices") if isinstance(doc, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise PermanentJudgeError(
                f"{where}: {self.url} answered JSON without choices (not a chat completion): "
                f"{short(json.dumps(doc)[:80])}"
            )
        message = choices[0].get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if content is None:
            content = ""  # a model that said nothing: an empty answer, scored 0
        if isinstance(content, list):  # content parts
            content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise PermanentJudgeError(
                f"{where}: {self.url} answered a message content of type "
                f"{type(content).__name__}, expected text"
            )
        logprobs = choices[0].get("logprobs")
        tokens = logprobs.get("content") if isinstance(logprobs, dict) else None
        if not self.logprobs or not isinstance(tokens, list):
            return content, None
        return content, tokens

    # ------------------------------------------------------------------ judging
    async def judge(  # type: ignore[override]
        self, query_ids: Sequence[int], sequences: Sequence[Sequence[int]]
    ) -> list[dict[str, Any]]:
        """The verdicts of every pair: one request each, up to ``--vlm-concurrency`` at
        once. A transient failure lets the other requests finish and keeps their
        verdicts for the retry of the call (only the failed pairs are asked again), then
        is raised for the judge driver to retry; any other failure cancels the rest and
        is raised at once."""
        if not self.url:
            raise LeverError(f"--judge {NAME}: the environment was not configured")
        client = self.client()
        gate = asyncio.Semaphore(max(1, self.concurrency))
        keys = [
            (int(q), tuple(int(g) for g in s)) for q, s in zip(query_ids, sequences, strict=True)
        ]

        async def one(key: tuple[int, tuple[int, ...]]) -> dict[str, Any]:
            kept = self._answered.get(key)
            if kept is not None:
                return kept
            async with gate:
                verdict = await self.ask(client, key[0], list(key[1]))
            if len(self._answered) >= ANSWERED_KEPT:
                self._answered.clear()
            self._answered[key] = verdict
            return verdict

        tasks = [asyncio.ensure_future(one(key)) for key in keys]
        try:
            transient: BaseException | None = None
            pending: set[asyncio.Future[dict[str, Any]]] = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    error = task.exception()
                    if error is None:
                        continue
                    if not isinstance(error, TransientJudgeError):
                        raise error
                    transient = transient or error
            if transient is not None:
                raise transient
            for key in keys:
                self._answered.pop(key, None)
            return [task.result() for task in tasks]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def client(self) -> Any:
        """The HTTP client of the running event loop, made once per loop: the judge
        driver keeps one loop for the whole run, so connections (and TLS sessions) are
        kept alive from one call to the next."""
        import httpx

        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            key = api_key()
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            # no connection limit of its own: each call bounds its requests
            # (--vlm-concurrency) and the driver bounds the calls (--judge-concurrency)
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
            self._client = httpx.AsyncClient(timeout=self.timeout, headers=headers, limits=limits)
            self._client_loop = loop
        return self._client


_ENV = OpenAIVLMEnvironment()


@hookimpl
def about() -> About:
    """What ``lever-train plugins`` shows of this plugin."""
    return About(
        description=f"environment `{NAME}`: a vision-language model behind an "
        "OpenAI-compatible server (vLLM, SGLang, OpenAI) judges with VQA accuracy",
        enabled_by_default=True,
    )


@hookimpl
def environments() -> Mapping[str, Environment]:
    """The OpenAI-compatible VLM judge."""
    return {NAME: _ENV}


#: The commands that take this plugin's options.
_COMMANDS = ("train", "evaluate", "serve-judge", "collect")


VLM_URL = Option(
    ("--vlm-url",),
    "str",
    None,
    f"{NAME}: the server's OpenAI API base URL (e.g. http://127.0.0.1:8000/v1).",
    metavar="URL",
    commands=_COMMANDS,
)
VLM_MODEL = Option(
    ("--vlm-model",),
    "str",
    None,
    f"{NAME}: the model name the server serves (the request's model field).",
    metavar="NAME",
    commands=_COMMANDS,
)
VLM_MANIFEST = Option(
    ("--vlm-manifest",),
    "path",
    None,
    f"{NAME}: the dataset manifest (JSON Lines: id, image, question, answers).",
    path_kind="file",
    metavar="FILE",
    commands=_COMMANDS,
)
VLM_TEMPLATE = Option(
    ("--vlm-template",),
    "path",
    None,
    f"{NAME}: prompt template (TOML: system, instruction, demonstration, query); "
    "default: the short-answer VQA layout.",
    path_kind="file",
    metavar="FILE",
    commands=_COMMANDS,
)
VLM_MAX_TOKENS = Option(
    ("--vlm-max-tokens",),
    "int",
    16,
    f"{NAME}: most tokens of an answer (the request's max_tokens).",
    min=1,
    commands=_COMMANDS,
)
VLM_TIMEOUT = Option(
    ("--vlm-timeout",),
    "float",
    60.0,
    f"{NAME}: seconds one request may take (then asked again, --judge-retries).",
    min=0.0,
    min_open=True,
    metavar="SECONDS",
    commands=_COMMANDS,
)
VLM_MAX_IMAGE_MB = Option(
    ("--vlm-max-image-mb",),
    "float",
    10.0,
    f"{NAME}: largest local image sent, in MiB; a larger one stops the run.",
    min=0.0,
    min_open=True,
    commands=_COMMANDS,
)
VLM_CONCURRENCY = Option(
    ("--vlm-concurrency",),
    "int",
    8,
    f"{NAME}: requests in flight per judge call (also the pairs per call).",
    min=1,
    commands=_COMMANDS,
)
VLM_ACCURACY = Option(
    ("--vlm-accuracy",),
    "choice",
    "leave-one-out",
    f"{NAME}: VQA accuracy averaged over the leave-one-out subsets of the human "
    "answers (as the VQAv2 evaluation) or over the whole set once.",
    choices=("leave-one-out", "whole-set"),
    commands=_COMMANDS,
)
VLM_NO_LOGPROBS = Option(
    ("--vlm-no-logprobs",),
    "bool",
    False,
    f"{NAME}: do not ask for log-probabilities (for a server that refuses them); "
    "vqa_gt_prob is then unavailable.",
    commands=_COMMANDS,
)


@hookimpl
def add_options() -> Sequence[Option]:
    """The server, the model, the items and how they are asked."""
    return [
        VLM_URL,
        VLM_MODEL,
        VLM_MANIFEST,
        VLM_TEMPLATE,
        VLM_MAX_TOKENS,
        VLM_TIMEOUT,
        VLM_MAX_IMAGE_MB,
        VLM_CONCURRENCY,
        VLM_ACCURACY,
        VLM_NO_LOGPROBS,
    ]

"""VQA answer normalisation and accuracy, the way the VQAv2 evaluation scores an answer.

Pure Python, no dependency: the ``openai-vlm`` environment scores a model's answer with
it, and anyone can score answers the same way (``from lever_trainer.vqa_eval import
vqa_accuracy``). docs/vlm-judge.md describes the rules in prose.

Normalisation (:func:`normalize_answer`), in this order:

1. newlines and tabs become spaces; the text is stripped;
2. punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted
   where it touches a space (``"a , b"``) or where the text holds a digit-comma-digit
   group (``"1,000"`` -> ``"1000"``); otherwise it becomes a space (``"black/white"`` ->
   ``"black white"``). Then a period not followed by a digit is deleted (``"3.5"``
   keeps its period, ``"dog."`` loses it). The apostrophe is kept;
3. lower case; words are split on white space;
4. the number words ``none``, ``zero``, ``one`` ... ``ten`` become digits;
5. the articles ``a``, ``an``, ``the`` are removed;
6. a contraction written without one of its apostrophes gets it back (``dont`` ->
   ``don't``, ``couldnt've`` -> ``couldn't've``), from the table built below.

Accuracy (:func:`vqa_accuracy`): with ``m`` the number of human answers equal to the
normalised prediction, an answer earns ``min(m / 3, 1)``: three humans agreeing make it
fully right. The VQAv2 evaluation averages that over the leave-one-out subsets (each
human's answer left out in turn, ``m`` counted among the others): ``leave_one_out=True``,
the default. ``leave_one_out=False`` scores the whole set once. Both are exact for ten
answers, the VQAv2 case; an item with fewer than three answers cannot reach 1 under
either rule, so it is scored by exact match (1 when the prediction equals one of its
answers) — see :func:`vqa_accuracy`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

#: Characters the punctuation step deletes or turns into a space.
PUNCTUATION: tuple[str, ...] = tuple(';/[]"{}()=+\\_-><@`,?!')
#: Number words and the digits they become.
NUMBER_WORDS = {
    word: str(i)
    for i, word in enumerate(
        ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
    )
}
NUMBER_WORDS["none"] = "0"
#: Words removed from an answer.
ARTICLES = frozenset({"a", "an", "the"})

# The contractions the evaluation restores, in their proper spelling. A contraction
# whose apostrophe-less spelling is an ordinary word ("we'd" / "wed", "it's" / "its",
# "she'll" / "shell", "i'd" / "id") is left out, as the VQA evaluation leaves it out, so
# that such a word is never rewritten; a longer form built on it ("we'd've") stays in.
_PROPER_CONTRACTIONS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've
hasn't haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am
mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at
shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll somebody's
someone'd someone'd've someone'll someone's something'd something'd've something'll
that's there'd there'd've there're there's they'd they'd've they'll they're they've
'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd
where's where've who'd who'd've who'll who's who've why'll why're why's won't would've
wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()


def _contraction_table(proper: Iterable[str]) -> dict[str, str]:
    """``{spelling with one apostrophe dropped: proper spelling}`` for every proper
    spelling: ``don't`` gives ``dont``; ``couldn't've`` gives ``couldnt've`` and
    ``couldn'tve`` (each of its apostrophes dropped in turn)."""
    table: dict[str, str] = {}
    for word in proper:
        for i, ch in enumerate(word):
            if ch == "'":
                table[word[:i] + word[i + 1 :]] = word
    return table


#: Misspelt contraction -> proper spelling (built from ``_PROPER_CONTRACTIONS``).
CONTRACTIONS = _contraction_table(_PROPER_CONTRACTIONS)

_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def strip_punctuation(text: str) -> str:
    """Step 2 of the normalisation (see the module docstring)."""
    number_with_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if touches_space or number_with_comma else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def normalize_answer(text: str) -> str:
    """An answer in the form the VQA evaluation compares (see the module docstring)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    words = []
    for word in strip_punctuation(text).lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


#: Human answers an item needs for the ``min(m / 3, 1)`` rule; fewer: exact match.
MIN_ANSWERS_FOR_VQA_RULE = 3


def vqa_accuracy(prediction: str, answers: Sequence[str], *, leave_one_out: bool = True) -> float:
    """The VQA accuracy of ``prediction`` against the human ``answers`` (both normalised
    here), in [0, 1].

    ``leave_one_out=True`` (the VQAv2 evaluation): the mean over ``i`` of
    ``min(m_i / 3, 1)``, ``m_i`` the answers other than the ``i``-th equal to the
    prediction. ``False``: ``min(m / 3, 1)`` over all answers. An item with fewer than
    three answers scores 1 when the prediction equals one of them, else 0 (neither rule
    can give it full credit); an item with no answer scores 0."""
    if not answers:
        return 0.0
    pred = normalize_answer(prediction)
    humans = [normalize_answer(a) for a in answers]
    m = sum(1 for h in humans if h == pred)
    if len(humans) < MIN_ANSWERS_FOR_VQA_RULE:
        return 1.0 if m else 0.0
    if not leave_one_out:
        return min(m / 3.0, 1.0)
    # leaving out a matching answer leaves m - 1 matches; leaving out another leaves m
    n = len(humans)
    return (m * min((m - 1) / 3.0, 1.0) + (n - m) * min(m / 3.0, 1.0)) / n


def most_common_answer(answers: Sequence[str]) -> str:
    """The answer most humans gave (compared normalised; the first given wins a tie),
    as first written: what a demonstration shows as its answer. ``""`` when none."""
    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    for a in answers:
        key = normalize_answer(a)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, a.strip())
    if not counts:
        return ""
    best = max(counts, key=lambda k: counts[k])  # max keeps the first of equal counts
    return first[best]


__all__ = [
    "ARTICLES",
    "CONTRACTIONS",
    "NUMBER_WORDS",
    "PUNCTUATION",
    "most_common_answer",
    "normalize_answer",
    "strip_punctuation",
    "vqa_accuracy",
]

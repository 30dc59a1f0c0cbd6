"""VQA answer normalisation and accuracy (lever_trainer.vqa_eval), against cases worked
out by hand from the rules in the module docstring."""

from __future__ import annotations

import pytest

from lever_trainer.vqa_eval import (
    CONTRACTIONS,
    most_common_answer,
    normalize_answer,
    strip_punctuation,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # period not before a digit deleted; number word -> digit; lower case
        ("Two dogs.", "2 dogs"),
        # a digit-comma-digit group: every punctuation mark is deleted, not spaced
        ("1,000", "1000"),
        ("1,000 - 2", "1000 2"),
        # a mark touching no space becomes a space
        ("black/white", "black white"),
        ("x-ray", "x ray"),
        # "," touches a space (deleted); "-" does not (a space)
        ("well-known, yes", "well known yes"),
        # "," deleted, then "a" is an article
        ("a , b", "b"),
        # a period before a digit stays
        ("3.5", "3.5"),
        ("Yes!", "yes"),
        # articles removed, number words, tabs and newlines
        ("\tAn apple\n", "apple"),
        ("The Cat", "cat"),
        ("None", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),
        # contractions restored; an apostrophe is not punctuation
        ("dont", "don't"),
        ("don't", "don't"),
        ("couldnt've", "couldn't've"),
        ("couldn'tve", "couldn't've"),
        ("Whats that", "what's that"),
        # ordinary words that look like contractions stay
        ("wed", "wed"),
        ("its", "its"),
        ("shell", "shell"),
        ("", ""),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_strip_punctuation_keeps_apostrophes_and_spaces_marks() -> None:
    # "(" and ")" touch no space -> spaces; "'" is not punctuation
    assert strip_punctuation("it's(red)") == "it's red "


def test_contraction_table_from_the_rule() -> None:
    # one apostrophe dropped in each possible place
    assert (
        CONTRACTIONS["ow's'at"] == CONTRACTIONS["'ows'at"] == CONTRACTIONS["'ow'sat"] == "'ow's'at"
    )
    assert CONTRACTIONS["yall'll"] == CONTRACTIONS["y'allll"] == "y'all'll"
    assert CONTRACTIONS["twas"] == "'twas"
    assert CONTRACTIONS["oclock"] == "o'clock"
    # every key is its value with exactly one apostrophe fewer
    for key, proper in CONTRACTIONS.items():
        assert key.count("'") == proper.count("'") - 1
        assert any(proper[:i] + proper[i + 1 :] == key for i, c in enumerate(proper) if c == "'")
    for word in ("wed", "its", "id", "ill", "well", "were", "shell", "hell", "lets", "shes"):
        assert word not in CONTRACTIONS


def _leave_one_out_by_hand(pred: str, answers: list[str]) -> float:
    """The VQAv2 rule spelt out: each answer left out in turn."""
    p = normalize_answer(pred)
    norm = [normalize_answer(a) for a in answers]
    accs = []
    for i in range(len(norm)):
        others = norm[:i] + norm[i + 1 :]
        accs.append(min(sum(o == p for o in others) / 3, 1.0))
    return sum(accs) / len(accs)


@pytest.mark.parametrize(
    ("matches", "loo", "simple"),
    [
        # m = 0: no credit
        (0, 0.0, 0.0),
        # m = 1: leaving the match out gives 0, the other 9 subsets 1/3: 9 * (1/3) / 10
        (1, 0.3, 1 / 3),
        # m = 2: 2 subsets with 1 match (1/3), 8 with 2 (2/3): (2/3 + 16/3) / 10
        (2, 0.6, 2 / 3),
        # m = 3: 3 subsets with 2 matches (2/3), 7 with 3 (1): (2 + 7) / 10
        (3, 0.9, 1.0),
        # m = 4: every subset keeps at least 3 matches
        (4, 1.0, 1.0),
        (10, 1.0, 1.0),
    ],
)
def test_accuracy_ten_answers(matches: int, loo: float, simple: float) -> None:
    answers = ["Two"] * matches + ["three"] * (10 - matches)
    assert vqa_accuracy("2", answers) == pytest.approx(loo)
    assert vqa_accuracy("2", answers, leave_one_out=False) == pytest.approx(simple)
    assert vqa_accuracy("2", answers) == pytest.approx(_leave_one_out_by_hand("2", answers))


def test_accuracy_normalises_both_sides() -> None:
    answers = ["the dog", "Dog", "dog.", "cat", "cat", "cat", "cat", "cat", "cat", "cat"]
    # "A dog!" -> "dog"; three humans said "dog" once normalised
    assert vqa_accuracy("A dog!", answers) == pytest.approx(0.9)
    assert vqa_accuracy("A dog!", answers, leave_one_out=False) == 1.0


def test_accuracy_few_answers_is_exact_match() -> None:
    assert vqa_accuracy("Cat.", ["cat"]) == 1.0
    assert vqa_accuracy("bird", ["cat", "dog"]) == 0.0
    assert vqa_accuracy("dog", ["cat", "dog"], leave_one_out=False) == 1.0
    assert vqa_accuracy("dog", []) == 0.0


def test_empty_answer_scores_zero_unless_humans_gave_none() -> None:
    assert vqa_accuracy("", ["cat"] * 10) == 0.0


def test_most_common_answer() -> None:
    assert most_common_answer(["Dog", "cat", "the dog", "cat", "dog"]) == "Dog"
    # a tie: the first given wins
    assert most_common_answer(["red", "blue"]) == "red"
    assert most_common_answer([]) == ""

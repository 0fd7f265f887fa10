"""Official VQA normalisation and accuracy: hand-computed cases for every tricky rule."""

from __future__ import annotations

import math
import random

import pytest

from qvlm_harness.metrics.vqa import (
    CONTRACTIONS,
    NUMBER_MAP,
    aggregate_vqa,
    normalize_answer,
    said_unanswerable,
    unanswerable_precision_recall,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # number words -> digits (the reference "manual map", which also maps "none")
        ("two", "2"),
        ("Two dogs", "2 dogs"),
        ("ten", "10"),
        ("none", "0"),
        ("eleven", "eleven"),  # only zero..ten are mapped
        # articles dropped
        ("a dog", "dog"),
        ("The dog", "dog"),
        ("an apple", "apple"),
        # contractions restored
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("whats", "what's"),
        ("wont", "won't"),
        ("don't", "don't"),
        # commas: deleted, so digit groups join and words separate cleanly
        ("1,000", "1000"),
        ("10,000, yes", "10000 yes"),
        ("red, white", "red white"),
        # periods: removed unless followed by a digit
        ("2.5", "2.5"),
        ("yes.", "yes"),
        ("5.", "5"),
        (".5", ".5"),
        ("e.g.", "eg"),
        # other punctuation: deleted when it touches a space, otherwise replaced by a space
        ("black-and-white", "black and white"),
        ("t - shirt", "t shirt"),
        ("Yes!", "yes"),
        ("(yes)", "yes"),
        ("what?", "what"),
        # case, whitespace, newline, tab
        ("  YES  ", "yes"),
        ("\tYes\n", "yes"),
        ("left\nside", "left side"),
        ("unanswerable", "unanswerable"),
        ("", ""),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("a dog", "dog"),
        ("dont", "don't"),
        ("two", "2"),
        ("Yes.", "yes"),
        ("1,000", "1000"),
        ("black-and-white", "black and white"),
        ("The Three", "3"),
    ],
)
def test_normalisation_makes_equal(a: str, b: str) -> None:
    assert normalize_answer(a) == normalize_answer(b)


def test_reference_quirks_are_kept() -> None:
    # The reference splits "'s" off before mapping contractions, so these two stay different; pinned so that
    # nobody "fixes" it and silently changes scores relative to published numbers.
    assert normalize_answer("what's") == "what 's"
    assert normalize_answer("whats") == "what's"
    assert normalize_answer("man's") == "man 's"
    # The period substitution is capped at 32 replacements (re.UNICODE passed as `count` in the reference).
    assert normalize_answer("." * 40) == "." * 8
    # Keys written with capitals in the reference can never match lower-cased text.
    assert normalize_answer("Im") == "im"


def test_contraction_map_is_complete() -> None:
    assert len(CONTRACTIONS) == 120
    for key, value in {
        "aint": "ain't",
        "isnt": "isn't",
        "whats": "what's",
        "yall'd've": "y'all'd've",
        "oclock": "o'clock",
        "somebody'd": "somebodyd",
        "youve": "you've",
    }.items():
        assert CONTRACTIONS[key] == value
    assert all("\u2019" not in v for v in CONTRACTIONS.values())  # ASCII apostrophes, not curly quotes
    assert set(NUMBER_MAP) == {
        "none",
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
    }


# Leave-one-out by hand for 10 answers of which m equal the prediction:
#   an annotator whose answer matches sees m-1 matches among the other 9, one whose answer differs sees m.
#   m=1: 1 * min(1, 0/3) + 9 * min(1, 1/3) = 0 + 3        -> 3/10 = 0.3
#   m=2: 2 * min(1, 1/3) + 8 * min(1, 2/3) = 2/3 + 16/3   -> 6/10 = 0.6
#   m=3: 3 * min(1, 2/3) + 7 * min(1, 3/3) = 2 + 7        -> 9/10 = 0.9
#   m=4: 4 * min(1, 3/3) + 6 * min(1, 4/3) = 4 + 6        -> 10/10 = 1.0
@pytest.mark.parametrize(
    ("n_match", "expected"),
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (5, 1.0), (9, 1.0), (10, 1.0)],
)
def test_partial_agreement_exact(n_match: int, expected: float) -> None:
    gts = ["cat"] * n_match + ["dog"] * (10 - n_match)
    assert vqa_accuracy("cat", gts) == expected  # exact, not approx


def test_ground_truths_are_normalised_too() -> None:
    gts = ["Two", "two.", "2"] + ["3"] * 7
    assert vqa_accuracy("2", gts) == 0.9
    assert vqa_accuracy("The two", ["2"] * 10) == 1.0
    assert vqa_accuracy("dont", ["don't"] * 2 + ["no"] * 8) == 0.6


def _literal_leave_one_out(prediction: str, gt_answers: list[str]) -> float:
    """The formula as written: for each annotator, count matches among the others."""
    pred = normalize_answer(prediction)
    gts = [normalize_answer(g) for g in gt_answers]
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1 :]
        accs.append(min(1.0, sum(o == pred for o in others) / 3.0))
    return sum(accs) / len(accs)


def test_matches_brute_force_on_random_lists() -> None:
    rng = random.Random(0)
    vocab = ["yes", "no", "Yes.", "2", "two", "a dog", "dog", "red", "unanswerable"]
    for _ in range(500):
        gts = [rng.choice(vocab) for _ in range(rng.randint(2, 12))]
        pred = rng.choice(vocab)
        assert vqa_accuracy(pred, gts) == pytest.approx(_literal_leave_one_out(pred, gts), abs=1e-12)


def test_fewer_than_ten_answers() -> None:
    # A single answer: leave-one-out would always give 0, so exact match is used instead.
    assert vqa_accuracy("Red.", ["red"]) == 1.0
    assert vqa_accuracy("blue", ["red"]) == 0.0
    # Three agreeing answers: each annotator sees 2 matches among the others -> 2/3 (the cap for n=3).
    assert vqa_accuracy("red", ["red", "red", "red"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        vqa_accuracy("red", [])
    with pytest.raises(TypeError):
        vqa_accuracy("red", "red")  # type: ignore[arg-type]


def test_unanswerable() -> None:
    gts = ["unanswerable"] * 5 + ["unsuitable"] * 5
    assert vqa_accuracy("Unanswerable.", gts) == 1.0
    assert vqa_accuracy("Unanswerable", ["unanswerable"] * 2 + ["blue"] * 8) == 0.6
    assert said_unanswerable("Unanswerable.")
    assert not said_unanswerable("It is unanswerable because the image is blurry")


def test_aggregate_vqa() -> None:
    records = [
        {"accuracy": 1.0, "answer_type": "yes/no"},
        {"accuracy": 0.0, "answer_type": "yes/no"},
        {"accuracy": 0.6, "answer_type": "number"},
        {"prediction": "cat", "gt_answers": ["cat"] * 3 + ["dog"] * 7, "answer_type": "other"},  # 0.9
        {"accuracy": 0.3, "answer_type": "unanswerable"},
    ]
    out = aggregate_vqa(records)
    assert out["acc"] == pytest.approx(100 * (1.0 + 0.0 + 0.6 + 0.9 + 0.3) / 5)  # 56.0
    assert out["n_acc"] == 5
    assert out["yes/no"] == pytest.approx(50.0) and out["n_yes/no"] == 2
    assert out["number"] == pytest.approx(60.0) and out["n_number"] == 1
    assert out["other"] == pytest.approx(90.0) and out["n_other"] == 1
    assert out["unanswerable"] == pytest.approx(30.0) and out["n_unanswerable"] == 1


def test_aggregate_vqa_missing_types_are_nan() -> None:
    out = aggregate_vqa([{"accuracy": 1.0, "answer_type": "yes/no"}, {"accuracy": 0.5}])
    assert out["acc"] == pytest.approx(75.0)
    assert out["yes/no"] == 100.0 and out["n_yes/no"] == 1
    assert math.isnan(out["number"]) and out["n_number"] == 0
    assert "unanswerable" not in out
    empty = aggregate_vqa([])
    assert math.isnan(empty["acc"]) and empty["n_acc"] == 0
    with pytest.raises(KeyError):
        aggregate_vqa([{"answer_type": "other"}])


def test_unanswerable_precision_recall() -> None:
    pred = [True, True, True, False, False, False]
    gold = [True, True, False, True, False, False]
    out = unanswerable_precision_recall(pred, gold)
    # tp = 2, fp = 1, fn = 1 -> precision 2/3, recall 2/3, f1 2/3
    assert (out["tp"], out["fp"], out["fn"]) == (2, 1, 1)
    assert out["precision"] == pytest.approx(200 / 3)
    assert out["recall"] == pytest.approx(200 / 3)
    assert out["f1"] == pytest.approx(200 / 3)
    assert not out["precision_undefined"] and not out["recall_undefined"]


def test_unanswerable_precision_undefined_when_never_predicted() -> None:
    out = unanswerable_precision_recall([False, False, False], [True, False, True])
    assert out["precision"] == 0.0 and out["precision_undefined"] is True
    assert out["recall"] == 0.0 and out["recall_undefined"] is False
    assert out["f1"] == 0.0 and out["n_predicted"] == 0 and out["n_gold"] == 2
    out = unanswerable_precision_recall([True, False], [False, False])
    assert out["precision"] == 0.0 and out["precision_undefined"] is False
    assert out["recall_undefined"] is True
    with pytest.raises(ValueError):
        unanswerable_precision_recall([True], [True, False])

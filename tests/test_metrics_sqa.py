"""ScienceQA answer parsing (deterministic, no guessing) and the category arithmetic."""

from __future__ import annotations

import math

import pytest

from qvlm_harness.metrics.sqa import SQA_KEYS, aggregate_sqa, parse_answer, parse_option_letter, sqa_categories


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        # bare letters; upper case must work (lmms-eval #427 lower-cased first and lost all of these)
        ("B", 1),
        ("B.", 1),
        ("(B)", 1),
        ("  C  ", 2),
        ("**D**", 3),
        # a lone lower-case letter is still clearly a letter answer
        ("b", 1),
        ("(b)", 1),
        ("a", 0),
        # leading labels
        ("B) Europe", 1),
        ("B. Europe", 1),
        ("(B) Europe", 1),
        ("B\nEurope", 1),
        # the first standalone label at the start is the answer; the rest is continuation
        ("A. Europe\n\nThe correct answer is B.", 0),
        # explicit phrases
        ("The answer is B.", 1),
        ("The answer is B", 1),
        ("Answer: B", 1),
        ("The correct answer is option (C).", 2),
        ("The correct option is D", 3),
        ("C is the correct answer.", 2),
        ("I think the answer is B.", 1),
        ("Option A is wrong, so the answer is B.", 1),
        # English words "A" / "I" are not options
        ("A cat is on the mat", None),
        ("I think so", None),
        ("The answer is A dog", None),
        # lower-case letters inside sentences are not read as options
        ("the answer is b", None),
        ("a cat", None),
        # no guessing: free-text mentions, conflicts, empty output
        ("Vitamin C helps", None),
        ("It could be A or B", None),
        ("The answer is B. No, the answer is C.", None),
        ("", None),
        ("   \n", None),
        # letters beyond the number of options
        ("E", None),
        ("E. Europe", None),
        ("The answer is E.", None),
    ],
)
def test_parse_option_letter(output: str, expected: int | None) -> None:
    assert parse_option_letter(output, 4) == expected


def test_parse_option_letter_respects_n_options() -> None:
    assert parse_option_letter("C", 3) == 2
    assert parse_option_letter("C", 2) is None
    assert parse_option_letter("E", 5) == 4
    with pytest.raises(ValueError):
        parse_option_letter("A", 0)


def test_parse_is_deterministic() -> None:
    outputs = ["???", "maybe", "B", "The answer is B."]
    first = [parse_option_letter(o, 4) for o in outputs]
    assert all([parse_option_letter(o, 4) for o in outputs] == first for _ in range(20))
    assert first == [None, None, 1, 1]


def test_parse_answer_with_option_text() -> None:
    options = ["Asia", "Europe", "Africa"]
    assert parse_answer("Europe", options) == 1
    assert parse_answer("  europe. ", options) == 1
    assert parse_answer("B", options) == 1
    assert parse_answer("A. Europe", options) == 0  # the letter is what the prompt asks for
    assert parse_answer("It is in Europe", options) is None  # not an exact match
    assert parse_answer("D", options) is None
    assert parse_answer("same", ["same", "same"]) is None  # ambiguous


ROWS = {
    # subject, hint, image, grade -> expected categories
    "nat_txt_img_g3": (
        {"subject": "natural science", "hint": "Read the text.", "image": "image.png", "grade": "grade3"},
        ["NAT", "TXT", "IMG", "G1-6"],
    ),
    "soc_none_g8": (
        {"subject": "social science", "hint": "", "image": None, "grade": "grade8"},
        ["SOC", "NO", "G7-12"],
    ),
    "lan_txt_g12": (
        {"subject": "language science", "hint": "Some context", "image": "", "grade": "grade12"},
        ["LAN", "TXT", "G7-12"],
    ),
    "nat_img_g6": (
        {"subject": "natural science", "hint": "", "image": "x.png", "grade": "grade6"},
        ["NAT", "IMG", "G1-6"],
    ),
    "missing_hint_key": (
        {"subject": "social science", "image": None, "grade": "grade1"},
        ["SOC", "NO", "G1-6"],
    ),
}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_sqa_categories(name: str) -> None:
    problem, expected = ROWS[name]
    assert sqa_categories(problem) == expected


def _rec(subject: str, hint: str, image: str | None, grade: str, correct: bool, parsed: bool = True) -> dict:
    return {
        "subject": subject,
        "hint": hint,
        "image": image,
        "grade": grade,
        "correct": correct,
        "parsed": parsed,
    }


def test_aggregate_sqa_hand_computed() -> None:
    records = [
        _rec("natural science", "ctx", "i.png", "grade2", True),  # NAT TXT IMG G1-6
        _rec("natural science", "", "i.png", "grade9", False),  # NAT IMG G7-12
        _rec("social science", "", None, "grade4", True),  # SOC NO G1-6
        _rec("social science", "ctx", None, "grade10", True),  # SOC TXT G7-12
        _rec("language science", "", None, "grade5", False, parsed=False),  # LAN NO G1-6
        _rec("natural science", "", None, "grade7", True),  # NAT NO G7-12
    ]
    out = aggregate_sqa(records)
    # correct: 1, 3, 4, 6 -> 4/6
    assert out["acc"] == pytest.approx(400 / 6) and out["n_acc"] == 6
    assert out["NAT"] == pytest.approx(200 / 3) and out["n_NAT"] == 3  # records 1, 2, 6: 2 correct
    assert out["SOC"] == pytest.approx(100.0) and out["n_SOC"] == 2  # 3, 4
    assert out["LAN"] == pytest.approx(0.0) and out["n_LAN"] == 1  # 5
    assert out["TXT"] == pytest.approx(100.0) and out["n_TXT"] == 2  # 1, 4
    assert out["IMG"] == pytest.approx(50.0) and out["n_IMG"] == 2  # 1, 2
    assert out["NO"] == pytest.approx(200 / 3) and out["n_NO"] == 3  # 3, 5, 6
    assert out["G1-6"] == pytest.approx(200 / 3) and out["n_G1-6"] == 3  # 1, 3, 5
    assert out["G7-12"] == pytest.approx(200 / 3) and out["n_G7-12"] == 3  # 2, 4, 6
    assert out["parse_fail"] == pytest.approx(100 / 6) and out["n_parse_fail"] == 1
    # TXT and IMG overlap (record 1) so the context counts add up to more than the total
    assert out["n_TXT"] + out["n_IMG"] + out["n_NO"] == 7
    assert set(SQA_KEYS) <= set(out)


def test_aggregate_sqa_empty_category_is_nan() -> None:
    out = aggregate_sqa([_rec("natural science", "", None, "grade1", True)])
    assert out["NAT"] == 100.0 and out["n_NAT"] == 1
    for key in ("SOC", "LAN", "TXT", "IMG", "G7-12"):
        assert math.isnan(out[key]) and out[f"n_{key}"] == 0
    assert out["parse_fail"] == 0.0
    assert math.isnan(aggregate_sqa([])["acc"])


def test_aggregate_sqa_rejects_guessed_answers() -> None:
    with pytest.raises(ValueError, match="not parsed"):
        aggregate_sqa([_rec("natural science", "", None, "grade1", correct=True, parsed=False)])

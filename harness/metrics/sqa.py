"""ScienceQA: deterministic answer parsing and the LLaVA/ScienceQA category breakdown.

Two bugs in peer evaluations motivate this module (see shared/reference/tasks.md):

- The Q-VLM / original LLaVA script replaced an unparseable answer with ``random.choice`` over the options,
  so the same outputs scored differently run to run and a broken model still scored ~1/n_options. Here an
  unparseable output is ``None``: it is counted as wrong and reported separately as ``parse_fail``.
- lmms-eval #427 lower-cased the output and then looked for upper-case letters, so "B" never matched.
  Here the output is never case-folded before letter matching; lower-case letters are accepted only where
  they cannot be an English word (the whole output is the letter, or it is parenthesised at the start).

Category arithmetic follows the official ScienceQA evaluation (lupantech/ScienceQA tools/evaluate_acc.py),
which LLaVA's tables use: subject NAT/SOC/LAN; context TXT = non-empty hint, IMG = has an image, NO = neither
(TXT and IMG overlap, so TXT + IMG + NO can exceed the total); grade G1-6 / G7-12; and the average over all.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "SQA_KEYS",
    "aggregate_sqa",
    "parse_answer",
    "parse_option_letter",
    "sqa_categories",
]

SUBJECTS: dict[str, str] = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
GRADES_1_6: frozenset[str] = frozenset(f"grade{i}" for i in range(1, 7))
GRADES_7_12: frozenset[str] = frozenset(f"grade{i}" for i in range(7, 13))
CATEGORY_KEYS: tuple[str, ...] = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")
SQA_KEYS: tuple[str, ...] = ("acc", *CATEGORY_KEYS)  # "acc" is the table's "Average"

_LETTERS = string.ascii_uppercase

# --- answer parsing -------------------------------------------------------------------------------------

# 1. The whole output is one letter, optionally "(B)", "B.", "B)", "B:" -- any case: nothing else was said,
#    so even "b" is unambiguous.
_WHOLE = re.compile(r"\(?([A-Za-z])\)?[.):]?")
# 2. The output *starts* with an option label: "B. Europe", "B) ...", "B: ...", "(B) ...", or "B" alone on
#    the first line. The label must be followed by a delimiter, so a sentence starting with the article "A"
#    ("A cat sits") or the pronoun "I" ("I think ...") is not read as an option.
_LEADING = re.compile(r"(?:\(([A-Za-z])\)[.:]?|([A-Z])[.):])(?=\s|$)|([A-Z])[ \t]*(?=\n)")
# 3. An explicit statement anywhere: "The answer is B.", "Answer: B", "the correct answer is option (C)",
#    "The correct option is D", "B is the correct answer". Upper-case letters only, and not followed by a
#    letter/digit/apostrophe, so words ("is a dog", "is Asia") never match.
_EXPLICIT = re.compile(
    r"\b(?i:(?P<kw>answer|option|choice))\b"
    r"(?P<conn>\s+(?i:is|would\s+be|should\s+be|will\s+be)|\s*[:=])?"
    r"\s*(?:(?i:option|choice)\s*)?\(?(?P<letter>[A-Z])\)?(?![\w'])"
)
_EXPLICIT_REVERSED = re.compile(
    r"(?<![\w'])\(?(?P<letter>[A-Z])\)?\s+(?i:is)\s+(?i:the\s+)?(?i:correct|right|best)\b"
)
_ARTICLE_OR_PRONOUN = re.compile(r"\s+[a-z]")  # what follows "A"/"I" when they are English words
_AMBIGUOUS = "ambiguous"


def _clean(output: str) -> str:
    """Drop markdown emphasis and surrounding quotes/whitespace that chat models wrap answers in."""
    return output.replace("**", "").strip().strip("`'\"*").strip()


def _explicit_letter(text: str) -> str | None:
    """The letter stated by explicit answer phrases; `_AMBIGUOUS` if they name different letters."""
    found: list[str] = []
    for m in _EXPLICIT.finditer(text):
        letter = m.group("letter")
        if m.group("kw").lower() != "answer" and m.group("conn") is None:
            continue  # "Option A is wrong" / "choice B" is a mention, not a statement of the answer
        bare = not m.group(0).endswith(")")
        if bare and letter in "AI" and _ARTICLE_OR_PRONOUN.match(text, m.end()):
            continue  # "the answer is A dog", "answer I think"
        found.append(letter)
    found += [m.group("letter") for m in _EXPLICIT_REVERSED.finditer(text)]
    if not found:
        return None
    return found[0] if len(set(found)) == 1 else _AMBIGUOUS


def parse_option_letter(output: str, n_options: int) -> int | None:
    """Index (0 = "A") of the option a model's output names, or None when it cannot be parsed.

    Rules, first applicable wins (never a guess, never random):

    1. the whole output is a letter, any case: "B", "b", "B.", "(B)";
    2. the output starts with a label: "B. Europe", "B) ...", "(B) ...", "B" alone on the first line.
       Hence "A. Europe\\n\\nThe correct answer is B." is A: the prompt asks for the letter directly, so the
       first thing the model emits is its answer and later text is a continuation (LLaVA's own script
       resolves this case the same way);
    3. explicit phrases anywhere: "The answer is B.", "Answer: B", "The correct option is (C)",
       "B is correct" -- upper-case letters only; if several phrases name different letters -> None.

    A rule that fires with a letter beyond the n_options-th ("E" with 4 options) gives None rather than
    falling through to a weaker rule. Letters mentioned only in free text ("Vitamin C helps") are not
    answers: returning them would be a guess.
    """
    if not 1 <= n_options <= len(_LETTERS):
        raise ValueError(f"n_options must be in 1..{len(_LETTERS)}, got {n_options}")
    text = _clean(output)
    if not text:
        return None
    letter: str | None = None
    if m := _WHOLE.fullmatch(text):
        letter = m.group(1).upper()
    elif m := _LEADING.match(text):
        letter = next(g for g in m.groups() if g is not None).upper()
    else:
        letter = _explicit_letter(text)
    if letter is None or letter == _AMBIGUOUS:
        return None
    index = _LETTERS.index(letter)
    return index if index < n_options else None


def _norm_option_text(text: str) -> str:
    return " ".join(_clean(text).casefold().split()).rstrip(".").strip()


def parse_answer(output: str, options: Sequence[str]) -> int | None:
    """Index of the chosen option: a parsed option letter, else an exact option-text match, else None.

    The letter is tried first because it is what the prompt asks for ("A. Asia" picks A even if option B is
    "Asia"). Otherwise the output must equal one option's text, ignoring case, surrounding whitespace and a
    final period ("europe." matches "Europe"); a match on two identical options is ambiguous -> None.
    """
    if isinstance(options, str):
        raise TypeError("options must be a sequence of option texts, not a single string")
    if not options:
        raise ValueError("parse_answer needs at least one option")
    index = parse_option_letter(output, len(options))
    if index is not None:
        return index
    target = _norm_option_text(output)
    if not target:
        return None
    hits = [i for i, opt in enumerate(options) if _norm_option_text(opt) == target]
    return hits[0] if len(hits) == 1 else None


# --- categories -----------------------------------------------------------------------------------------


def _has_image(image: Any) -> bool:
    """A path/file name, an image object or bytes counts; None and "" (problems.json null) do not."""
    if image is None:
        return False
    if isinstance(image, str | bytes):
        return len(image) > 0
    return True


def sqa_categories(problem: Mapping[str, Any]) -> list[str]:
    """Category keys (subset of NAT SOC LAN TXT IMG NO G1-6 G7-12) that a ScienceQA problem belongs to.

    Uses the problem's "subject", "hint", "image" and "grade". TXT is a non-empty hint and IMG an image, as
    in the official evaluation (so a problem with both is in TXT and IMG); NO is neither. Unknown subjects
    or grades contribute no key rather than raising, so a malformed record still counts in the average.
    """
    keys: list[str] = []
    subject = problem.get("subject")
    if isinstance(subject, str) and subject.strip().lower() in SUBJECTS:
        keys.append(SUBJECTS[subject.strip().lower()])
    hint = problem.get("hint")
    has_text = isinstance(hint, str) and hint != ""  # official: truthiness of the hint string
    has_image = _has_image(problem.get("image"))
    if has_text:
        keys.append("TXT")
    if has_image:
        keys.append("IMG")
    if not has_text and not has_image:
        keys.append("NO")
    grade = str(problem.get("grade", "")).strip().lower()
    if grade in GRADES_1_6:
        keys.append("G1-6")
    elif grade in GRADES_7_12:
        keys.append("G7-12")
    return keys


def aggregate_sqa(records: Iterable[Mapping[str, Any]]) -> dict[str, float | int]:
    """ScienceQA accuracy overall and per category, in percent, plus the parse-failure rate.

    Each record has "correct" (bool), "parsed" (bool) and the problem fields used by `sqa_categories`.
    Returns {"acc", "NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "parse_fail"} in percent and
    "n_<key>" = number of questions behind each accuracy; "n_parse_fail" is the number of unparsed outputs
    (its rate is over "n_acc"). A category with no questions is NaN, not 0: 0 would read as "all wrong".
    An unparsed output counts as wrong; a record with parsed=False and correct=True raises ValueError,
    because it means some caller guessed an answer for an unparseable output.
    """
    correct = {k: 0 for k in SQA_KEYS}
    count = {k: 0 for k in SQA_KEYS}
    n_fail = 0
    for rec in records:
        ok, parsed = bool(rec["correct"]), bool(rec["parsed"])
        if ok and not parsed:
            raise ValueError(
                "record is correct but not parsed: unparseable outputs must be scored as wrong, not guessed"
            )
        n_fail += not parsed
        for key in ("acc", *sqa_categories(rec)):
            count[key] += 1
            correct[key] += ok
    out: dict[str, float | int] = {}
    for key in SQA_KEYS:
        out[key] = 100.0 * correct[key] / count[key] if count[key] else math.nan
    out["parse_fail"] = 100.0 * n_fail / count["acc"] if count["acc"] else math.nan
    for key in SQA_KEYS:
        out[f"n_{key}"] = count[key]
    out["n_parse_fail"] = n_fail
    return out

"""The official per-question accuracy of VQAv2 (the VQA API) and of VizWiz (the VizWiz API), each its own.

Published LLaVA-style numbers are made in two steps, and the harness reproduces both:

1. *Submission*: the model's raw output goes through the EvalAI answer processor
   (`qvlm_harness.metrics.vqa.normalize_answer`); LLaVA-1.5's scripts/convert_vqav2_for_submission.py and
   convert_vizwiz_for_submission.py write exactly that into the answer file.
2. *Evaluation* of the submitted answer by the benchmark's own script, implemented here:
   - VQAv2: GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py, `VQAEval.evaluate` at a013f00
     (2021, "Fixed processing answers bug") -> `vqav2_accuracy`;
   - VizWiz: the VizWiz VQA API's vqaEval.py (Qing Li; vizwiz.org/tasks-and-datasets/vqa), `VQAEval.evaluate`
     -> `vizwiz_accuracy`.

Both scripts share `processPunctuation` (21 marks; a mark touching a space, or any digit-comma-digit in the text,
is deleted everywhere, otherwise replaced by a space; then periods not followed by a digit are deleted, at most 32)
and `processDigitArticle` (lower-case, number words zero..ten and "none" -> digits, drop a/an/the, contraction
table) and the leave-one-annotator-out accuracy mean_i min(1, #other answers equal / 3). They differ in:

- annotators' answers: VQAv2 cleans whitespace ("\\n"/"\\t" -> space, strip) and normalises them only when
  they disagree; VizWiz compares them as stored.
- prediction: VQAv2 cleans whitespace and normalises it only when the annotators disagree; VizWiz always
  normalises it.
- contraction table: VQAv2 uses ASCII apostrophes ("dont" -> "don't"); VizWiz kept the VQA API's table from
  before its 2016 fix, curly apostrophes ("dont" -> "don\u2019t") except in 8 values and 2 keys.
- "unanswerable": VizWiz treats it as ordinary answer text (no special case in accuracy).

Consequences worth knowing: with VQAv2, an answer is compared verbatim (case included) when all ten annotators
wrote the same string; with VizWiz, an annotator's "two" never matches the normalised prediction "2". On
annotations already in normalised form the two rules agree; on others they part. Official files have ten answers
per question; with a single answer every leave-one-out subset would be empty (everything would score 0), so
there, and only there, the harness scores exact match instead.

Not the VQA API: the copy in Cloud-CV/VQA-Evaluation (regex punctuation, the prediction always normalised) and
lmms-eval's VizWiz scoring (EvalAI processor on the annotators' answers too) differ from the scripts above.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from qvlm_harness.metrics.vqa import ARTICLES, CONTRACTIONS, NUMBER_MAP, PUNCTUATION, leave_one_out_accuracy

__all__ = [
    "VIZWIZ_API",
    "VIZWIZ_CONTRACTIONS",
    "VQA_API",
    "AnswerNormaliser",
    "vizwiz_accuracy",
    "vqav2_accuracy",
]

CURLY_APOSTROPHE = "\u2019"
# The VizWiz API kept the VQA API's contraction table from before GT-Vision-Lab/VQA 458a8b2 ("fixed the apostrophe
# symbol issue", 2016): every apostrophe is U+2019 except in these values and these keys.
_VIZWIZ_ASCII_VALUES = frozenset({"aint", "arent", "cant", "couldve", "couldnt", "weve", "wheres", "whove"})
_VIZWIZ_ASCII_KEYS = frozenset({"couldn'tve", "hadn'tve"})
VIZWIZ_CONTRACTIONS: dict[str, str] = {
    (k if k in _VIZWIZ_ASCII_KEYS else k.replace("'", CURLY_APOSTROPHE)):
        (v if k in _VIZWIZ_ASCII_VALUES else v.replace("'", CURLY_APOSTROPHE))
    for k, v in CONTRACTIONS.items()
}

_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")  # vqaEval's commaStrip: exactly one comma between two digits
_PERIOD_STRIP = re.compile(r"\.(?!\d)")  # vqaEval's "(?!<=\d)(\.)(?!\d)": its first group is a no-op look-ahead
_PERIOD_SUB_LIMIT = 32  # vqaEval passes re.UNICODE (== 32) as the `count` of that substitution


@dataclass(frozen=True)
class AnswerNormaliser:
    """`processPunctuation` then `processDigitArticle` of one official script (they differ in the table only)."""

    name: str
    contractions: Mapping[str, str]

    def process_punctuation(self, text: str) -> str:
        """vqaEval.processPunctuation: whether a mark is deleted or becomes a space is decided on the input text."""
        delete_all = _COMMA_STRIP.search(text) is not None
        out = text
        for mark in PUNCTUATION:
            if delete_all or (mark + " ") in text or (" " + mark) in text:
                out = out.replace(mark, "")
            else:
                out = out.replace(mark, " ")
        return _PERIOD_STRIP.sub("", out, count=_PERIOD_SUB_LIMIT)

    def process_digit_article(self, text: str) -> str:
        """vqaEval.processDigitArticle: number words -> digits, articles dropped, then the contraction table."""
        words = [NUMBER_MAP.get(w, w) for w in text.lower().split()]
        return " ".join(self.contractions.get(w, w) for w in words if w not in ARTICLES)

    def __call__(self, text: str) -> str:
        return self.process_digit_article(self.process_punctuation(text))


VQA_API = AnswerNormaliser("VQA API (GT-Vision-Lab/VQA vqaEval.py)", CONTRACTIONS)
VIZWIZ_API = AnswerNormaliser("VizWiz API (vqaEval.py)", VIZWIZ_CONTRACTIONS)


def _strip_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _leave_one_out(answer: str, gt_answers: Sequence[str]) -> float:
    if len(gt_answers) == 1:  # no official file has one answer; leave-one-out would score everything 0
        return float(answer == gt_answers[0])
    return float(leave_one_out_accuracy(sum(g == answer for g in gt_answers), len(gt_answers)))


def _check(gt_answers: Sequence[str]) -> None:
    if isinstance(gt_answers, str):
        raise TypeError("gt_answers must be a sequence of answers, not a single string")
    if len(gt_answers) == 0:
        raise ValueError("VQA accuracy needs at least one ground-truth answer")


def vqav2_accuracy(answer: str, gt_answers: Sequence[str]) -> float:
    """VQA API `VQAEval.evaluate` for one question: the submitted `answer` against its annotators' answers.

    Answers and prediction are whitespace-cleaned; only if the annotators' answers are not all the same string
    are both sides normalised (`VQA_API`). Leave-one-out by position (the VQA API removes one answer dict, which
    the unique answer_id makes one position). In [0, 1]: with ten answers 0, 0.3, 0.6, 0.9 or 1.
    """
    _check(gt_answers)
    gts = [_strip_whitespace(g) for g in gt_answers]
    res = _strip_whitespace(answer)
    if len(set(gts)) > 1:
        gts = [VQA_API(g) for g in gts]
        res = VQA_API(res)
    return _leave_one_out(res, gts)


def vizwiz_accuracy(answer: str, gt_answers: Sequence[str]) -> float:
    """VizWiz API `VQAEval.evaluate` for one question: the normalised `answer` against the answers as stored.

    The prediction is whitespace-cleaned and normalised with `VIZWIZ_API` (curly-apostrophe contractions); the
    annotators' answers are not touched. Leave-one-out by position, as the VizWiz API does. In [0, 1].
    """
    _check(gt_answers)
    return _leave_one_out(VIZWIZ_API(_strip_whitespace(answer)), list(gt_answers))

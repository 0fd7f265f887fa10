"""VQA answer processing shared by VQAv2 and VizWiz: the EvalAI answer processor, leave-one-out accuracy, reports.

`normalize_answer` is the EvalAI answer processor (the one MMF and lmms-eval ship). LLaVA-1.5's
scripts/convert_vqav2_for_submission.py and convert_vizwiz_for_submission.py pass every model output through it
before the answer file goes to the evaluation server, so the harness applies it to a prediction first; the
benchmark's own evaluation script then scores that submitted answer (`qvlm_harness.metrics.vqa_eval`:
`vqav2_accuracy`, `vizwiz_accuracy`, which differ from each other). Any deviation in normalisation moves scores
by tenths of a point, the size of the effects quantization studies report, so this module reproduces the
processor rule for rule, including its quirks (listed below), rather than "improving" it. Written from the
published rules; no code copied.

`vqa_accuracy` applies the processor to both sides (the prediction and every annotator's answer) before the
leave-one-out accuracy: lmms-eval's VizWiz scoring. It is kept as a primitive; the tasks use the official scripts.

Normalisation, in order (`normalize_answer`):

1. lower-case; delete every "," and "?"; split a possessive "'s" off its word ("man's" -> "man 's"); strip.
   Deleting commas first is what turns "1,000" into "1000".
2. newline / tab -> space; strip.
3. punctuation (`PUNCTUATION`): for each mark, if it touches a space anywhere in the text (or the text has a
   digit-comma-digit run), every occurrence is deleted; otherwise every occurrence becomes a space
   ("black-and-white" -> "black and white", "t - shirt" -> "t shirt").
4. periods: a period not followed by a digit is deleted ("yes." -> "yes", "2.5" kept).
5. per word: number words (`NUMBER_MAP`, "none" and "zero".."ten") -> digits; articles a/an/the dropped;
   contractions written without the apostrophe are restored (`CONTRACTIONS`, "dont" -> "don't"); words are
   re-joined with single spaces.

Quirks kept on purpose (changing any of them changes scores relative to published numbers):

- The period regex of the reference code is ``(?!<=\\d)(\\.)(?!\\d)``. Its first group was meant as a
  look-behind but is a look-ahead that can never fail, so the effective rule is only "not followed by a
  digit": "5." -> "5" while ".5" and "2.5" are kept. We implement the effective rule.
- The reference passes ``re.UNICODE`` (== 32) positionally as the *count* of that substitution, so at most
  32 periods are removed. We keep the cap (`_PERIOD_SUB_LIMIT`); it only matters for degenerate outputs.
- Step 1 splits "'s" but the contraction map restores "whats" as "what's" (no space), so "whats" and "what's"
  normalise differently ("what's" vs "what 's"). The reference behaves the same way.
- The contraction map keys "Im", "Ive", "Id've", "I'dve" are capitalised and can never match lower-cased
  text, and "somebody'd" maps to "somebodyd". Kept verbatim.

The punctuation list is the EvalAI/MMF one (21 marks, includes "-" and "!", excludes "'" and ":"), the same as
the VQA API's and the VizWiz API's. Only the VQA API's first release (GT-Vision-Lab/VQA 07aecec, July 2015)
listed "'" and ":" instead; with that list "don't" would become "don t" and never equal the contraction-restored
"dont" -> "don't".
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Any

__all__ = [
    "ANSWER_TYPES",
    "ARTICLES",
    "CONTRACTIONS",
    "NUMBER_MAP",
    "PUNCTUATION",
    "aggregate_vqa",
    "leave_one_out_accuracy",
    "normalize_answer",
    "said_unanswerable",
    "unanswerable_precision_recall",
    "vqa_accuracy",
]

# The official contraction map (EvalAI/MMF form, ASCII apostrophes), complete.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's",
    # The next four keys are capitalised in the reference and therefore unreachable after lower-casing.
    "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",  # reversed in the reference; kept verbatim
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip

# The "manual map" of the reference: number words to digits; note that "none" also maps to "0".
NUMBER_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# EvalAI/MMF punctuation list (order is irrelevant to the result but kept as published).
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip

ANSWER_TYPES: tuple[str, ...] = ("yes/no", "number", "other")  # always reported by aggregate_vqa

_COMMA_BETWEEN_DIGITS = re.compile(r"(?<=\d),+(?=\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_PERIOD_SUB_LIMIT = 32  # re.UNICODE passed as `count` in the reference; see module docstring


def _process_punctuation(text: str) -> str:
    """Steps 3-4: delete or space out punctuation, then drop periods not followed by a digit."""
    # The decision per mark looks at the text as it was *before* any mark was processed, like the reference.
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if delete_all or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_PERIOD_SUB_LIMIT)


def _process_words(text: str) -> str:
    """Step 5: number words -> digits, drop articles, restore contractions, re-join."""
    words = [NUMBER_MAP.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def normalize_answer(ans: str) -> str:
    """Normalise a predicted or ground-truth answer exactly like the EvalAI/MMF VQA processor.

    See the module docstring for the rules and the reference quirks that are kept for score parity.
    """
    text = ans.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_words(_process_punctuation(text))


def leave_one_out_accuracy(n_matches: int, n_answers: int) -> Fraction:
    """Mean over annotators i of min(1, matches among the other answers / 3), in exact arithmetic.

    An annotator whose own answer matches sees `n_matches - 1` matches among the others; one whose answer
    does not match sees `n_matches`. Exact fractions make 2-of-10 come out as exactly 0.6.
    """
    hit = min(Fraction(1), Fraction(max(n_matches - 1, 0), 3))
    miss = min(Fraction(1), Fraction(n_matches, 3))
    return (n_matches * hit + (n_answers - n_matches) * miss) / n_answers


def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """Official VQA accuracy of one prediction against its annotators' answers, in [0, 1].

    Prediction and every ground-truth answer go through `normalize_answer`. For each annotator i,
    acc_i = min(1, #(other answers equal to the prediction) / 3); the result is the mean of acc_i. With the
    usual 10 answers: 0 matches -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1.0.

    Fewer than 10 answers: the same formula is applied literally, so the best reachable score is
    min(1, (n - 1) / 3) (e.g. 2/3 with 3 answers that all agree). One answer is the exception: the
    leave-one-out set is then empty and the formula would score every prediction 0, so a single answer is
    scored by exact match of the normalised strings (1.0 or 0.0); this is what single-answer sets such as
    easy-VQA need. An empty answer list raises ValueError.
    """
    if isinstance(gt_answers, str):
        raise TypeError("gt_answers must be a sequence of answers, not a single string")
    if len(gt_answers) == 0:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    pred = normalize_answer(prediction)
    gts = [normalize_answer(g) for g in gt_answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    n_matches = sum(g == pred for g in gts)
    return float(leave_one_out_accuracy(n_matches, len(gts)))


def said_unanswerable(prediction: str) -> bool:
    """True when the normalised prediction is exactly "unanswerable" (the VizWiz abstention answer).

    Exact match after normalisation is the same criterion the accuracy metric uses, so a prediction counted
    as an abstention here is the one that scores against "unanswerable" ground truth.
    """
    return normalize_answer(prediction) == "unanswerable"


def _record_accuracy(rec: Mapping[str, Any]) -> float:
    if "accuracy" in rec and rec["accuracy"] is not None:
        acc = float(rec["accuracy"])
        if not 0.0 <= acc <= 1.0:
            raise ValueError(f"record accuracy must be in [0, 1], got {acc}")
        return acc
    if "prediction" in rec and "gt_answers" in rec:
        return vqa_accuracy(rec["prediction"], rec["gt_answers"])
    raise KeyError("each VQA record needs 'accuracy' or both 'prediction' and 'gt_answers'")


def aggregate_vqa(records: Iterable[Mapping[str, Any]]) -> dict[str, float | int]:
    """Overall and per-answer-type VQA accuracy in percent, with counts.

    Each record is a mapping with either "accuracy" (a per-question score in [0, 1], e.g. from
    `vqa_accuracy`) or "prediction" and "gt_answers" (scored here), and optionally "answer_type".

    Returns {"acc": overall %, "n_acc": #questions, "<type>": %, "n_<type>": count, ...}. The three VQAv2
    types "yes/no", "number", "other" are always present (NaN with count 0 when absent, so a missing type
    cannot be mistaken for a score of 0); any other type found in the records (VizWiz "unanswerable") is
    added when present. Records without an answer_type count only towards the overall accuracy.
    """
    sums: dict[str, float] = {t: 0.0 for t in ANSWER_TYPES}
    counts: dict[str, int] = {t: 0 for t in ANSWER_TYPES}
    total, n = 0.0, 0
    for rec in records:
        acc = _record_accuracy(rec)
        total += acc
        n += 1
        atype = rec.get("answer_type")
        if atype is not None:
            sums[atype] = sums.get(atype, 0.0) + acc
            counts[atype] = counts.get(atype, 0) + 1
    out: dict[str, float | int] = {"acc": 100.0 * total / n if n else math.nan, "n_acc": n}
    extra = sorted(t for t in counts if t not in ANSWER_TYPES)
    for atype in (*ANSWER_TYPES, *extra):
        k = counts[atype]
        out[atype] = 100.0 * sums[atype] / k if k else math.nan
        out[f"n_{atype}"] = k
    return out


def unanswerable_precision_recall(
    predictions_unanswerable: Sequence[bool], gold_unanswerable: Sequence[bool]
) -> dict[str, float | int | bool]:
    """Precision / recall / F1 (percent) of the model abstaining on VizWiz's unanswerable questions.

    A positive is "the model said unanswerable" (see `said_unanswerable`) against "the question is
    unanswerable" (VizWiz `answerable == 0`). This shows whether a quantized model abstains more or less
    often than the baseline, which overall accuracy hides.

    Undefined cases: when the model never says unanswerable, precision is 0/0; we report 0.0 and set
    "precision_undefined": True (a model that never abstains gets no credit, and the flag tells a reader
    the 0 is not a measured ratio). Likewise recall is 0.0 with "recall_undefined": True when no question is
    unanswerable. F1 is 0.0 when precision + recall is 0.
    """
    if len(predictions_unanswerable) != len(gold_unanswerable):
        raise ValueError(
            f"length mismatch: {len(predictions_unanswerable)} predictions vs {len(gold_unanswerable)} gold"
        )
    pred = [bool(p) for p in predictions_unanswerable]
    gold = [bool(g) for g in gold_unanswerable]
    tp = sum(p and g for p, g in zip(pred, gold, strict=True))
    fp = sum(p and not g for p, g in zip(pred, gold, strict=True))
    fn = sum(g and not p for p, g in zip(pred, gold, strict=True))
    n_pred, n_gold = tp + fp, tp + fn
    precision = 100.0 * tp / n_pred if n_pred else 0.0
    recall = 100.0 * tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "n_predicted": n_pred,
        "n_gold": n_gold,
        "n": len(pred),
        "precision_undefined": n_pred == 0,
        "recall_undefined": n_gold == 0,
    }

"""VQAv2 and VizWiz are scored by their own official evaluation scripts, which differ; VQAv2 refuses question and
annotation files that do not describe the same questions.

Every expected value below is worked out by hand from the official code:
- VQA API: GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py (a013f00), `VQAEval.evaluate`,
  `processPunctuation`, `processDigitArticle`;
- VizWiz API: vqaEval.py of the VizWiz VQA API (Qing Li), `VQAEval.evaluate`, `processPunctuation`,
  `processDigitArticle`.
"""

from __future__ import annotations

import json
import random

import pytest

from qvlm_harness.errors import DataError
from qvlm_harness.metrics.vqa import CONTRACTIONS, normalize_answer
from qvlm_harness.metrics.vqa_eval import VIZWIZ_API, VIZWIZ_CONTRACTIONS, VQA_API, vizwiz_accuracy, vqav2_accuracy
from qvlm_harness.task import Response, Sample
from qvlm_harness.tasks.vizwiz import VizWiz
from qvlm_harness.tasks.vqav2 import VQAv2
from tests.test_task_vqa import write_vqav2

CURLY = "\u2019"


# -- where the two official evaluations part -------------------------------------------------------------------------
def test_unanimous_annotators_are_compared_verbatim_by_vqav2_only():
    # VQA API evaluate: len(set(gtAnswers)) == 1, so neither side goes through processPunctuation/processDigitArticle;
    # "Yes." equals each of the 9 other answers -> min(1, 9/3) = 1 for all 10 annotators -> 1.0.
    assert vqav2_accuracy("Yes.", ["Yes."] * 10) == 1.0
    # VizWiz evaluate: resAns = processDigitArticle(processPunctuation("Yes.")) = "yes" (periodStrip, lower());
    # the stored answers "Yes." are not processed, so no match -> 0.0.
    assert vizwiz_accuracy("Yes.", ["Yes."] * 10) == 0.0
    # The same with case: VQA API compares "Unanswerable" to "unanswerable" unprocessed -> 0; VizWiz lower-cases the
    # prediction -> 10 matches -> 1.0.
    assert vqav2_accuracy("Unanswerable", ["unanswerable"] * 10) == 0.0
    assert vizwiz_accuracy("Unanswerable", ["unanswerable"] * 10) == 1.0


def test_number_words_in_the_annotations():
    gts = ["two"] * 8 + ["2"] * 2
    # VQA API: the answers disagree, so each goes through processDigitArticle ("two" -> manualMap -> "2"): all 10
    # equal "2", each annotator sees 9 matches -> 1.0.
    assert vqav2_accuracy("2", gts) == 1.0
    # VizWiz: stored answers untouched, 2 match "2": the 2 annotators who said "2" see 1 match (1/3), the other 8 see
    # 2 (2/3): (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    assert vizwiz_accuracy("2", gts) == pytest.approx(0.6)


def test_punctuation_in_the_annotations():
    gts = ["black and white"] * 2 + ["black-and-white"] * 8
    # VQA API processPunctuation("black-and-white"): "-" touches no space and there is no digit,digit -> every "-"
    # becomes a space -> all 10 read "black and white" -> 1.0.
    assert vqav2_accuracy("black and white", gts) == 1.0
    # VizWiz: 2 stored answers equal the prediction -> 0.6 as above.
    assert vizwiz_accuracy("black and white", gts) == pytest.approx(0.6)


def test_contraction_tables_differ_in_their_apostrophe():
    gts = ["don't"] * 3 + ["no"] * 7
    # VQA API: answers disagree; "don't" keeps its apostrophe (not in punct) and is no contraction key; the prediction
    # "dont" -> contractions["dont"] = "don't": 3 matches -> 3 annotators see 2 (2/3), 7 see 3 (1): 9/10.
    assert vqav2_accuracy("dont", gts) == pytest.approx(0.9)
    # VizWiz: its table maps "dont" to "don\u2019t" (curly), which equals none of the stored answers -> 0.0.
    assert vizwiz_accuracy("dont", gts) == 0.0


def test_whitespace_of_the_annotations():
    # VQA API strips '\n', '\t' and surrounding spaces of every stored answer first; VizWiz does not.
    assert vqav2_accuracy("yes", ["yes "] * 10) == 1.0
    assert vizwiz_accuracy("yes", ["yes "] * 10) == 0.0


def test_tasks_score_the_same_output_differently():
    answers = ["two"] * 8 + ["2"] * 2
    vqa = VQAv2().score(Sample("1", None, {"answers": answers, "answer_type": "number"}), Response(text="Two."))
    viz = VizWiz().score(Sample("a.jpg", None, {"answers": answers, "answer_type": "number", "answerable": 1}),
                         Response(text="Two."))
    # submitted answer (EvalAI processor): "Two." -> "two" -> "2"; then each task's own evaluation, as above
    assert vqa["pred"] == viz["pred"] == "2"
    assert vqa["accuracy"] == 1.0 and viz["accuracy"] == pytest.approx(0.6)


# -- the evaluation scripts' own normalisation vs the EvalAI submission processor -------------------------------------
def test_vqa_api_normalisation_is_not_the_evalai_processor():
    # EvalAI word_tokenize deletes every comma and splits "'s"; the VQA API's processPunctuation does neither:
    # "," touches no space and has no digit on both sides -> it becomes a space; "'" is not one of its 21 marks.
    assert VQA_API("red,white") == "red white" and normalize_answer("red,white") == "redwhite"
    assert VQA_API("man's") == "man's" and normalize_answer("man's") == "man 's"
    # digit,digit anywhere -> every mark is deleted (commaStrip), including the comma itself
    assert VQA_API("1,000 t-shirts") == "1000 tshirts"
    # periodStrip removes a period not followed by a digit, at most 32 times (re.UNICODE passed as count)
    assert VQA_API("2.5.") == "2.5" and VQA_API("." * 40) == "." * 8


def test_contraction_tables():
    assert VQA_API.contractions == CONTRACTIONS and all(CURLY not in k + v for k, v in CONTRACTIONS.items())
    assert len(VIZWIZ_CONTRACTIONS) == 120
    # entries as printed in the VizWiz API's vqaEval.py
    assert VIZWIZ_CONTRACTIONS["dont"] == f"don{CURLY}t"
    assert VIZWIZ_CONTRACTIONS["aint"] == "ain't" and VIZWIZ_CONTRACTIONS["weve"] == "we've"
    assert VIZWIZ_CONTRACTIONS["wheres"] == "where's" and VIZWIZ_CONTRACTIONS["whove"] == "who've"
    assert VIZWIZ_CONTRACTIONS["couldn'tve"] == f"couldn{CURLY}t{CURLY}ve"  # an ASCII key, a curly value
    assert VIZWIZ_CONTRACTIONS[f"couldnt{CURLY}ve"] == f"couldn{CURLY}t{CURLY}ve"
    assert VIZWIZ_CONTRACTIONS["twas"] == f"{CURLY}twas" and VIZWIZ_CONTRACTIONS[f"somebody{CURLY}d"] == "somebodyd"
    assert "couldnt've" not in VIZWIZ_CONTRACTIONS  # so an ASCII "couldnt've" stays as it is
    assert VIZWIZ_API("couldnt've") == "couldnt've" and VQA_API("couldnt've") == "couldn't've"


def _vqa_api_literal(res: str, answers: list[str]) -> float:
    """VQAEval.evaluate of the VQA API, transcribed loop for loop (answer dicts with unique answer_id)."""
    gts = [{"answer": a.replace("\n", " ").replace("\t", " ").strip(), "answer_id": i} for i, a in enumerate(answers)]
    res = res.replace("\n", " ").replace("\t", " ").strip()
    if len({g["answer"] for g in gts}) > 1:
        for g in gts:
            g["answer"] = VQA_API.process_digit_article(VQA_API.process_punctuation(g["answer"]))
        res = VQA_API.process_digit_article(VQA_API.process_punctuation(res))
    accs = []
    for datum in gts:
        other = [g for g in gts if g != datum]
        accs.append(min(1, len([g for g in other if g["answer"] == res]) / 3))
    return sum(accs) / len(accs)


def _vizwiz_api_literal(res: str, answers: list[str]) -> float:
    """VQAEval.evaluate of the VizWiz API, transcribed loop for loop."""
    res = VIZWIZ_API.process_digit_article(VIZWIZ_API.process_punctuation(res.replace("\n", " ").replace("\t", " ")
                                                                           .strip()))
    accs = []
    for i in range(len(answers)):
        other = [a for j, a in enumerate(answers) if i != j]
        accs.append(min(1, len([a for a in other if a == res]) / 3))
    return sum(accs) / len(accs)


def test_both_equal_a_literal_transcription_on_random_answer_lists():
    rng = random.Random(0)
    pool = ["two", "2", "Two.", "yes", "Yes", "yes ", "dont", "don't", "black-and-white", "black and white", "a dog",
            "dog", "1,000", "1000", "unanswerable", "Unanswerable"]
    for _ in range(500):
        gts = [rng.choice(pool) for _ in range(10)] if rng.random() < 0.8 else [rng.choice(pool)] * 10
        pred = rng.choice(pool)
        assert vqav2_accuracy(pred, gts) == pytest.approx(_vqa_api_literal(pred, gts), abs=1e-12)
        assert vizwiz_accuracy(pred, gts) == pytest.approx(_vizwiz_api_literal(pred, gts), abs=1e-12)


# -- VQAv2 files that do not match are refused ------------------------------------------------------------------------
def _rewrite(path, key, edit):
    data = json.loads(path.read_text())
    edit(data[key])
    path.write_text(json.dumps(data))


def test_annotation_without_question_is_refused(tmp_path):
    write_vqav2(tmp_path)
    qfile = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    _rewrite(qfile, "questions", lambda qs: qs.pop(1))  # question 20 gone, its annotation stays
    with pytest.raises(DataError) as exc:
        VQAv2().load("val", tmp_path)
    msg = str(exc.value)
    assert "v2_mscoco_val2014_annotations.json annotates question_id 20" in msg and qfile.name in msg
    assert "\n" not in msg


def test_question_without_annotation_names_the_ids(tmp_path):
    write_vqav2(tmp_path)
    _rewrite(tmp_path / "v2_mscoco_val2014_annotations.json", "annotations", lambda anns: anns.pop(0))
    with pytest.raises(DataError) as exc:
        VQAv2().load("val", tmp_path)
    msg = str(exc.value)
    assert "question_id 10 has no entry in v2_mscoco_val2014_annotations.json" in msg and "\n" not in msg


def test_duplicate_ids_are_refused(tmp_path):
    write_vqav2(tmp_path)
    afile = tmp_path / "v2_mscoco_val2014_annotations.json"
    _rewrite(afile, "annotations", lambda anns: anns.append(dict(anns[0])))
    with pytest.raises(DataError, match=r"annotations.json lists question_id 10 more than once"):
        VQAv2().load("val", tmp_path)


def test_annotation_without_answers_is_refused(tmp_path):
    write_vqav2(tmp_path)
    _rewrite(tmp_path / "v2_mscoco_val2014_annotations.json", "annotations", lambda anns: anns[2].pop("answers"))
    with pytest.raises(DataError, match=r"annotations.json annotation #2 lacks answers"):
        VQAv2().load("val", tmp_path)


def test_matching_files_still_load(tmp_path):
    assert [s.id for s in VQAv2().load("val", write_vqav2(tmp_path))] == ["10", "20", "30"]

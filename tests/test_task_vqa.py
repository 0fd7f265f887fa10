"""VQAv2 and VizWiz loaders on official-format fixtures, scoring, and one-line errors for bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from qvlm_harness.errors import DataError
from qvlm_harness.task import Response
from qvlm_harness.tasks.vizwiz import VizWiz
from qvlm_harness.tasks.vqav2 import VQAv2


def write_vqav2(folder: Path, split: str = "val") -> Path:
    coco = f"{split}2014"
    (folder / coco).mkdir(parents=True)
    questions, annotations = [], []
    items = [(1, "What color is it?", ["red"] * 8 + ["orange", "dark red"], "other"),
             (2, "How many dogs?", ["two"] * 2 + ["2"] * 2 + ["3"] * 6, "number"),
             (3, "Is it a cat?", ["yes"] * 10, "yes/no")]
    for image_id, question, answers, atype in items:
        Image.new("RGB", (16, 16)).save(folder / coco / f"COCO_{coco}_{image_id:012d}.jpg")
        questions.append({"image_id": image_id, "question": question, "question_id": image_id * 10})
        annotations.append({"question_id": image_id * 10, "image_id": image_id, "answer_type": atype,
                            "multiple_choice_answer": answers[0], "question_type": "what",
                            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                        for i, a in enumerate(answers)]})
    (folder / f"v2_OpenEnded_mscoco_{coco}_questions.json").write_text(json.dumps({"questions": questions}))
    (folder / f"v2_mscoco_{coco}_annotations.json").write_text(json.dumps({"annotations": annotations}))
    return folder


def test_vqav2_official_loader_and_metric(tmp_path):
    task = VQAv2()
    samples = task.load("test", write_vqav2(tmp_path))  # "test" = the evaluation split, val
    assert [s.id for s in samples] == ["10", "20", "30"]
    assert samples[0].image == tmp_path / "val2014" / "COCO_val2014_000000000001.jpg"
    assert task.request(samples[0]).prompt == ("What color is it?\n"
                                               "Answer the question using a single word or phrase.")
    outputs = {"10": "Red.", "20": "2", "30": "no"}
    records = [task.score(s, Response(text=outputs[s.id])) for s in samples]
    # "Red." -> "red": 8 matches -> 1.0; "2": "two"->"2" gives 4 matches -> 1.0; "no": 0 matches -> 0.0
    assert [r["accuracy"] for r in records] == [1.0, 1.0, 0.0]
    agg = task.aggregate(records)
    assert agg["acc"] == pytest.approx(200 / 3) and agg["number"] == 100.0 and agg["yes/no"] == 0.0


def test_vqav2_partial_agreement(tmp_path):
    task = VQAv2()
    sample = task.load("val", write_vqav2(tmp_path))[1]
    # "3" matches 6 of 10 answers -> every leave-one-out subset has >= 5 matches -> 1.0;
    # "two" matches 4 ("two" x2, "2" x2): subsets leaving out a match have 3 -> 1, others 4 -> 1: 1.0
    assert task.score(sample, Response(text="3"))["accuracy"] == 1.0
    sample.data["answers"] = ["2"] * 2 + ["3"] * 8
    # 2 matches: leaving out one of the 2 -> 1 match -> 1/3 (2 subsets); leaving out another -> 2/3 (8 subsets)
    assert task.score(sample, Response(text="two"))["accuracy"] == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)


def test_vqav2_missing_annotation_file(tmp_path):
    write_vqav2(tmp_path)
    (tmp_path / "v2_mscoco_val2014_annotations.json").unlink()
    with pytest.raises(DataError) as exc:
        VQAv2().load("val", tmp_path)
    assert "v2_mscoco_val2014_annotations.json" in str(exc.value) and "\n" not in str(exc.value)


def test_vqav2_question_without_annotation_or_image_id(tmp_path):
    write_vqav2(tmp_path)
    qfile = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    data = json.loads(qfile.read_text())
    data["questions"].append({"image_id": 9, "question": "Where?", "question_id": 999})
    qfile.write_text(json.dumps(data))
    with pytest.raises(DataError, match="question_id 999 has no entry"):
        VQAv2().load("val", tmp_path)
    data["questions"][-1] = {"question": "Where?", "question_id": 999}
    qfile.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"question #3 lacks"):
        VQAv2().load("val", tmp_path)


def test_vqav2_hf_parquet_layout(tmp_path):
    pd = pytest.importorskip("pandas")
    import io

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    pd.DataFrame([{"question_id": 5, "question": "What?", "answers": [{"answer": "cat"}] * 10,
                   "answer_type": "other", "image": {"bytes": buf.getvalue()}}]).to_parquet(
        tmp_path / "validation-00000.parquet")
    samples = VQAv2().load("validation", tmp_path)
    assert samples[0].id == "5" and samples[0].data["answers"] == ["cat"] * 10 and isinstance(samples[0].image, bytes)


def write_vizwiz(folder: Path, split: str = "val") -> Path:
    (folder / split).mkdir(parents=True)
    recs = [
        {"image": f"VizWiz_{split}_00000000.jpg", "question": "What is this?", "answer_type": "other",
         "answerable": 1, "answers": [{"answer": "soup", "answer_confidence": "yes"}] * 10},
        {"image": f"VizWiz_{split}_00000001.jpg", "question": "What color?", "answer_type": "unanswerable",
         "answerable": 0, "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 9
         + [{"answer": "blue", "answer_confidence": "maybe"}]},
        {"image": f"VizWiz_{split}_00000002.jpg", "question": "Is it open?", "answer_type": "yes/no",
         "answerable": 1, "answers": [{"answer": "yes", "answer_confidence": "yes"}] * 10},
    ]
    for r in recs:
        Image.new("RGB", (16, 16)).save(folder / split / r["image"])
    (folder / f"{split}.json").write_text(json.dumps(recs))
    return folder


def test_vizwiz_loader_metric_and_unanswerable_precision_recall(tmp_path):
    task = VizWiz()
    samples = task.load("test", write_vizwiz(tmp_path))
    assert samples[1].image == tmp_path / "val" / "VizWiz_val_00000001.jpg"
    assert "respond with 'Unanswerable'" in task.request(samples[0]).prompt
    outs = ["soup", "Unanswerable", "unanswerable"]
    records = [task.score(s, Response(text=o)) for s, o in zip(samples, outs, strict=True)]
    assert [r["accuracy"] for r in records] == [1.0, 1.0, 0.0]
    agg = task.aggregate(records)
    # predicted unanswerable: samples 1 and 2; gold unanswerable: sample 1 -> precision 50%, recall 100%
    assert agg["unans_precision"] == 50.0 and agg["unans_recall"] == 100.0
    assert agg["unanswerable"] == 100.0 and agg["other"] == 100.0 and agg["yes/no"] == 0.0


def test_vizwiz_entry_without_image(tmp_path):
    write_vizwiz(tmp_path)
    data = json.loads((tmp_path / "val.json").read_text())
    del data[2]["image"]
    (tmp_path / "val.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"val.json entry #2 lacks image"):
        VizWiz().load("val", tmp_path)


def test_embedded_sets_load():
    assert len(VQAv2().load("test")) == 500
    viz = VizWiz().load("test")
    assert len(viz) == 400 and sum(not s.data["answerable"] for s in viz) > 50

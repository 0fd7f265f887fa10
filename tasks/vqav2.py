"""VQAv2 (`vqav2`): open-ended questions scored with the official VQA accuracy.

Data, from `--data-dir` (or the embedded sample set):
- official: `v2_OpenEnded_mscoco_{split}2014_questions.json` + `v2_mscoco_{split}2014_annotations.json` +
  `{split}2014/COCO_{split}2014_{image_id:012d}.jpg` (the evaluation split is `val`; test has no answers);
- a local HF-datasets copy: `{split}-*.parquet` or `data/{split}-*.parquet` with columns question, question_id,
  answers (list of strings or of {answer: ...}), answer_type, image ({bytes} or bytes).

Prompt (LLaVA-1.5 / lmms-eval): "{question}\\nAnswer the question using a single word or phrase." Greedy, up to
16 new tokens. Metric: the prediction is submitted through the EvalAI answer processor (as LLaVA-1.5's
convert_vqav2_for_submission.py does) and scored by the VQA API's own evaluation
(`qvlm_harness.metrics.vqa_eval.vqav2_accuracy`): min(1, matches/3) averaged over the 10 leave-one-annotator-out
subsets, both sides normalised when the annotators disagree; overall and by answer type.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qvlm_harness.errors import DataError
from qvlm_harness.metrics.vqa import aggregate_vqa, normalize_answer
from qvlm_harness.metrics.vqa_eval import vqav2_accuracy
from qvlm_harness.task import Request, Response, Sample, Task, TaskMeta
from qvlm_harness.tasks._common import data_folder, read_json

LAYOUT = ("v2_OpenEnded_mscoco_{split}2014_questions.json + v2_mscoco_{split}2014_annotations.json + "
          "{split}2014/COCO_{split}2014_{image_id:012d}.jpg, or {split}-*.parquet (HF layout)")
POST_PROMPT = "Answer the question using a single word or phrase."


class VQAv2(Task):
    name = "vqav2"
    description = "VQAv2 open-ended VQA; official VQA accuracy overall and by answer type"
    eval_split = "val"
    primary_metric = "acc"
    metrics = ("acc", "yes/no", "number", "other")
    data_layout = LAYOUT
    report_meta = TaskMeta(
        label="VQAv2", metrics=("acc", "yes/no", "number", "other"), primary="acc", metric_labels={"acc": "Acc"},
        metric_names={"acc": "accuracy"}, unit="%",
        caption="VQAv2 accuracy (%, official VQA accuracy) overall and by answer type.",
        table_title="VQAv2 by answer type")

    def load(self, split: str, data_dir: Path | None = None) -> list[Sample]:
        split = self.resolve_split(split)
        folder = data_folder(self.name, data_dir, LAYOUT)
        qfile = folder / f"v2_OpenEnded_mscoco_{split}2014_questions.json"
        parquet = sorted(folder.glob(f"{split}-*.parquet")) + sorted(folder.glob(f"data/{split}-*.parquet"))
        if not qfile.exists() and parquet:
            return self._load_parquet(parquet, split)
        afile = folder / f"v2_mscoco_{split}2014_annotations.json"
        questions = _entries(read_json(qfile, self.name, LAYOUT), "questions", qfile,
                             ("question_id", "image_id", "question"))
        annotations = _entries(read_json(afile, self.name, LAYOUT), "annotations", afile, ("question_id", "answers"))
        by_qid = {a["question_id"]: a for a in annotations}
        _check_same_questions([q["question_id"] for q in questions], [a["question_id"] for a in annotations],
                              qfile, afile)
        samples = []
        for q in questions:
            ann = by_qid[q["question_id"]]
            image = folder / f"{split}2014" / f"COCO_{split}2014_{int(q['image_id']):012d}.jpg"
            samples.append(Sample(str(q["question_id"]), image, {
                "question": q["question"], "answers": [a["answer"] for a in ann["answers"]],
                "answer_type": ann.get("answer_type", "other"),
                "multiple_choice_answer": ann.get("multiple_choice_answer"),
            }))
        return samples

    def _load_parquet(self, files: list[Path], split: str) -> list[Sample]:
        import pandas as pd

        df = pd.concat([pd.read_parquet(p) for p in files], ignore_index=True)
        samples = []
        for i, row in enumerate(df.to_dict("records")):
            answers = [a["answer"] if isinstance(a, dict) else str(a) for a in row["answers"]]
            img = row.get("image")
            image = img.get("bytes") if isinstance(img, dict) else img
            if image is None:
                raise DataError(f"vqav2: {split} parquet row {i} has no image bytes")
            samples.append(Sample(str(row.get("question_id", i)), image, {
                "question": row["question"], "answers": answers, "answer_type": row.get("answer_type", "other"),
                "multiple_choice_answer": row.get("multiple_choice_answer"),
            }))
        return samples

    def request(self, sample: Sample, *, scoring: str = "generate", demos: Sequence[Sample] = ()) -> Request:
        return Request(sample.id, f"{sample.data['question'].strip()}\n{POST_PROMPT}", sample.image,
                       max_new_tokens=16)

    def target(self, sample: Sample) -> str:
        return sample.data.get("multiple_choice_answer") or _mode(sample.data["answers"])

    def score(self, sample: Sample, response: Response) -> dict[str, Any]:
        raw = response.text or ""
        pred = normalize_answer(raw)  # the submitted answer
        return {"raw": raw, "pred": pred, "accuracy": vqav2_accuracy(pred, sample.data["answers"]),
                "answer_type": sample.data["answer_type"]}

    def aggregate(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        return aggregate_vqa(records)


def _entries(data: Any, key: str, path: Path, required: tuple[str, ...]) -> list[dict]:
    """The list under `key` of an official file, each entry with the fields the loader reads."""
    items = data.get(key) if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise DataError(f"vqav2: {path.name} has no {key!r} list; use the official VQAv2 files")
    for i, item in enumerate(items):
        missing = [k for k in required if not isinstance(item, dict) or k not in item]
        if missing:
            noun = key[:-1]
            raise DataError(f"vqav2: {path.name} {noun} #{i} lacks {'/'.join(missing)}; use the official VQAv2 files")
    return items


def _first(ids: Sequence[Any], limit: int = 3) -> str:
    return ", ".join(str(i) for i in ids[:limit]) + (", ..." if len(ids) > limit else "")


def _check_same_questions(question_ids: list[Any], annotation_ids: list[Any], qfile: Path, afile: Path) -> None:
    """The question and annotation files must describe exactly the same questions, each once: a question without
    answers cannot be scored and an answer without its question would be dropped silently, so a mismatched pair of
    files (another split, a truncated download) is refused instead of evaluating a different set."""
    for ids, path in ((question_ids, qfile), (annotation_ids, afile)):
        twice = [i for i, k in Counter(ids).items() if k > 1]
        if twice:
            raise DataError(f"vqav2: {path.name} lists question_id {_first(twice)} more than once; "
                            "use the official VQAv2 files")
    questions, annotated = set(question_ids), set(annotation_ids)
    unanswered = [q for q in question_ids if q not in annotated]
    if unanswered:
        raise DataError(f"vqav2: question_id {unanswered[0]} has no entry in {afile.name} ({len(unanswered)} of "
                        f"{len(question_ids)} questions of {qfile.name} have none: {_first(unanswered)}); "
                        "use matching question/annotation files of one split")
    orphans = [a for a in annotation_ids if a not in questions]
    if orphans:
        raise DataError(f"vqav2: {afile.name} annotates question_id {_first(orphans)} ({len(orphans)} of "
                        f"{len(annotation_ids)}) missing from {qfile.name}; use matching question/annotation files "
                        "of one split")


def _mode(answers: Sequence[str]) -> str:
    norm = [normalize_answer(a) for a in answers]
    return min(set(norm), key=lambda a: (-norm.count(a), a))

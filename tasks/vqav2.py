"""VQAv2 (`vqav2`): open-ended questions scored with the official VQA accuracy.

Data, from `--data-dir` (or the embedded sample set):
- official: `v2_OpenEnded_mscoco_{split}2014_questions.json` + `v2_mscoco_{split}2014_annotations.json` +
  `{split}2014/COCO_{split}2014_{image_id:012d}.jpg` (the evaluation split is `val`; test has no answers);
- a local HF-datasets copy: `{split}-*.parquet` or `data/{split}-*.parquet` with columns question, question_id,
  answers (list of strings or of {answer: ...}), answer_type, image ({bytes} or bytes).

Prompt (LLaVA-1.5 / lmms-eval): "{question}\\nAnswer the question using a single word or phrase." Greedy, up to
16 new tokens. Metric: min(1, matches/3) averaged over the 10 leave-one-annotator-out subsets, after the official
answer normalisation; overall and by answer type.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qvlm_harness.errors import DataError
from qvlm_harness.metrics.vqa import aggregate_vqa, normalize_answer, vqa_accuracy
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
        questions = read_json(qfile, self.name, LAYOUT)
        annotations = read_json(folder / f"v2_mscoco_{split}2014_annotations.json", self.name, LAYOUT)
        by_qid = {a["question_id"]: a for a in annotations.get("annotations", [])}
        samples = []
        for i, q in enumerate(questions.get("questions", [])):
            if "question_id" not in q or "image_id" not in q or "question" not in q:
                raise DataError(f"vqav2: {qfile.name} question #{i} lacks question_id/image_id/question")
            ann = by_qid.get(q["question_id"])
            if ann is None:
                raise DataError(f"vqav2: question_id {q['question_id']} has no entry in "
                                f"v2_mscoco_{split}2014_annotations.json; use matching question/annotation files")
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
        return {"raw": raw, "pred": normalize_answer(raw), "accuracy": vqa_accuracy(raw, sample.data["answers"]),
                "answer_type": sample.data["answer_type"]}

    def aggregate(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        return aggregate_vqa(records)


def _mode(answers: Sequence[str]) -> str:
    norm = [normalize_answer(a) for a in answers]
    return min(set(norm), key=lambda a: (-norm.count(a), a))

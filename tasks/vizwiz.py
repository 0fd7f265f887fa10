"""VizWiz VQA (`vizwiz`): questions from blind photographers, many unanswerable.

Data, from `--data-dir` (or the embedded sample set): official `{split}.json` (a list of {image, question,
answers: [10 x {answer, answer_confidence}], answer_type, answerable}) and images `{split}/{image}` (the
evaluation split is `val`; test has no answers).

Prompt (LLaVA-1.5 / lmms-eval): "{question}\\nWhen the provided information is insufficient, respond with
'Unanswerable'.\\nAnswer the question using a single word or phrase." Metric: VQA accuracy overall and by answer
type, plus precision/recall of answering "unanswerable". The prediction is submitted through the EvalAI answer
processor (as LLaVA-1.5's convert_vizwiz_for_submission.py does) and scored by the VizWiz API's own evaluation
(`qvlm_harness.metrics.vqa_eval.vizwiz_accuracy`): the annotators' answers are compared as stored, and its
contraction table is not VQAv2's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qvlm_harness.errors import DataError
from qvlm_harness.metrics.vqa import aggregate_vqa, normalize_answer, unanswerable_precision_recall
from qvlm_harness.metrics.vqa_eval import vizwiz_accuracy
from qvlm_harness.task import Request, Response, Sample, Task, TaskMeta
from qvlm_harness.tasks._common import data_folder, read_json

LAYOUT = "{split}.json (official VizWiz annotations) + {split}/VizWiz_{split}_NNNNNNNN.jpg"
POST_PROMPT = ("When the provided information is insufficient, respond with 'Unanswerable'.\n"
               "Answer the question using a single word or phrase.")


class VizWiz(Task):
    name = "vizwiz"
    description = "VizWiz VQA; VQA accuracy by answer type and unanswerable precision/recall"
    eval_split = "val"
    primary_metric = "acc"
    metrics = ("acc", "yes/no", "number", "other", "unanswerable", "unans_precision", "unans_recall")
    data_layout = LAYOUT
    report_meta = TaskMeta(
        label="VizWiz", metrics=("acc", "yes/no", "number", "other", "unanswerable", "unans_precision", "unans_recall"),
        primary="acc", metric_labels={"acc": "Acc", "unans_precision": "Unans P", "unans_recall": "Unans R"},
        metric_names={"acc": "accuracy", "unans_precision": "unanswerable precision",
                      "unans_recall": "unanswerable recall"}, unit="%",
        caption="VizWiz accuracy (%, VQA accuracy) overall and by answer type, and the precision and recall of "
                "answering unanswerable.",
        table_title="VizWiz by answer type")

    def load(self, split: str, data_dir: Path | None = None) -> list[Sample]:
        split = self.resolve_split(split)
        folder = data_folder(self.name, data_dir, LAYOUT)
        records = read_json(folder / f"{split}.json", self.name, LAYOUT)
        samples = []
        for i, rec in enumerate(records):
            missing = [k for k in ("image", "question", "answers") if k not in rec]
            if missing:
                raise DataError(f"vizwiz: {split}.json entry #{i} lacks {', '.join(missing)}")
            answers = [a["answer"] if isinstance(a, dict) else str(a) for a in rec["answers"]]
            atype = rec.get("answer_type") or "other"
            samples.append(Sample(rec["image"], folder / split / rec["image"], {
                "question": rec["question"], "answers": answers, "answer_type": atype,
                "answerable": int(rec.get("answerable", atype != "unanswerable")),
            }))
        return samples

    def request(self, sample: Sample, *, scoring: str = "generate", demos: Sequence[Sample] = ()) -> Request:
        return Request(sample.id, f"{sample.data['question'].strip()}\n{POST_PROMPT}", sample.image,
                       max_new_tokens=16)

    def target(self, sample: Sample) -> str:
        if not sample.data["answerable"]:
            return "unanswerable"
        norm = [normalize_answer(a) for a in sample.data["answers"]]
        return min(set(norm), key=lambda a: (-norm.count(a), a))

    def score(self, sample: Sample, response: Response) -> dict[str, Any]:
        raw = response.text or ""
        pred = normalize_answer(raw)  # the submitted answer
        return {"raw": raw, "pred": pred, "accuracy": vizwiz_accuracy(pred, sample.data["answers"]),
                "answer_type": sample.data["answer_type"], "pred_unanswerable": pred == "unanswerable",
                "gold_unanswerable": not sample.data["answerable"]}

    def aggregate(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        out = aggregate_vqa(records)
        pr = unanswerable_precision_recall([r["pred_unanswerable"] for r in records],
                                           [r["gold_unanswerable"] for r in records])
        out["unans_precision"] = pr["precision"]
        out["unans_recall"] = pr["recall"]
        return out

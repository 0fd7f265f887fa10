"""Hateful Memes few-shot (`hm`): rank classification of "yes"/"no", scored by ROC AUC (primary) and accuracy.

Data, from `--data-dir` (or the embedded sample set): official `train.jsonl`, `dev_seen.jsonl`, `test_seen.jsonl`
(lines {id, img: "img/NNNNN.png", label 0/1, text}) and the `img/` folder; the evaluation split is `dev_seen`.

Protocol (OpenFlamingo): for the query, the log-probabilities of the answers "yes" and "no" after
"is an image with: '{text}' written on it. Is it hateful? Answer:" are length-normalised (mean per token);
P(yes) from a softmax over the two feeds ROC AUC, and the larger one is the predicted label for accuracy.
Few-shot (`--shots 0,4,32`, also 8/16): demonstrations are drawn from `train` per query with a seed per trial
(`--trials N`, results averaged, spread reported) and never include the query itself. LLaVA-style checkpoints take
one image per conversation, so demonstrations are given as text only (caption, question and answer) before the
query, whose image is placed right before its own caption; 0-shot has no demonstration text at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qvlm_harness.metrics.classification import binary_accuracy, roc_auc
from qvlm_harness.task import SHOTS_FIGURE, Request, Response, Sample, Task, TaskMeta
from qvlm_harness.tasks._common import data_folder, read_jsonl

LAYOUT = "train.jsonl / dev_seen.jsonl / test_seen.jsonl (lines {id, img, label, text}) + img/"
IMAGE = "<image>"


def query_text(text: str) -> str:
    return f"is an image with: '{text.strip()}' written on it. Is it hateful? Answer:"


class HatefulMemes(Task):
    name = "hm"
    description = "Hateful Memes few-shot rank classification; ROC AUC and accuracy (--shots, --trials)"
    eval_split = "dev_seen"
    primary_metric = "auroc"
    metrics = ("auroc", "acc")
    data_layout = LAYOUT
    supports_shots = True
    scoring_modes = ("loglik",)
    report_meta = TaskMeta(
        label="HM", title="Hateful Memes", metrics=("auroc", "acc"), primary="auroc",
        metric_labels={"auroc": "AUROC", "acc": "Acc"}, metric_names={"auroc": "ROC AUC", "acc": "accuracy"},
        unit="%", varies_by_shots=True, figures=(SHOTS_FIGURE,),
        caption="Hateful Memes ROC AUC and accuracy (%) by number of in-context examples (mean over seeded trials, "
                "± their standard deviation).",
        table_title="Hateful Memes by shots")

    def load(self, split: str, data_dir: Path | None = None) -> list[Sample]:
        split = self.resolve_split(split)
        folder = data_folder(self.name, data_dir, LAYOUT)
        rows = read_jsonl(folder / f"{split}.jsonl", self.name, LAYOUT, required=("id", "img", "text"))
        return [Sample(str(r["id"]), folder / r["img"], {"text": r["text"], "label": r.get("label")}) for r in rows]

    def request(self, sample: Sample, *, scoring: str = "loglik", demos: Sequence[Sample] = ()) -> Request:
        context = "".join(f"An image with: '{d.data['text'].strip()}' written on it. Is it hateful? Answer: "
                          f"{self.target(d)}\n" for d in demos)
        return Request(sample.id, f"{context}{IMAGE}{query_text(sample.data['text'])}", sample.image,
                       kind="loglik", options=("yes", "no"))

    def target(self, sample: Sample) -> str:
        return "yes" if int(sample.data["label"]) == 1 else "no"

    def score(self, sample: Sample, response: Response) -> dict[str, Any]:
        (lp_yes, n_yes), (lp_no, n_no) = response.option_logprobs
        yes, no = lp_yes / max(n_yes, 1), lp_no / max(n_no, 1)
        p_yes = 1.0 / (1.0 + math.exp(no - yes))
        return {"p_yes": p_yes, "pred": int(yes > no), "label": int(sample.data["label"]),
                "correct": int(yes > no) == int(sample.data["label"])}

    def aggregate(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        labels = [r["label"] for r in records]
        return {"auroc": 100.0 * roc_auc(labels, [r["p_yes"] for r in records]),
                "acc": 100.0 * binary_accuracy(labels, [r["pred"] for r in records]), "n": float(len(records))}

"""ScienceQA (`sqa`): multiple-choice science questions with the LLaVA category breakdown.

Data, from `--data-dir` (or the embedded sample set):
- official: `problems.json` + `pid_splits.json` + `images/{split}/{pid}/image.png` (also `{split}/{pid}/...`);
- HF parquet (e.g. derek-thomas/ScienceQA): `{split}-*.parquet` or `data/{split}-*.parquet` with columns image,
  question, choices, answer, hint, task, grade, subject, topic, category, skill, lecture, solution.

Prompt (LLaVA-1.5 / lmms-eval): "Context: {hint}\\n" (only when there is a hint), the question, "A. ..." per
choice, then "Answer with the option's letter from the given choices directly." Scoring: greedy generation
parsed deterministically (an unparseable answer counts wrong and raises the parse-failure rate), or with
`--scoring loglik` the option letter with the highest log-likelihood (one forward pass per option).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qvlm_harness.errors import DataError
from qvlm_harness.metrics.sqa import aggregate_sqa, parse_answer, sqa_categories
from qvlm_harness.task import Request, Response, Sample, Task, TaskMeta
from qvlm_harness.tasks._common import data_folder, read_json

LAYOUT = ("problems.json + pid_splits.json + images/{split}/{pid}/image.png or {split}/{pid}/image.png "
          "(official ScienceQA), or {split}-*.parquet (HF layout)")
POST_PROMPT = "Answer with the option's letter from the given choices directly."
LETTERS = string.ascii_uppercase


def format_prompt(problem: dict[str, Any]) -> str:
    hint = (problem.get("hint") or "").strip()
    lines = [f"Context: {hint}"] if hint else []
    lines.append(problem["question"].strip())
    lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(problem["choices"])]
    lines.append(POST_PROMPT)
    return "\n".join(lines)


class ScienceQA(Task):
    name = "sqa"
    description = "ScienceQA multiple choice; accuracy by subject (NAT/SOC/LAN), context (TXT/IMG/NO), grade"
    eval_split = "test"
    primary_metric = "acc"
    metrics = ("acc", "NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "parse_fail")
    data_layout = LAYOUT
    scoring_modes = ("generate", "loglik")
    report_meta = TaskMeta(
        label="ScienceQA", metrics=("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "acc", "parse_fail"),
        primary="acc", metric_labels={"acc": "Avg", "parse_fail": "Parse fail %"},
        metric_names={"acc": "accuracy", "parse_fail": "parse-failure rate"}, unit="%",
        lower_is_better=("parse_fail",), unranked=("parse_fail",),  # a diagnostic: fewer is better, never "best"
        caption="ScienceQA accuracy (%) by category: natural science, social science, language science, text "
                "context, image context, no context, grades 1-6 and 7-12, and the average.",
        table_title="ScienceQA by category", paper_table=True)

    def load(self, split: str, data_dir: Path | None = None) -> list[Sample]:
        split = self.resolve_split(split)
        folder = data_folder(self.name, data_dir, LAYOUT)
        if (folder / "problems.json").exists() or not _parquet_files(folder, split):
            return self._load_official(folder, split)
        return self._load_parquet(folder, split)

    def _load_official(self, folder: Path, split: str) -> list[Sample]:
        problems = read_json(folder / "problems.json", self.name, LAYOUT)
        splits = read_json(folder / "pid_splits.json", self.name, LAYOUT)
        if split not in splits:
            raise DataError(f"sqa: split {split!r} not in {folder / 'pid_splits.json'} (has {', '.join(splits)})")
        roots = image_roots(folder, split)
        samples = []
        for pid in splits[split]:
            if pid not in problems:
                raise DataError(f"sqa: pid {pid} is listed in pid_splits.json but missing from problems.json")
            prob = problems[pid]
            _check_problem(prob, f"problems.json[{pid}]")
            image = None
            if prob.get("image"):
                candidates = [root / pid / prob["image"] for root in roots]
                image = next((c for c in candidates if c.exists()), candidates[0])  # a missing one: the layout's
            samples.append(Sample(id=str(pid), image=image, data=dict(prob)))
        return samples

    def _load_parquet(self, folder: Path, split: str) -> list[Sample]:
        import pandas as pd

        frames = [pd.read_parquet(p) for p in _parquet_files(folder, split)]
        df = pd.concat(frames, ignore_index=True)
        samples = []
        for i, row in enumerate(df.to_dict("records")):
            prob = {k: row.get(k) for k in ("question", "hint", "task", "grade", "subject", "topic", "category",
                                            "skill", "lecture", "solution")}
            prob["choices"] = [str(c) for c in row["choices"]]
            prob["answer"] = int(row["answer"])
            img = row.get("image")
            image = img.get("bytes") if isinstance(img, dict) else img
            prob["image"] = "image.png" if image else None
            _check_problem(prob, f"{split} parquet row {i}")
            samples.append(Sample(id=f"{split}-{i}", image=image or None, data=prob))
        return samples

    def request(self, sample: Sample, *, scoring: str = "generate", demos: Sequence[Sample] = ()) -> Request:
        prompt = format_prompt(sample.data)
        if scoring == "loglik":
            letters = [LETTERS[i] for i in range(len(sample.data["choices"]))]
            return Request(sample.id, prompt, sample.image, kind="loglik", options=letters)
        return Request(sample.id, prompt, sample.image, kind="generate", max_new_tokens=16)

    def target(self, sample: Sample) -> str:
        return LETTERS[int(sample.data["answer"])]

    def score(self, sample: Sample, response: Response) -> dict[str, Any]:
        prob = sample.data
        if response.option_logprobs:
            scores = [lp for lp, _ in response.option_logprobs]
            pred = max(range(len(scores)), key=lambda i: (scores[i], -i))
            raw = LETTERS[pred]
        else:
            raw = response.text or ""
            pred = parse_answer(raw, prob["choices"])
        return {
            "pred": pred, "pred_letter": LETTERS[pred] if pred is not None else None, "raw": raw,
            "answer": int(prob["answer"]), "correct": pred == int(prob["answer"]), "parsed": pred is not None,
            "subject": prob.get("subject"), "hint": prob.get("hint") or "", "image": prob.get("image"),
            "grade": prob.get("grade"), "categories": sqa_categories(prob),
        }

    def aggregate(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        return aggregate_sqa(records)


def image_roots(folder: Path, split: str) -> list[Path]:
    """Where the images of `split` may be, the layout the folder uses first: `images/{split}/` (the official
    download) or `{split}/` (as LLaVA's evaluation scripts unpack it). A missing image is then named in the
    folder's own layout, not in one it does not use."""
    roots = [folder / "images" / split, folder / split]
    return roots if roots[0].is_dir() or not roots[1].is_dir() else roots[::-1]


def _parquet_files(folder: Path, split: str) -> list[Path]:
    return sorted(folder.glob(f"{split}-*.parquet")) + sorted(folder.glob(f"data/{split}-*.parquet"))


def _check_problem(prob: dict, where: str) -> None:
    missing = [k for k in ("question", "choices", "answer") if k not in prob or prob[k] is None]
    if missing:
        raise DataError(f"sqa: {where} lacks {', '.join(missing)}; each problem needs question, choices, answer")
    if not 0 <= int(prob["answer"]) < len(prob["choices"]):
        raise DataError(f"sqa: {where} has answer index {prob['answer']} outside its {len(prob['choices'])} choices")

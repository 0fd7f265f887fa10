"""Helpers for the offline lm-eval test tasks `qvlm_sqa_mc`, `qvlm_sqa_gen` and `qvlm_sqa_embedded` (referenced with
`!function`).

The prompt is written here independently of the harness's `tasks/sqa.py` (the LLaVA-1.5 / lmms-eval ScienceQA
prompt), so a test comparing both catches any drift between the two. Only the generative variant's scoring borrows
the harness's answer parser, because its point is to reproduce the harness's own metric through lm-eval.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

HERE = Path(__file__).resolve().parent
POST_PROMPT = "Answer with the option's letter from the given choices directly."


def load_sqa_mini(**_kwargs):
    """The jsonl files beside this module as a DatasetDict (paths resolved here, so any working directory works)."""
    import datasets

    splits = {}
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (HERE / f"sqa_mini_{split}.jsonl").read_text().splitlines() if line]
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)


def load_sqa_embedded(**_kwargs):
    """The harness's whole embedded ScienceQA sample set (tasks/data/sqa, official layout) as a DatasetDict, items in
    `pid_splits.json` order like the native `sqa` task, so `--limit N` picks the same items for both."""
    import datasets

    from qvlm_harness.tasks._common import EMBEDDED

    folder = EMBEDDED / "sqa"
    problems = json.loads((folder / "problems.json").read_text())
    pid_splits = json.loads((folder / "pid_splits.json").read_text())
    splits = {}
    for split in ("train", "test"):
        rows = []
        for pid in pid_splits[split]:
            prob = problems[pid]
            image = str(folder / "images" / split / pid / prob["image"]) if prob.get("image") else None
            rows.append({"pid": pid, "question": prob["question"], "choices": list(prob["choices"]),
                         "answer": int(prob["answer"]), "hint": prob.get("hint") or "", "image": image})
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)


def doc_to_text(doc: dict) -> str:
    lines = [f"Context: {doc['hint'].strip()}"] if (doc.get("hint") or "").strip() else []
    lines.append(doc["question"].strip())
    lines += [f"{string.ascii_uppercase[i]}. {c}" for i, c in enumerate(doc["choices"])]
    lines.append(POST_PROMPT)
    return ("<image>" if doc.get("image") else "") + "\n".join(lines)


def doc_to_image(doc: dict) -> list:
    from PIL import Image

    if not doc.get("image"):
        return []
    with Image.open(HERE / doc["image"]) as img:
        return [img.convert("RGB")]


def doc_to_choice(doc: dict) -> list[str]:
    return list(string.ascii_uppercase[: len(doc["choices"])])


def doc_to_target(doc: dict) -> str:
    return string.ascii_uppercase[int(doc["answer"])]


def process_results_gen(doc: dict, results: list[str]) -> dict[str, float]:
    """Accuracy with the harness's deterministic ScienceQA parser (an unparseable answer is wrong)."""
    from qvlm_harness.metrics.sqa import parse_answer

    pred = parse_answer(results[0], doc["choices"])
    return {"acc": float(pred == int(doc["answer"])), "parse_fail": float(pred is None)}

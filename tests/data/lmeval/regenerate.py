"""Regenerate the offline lm-eval test task data from the embedded ScienceQA sample set (deterministic).

Writes, next to this file:
- `sqa/problems.json`, `sqa/pid_splits.json`, `sqa/images/{split}/{pid}/image.png`: the same items in the official
  ScienceQA layout, so the harness's own `sqa` task can score them (`--data-dir tests/data/lmeval`);
- `sqa_mini_{split}.jsonl`: one JSON object per item (question, choices, answer, hint, image path relative to this
  folder, subject, grade), read by the lm-eval YAML tasks `qvlm_sqa_mc` and `qvlm_sqa_gen` through `utils.py`.

Selection: from the embedded test split, the first four items of each kind (image without hint, image with hint),
then the first two text-only items without and with a hint (12 items); from the train split, the first four image
items (the few-shot / calibration pool). Run: `python tests/data/lmeval/regenerate.py`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parents[2] / "tasks" / "data" / "sqa"
FIELDS = ("question", "choices", "answer", "hint", "image", "subject", "grade", "task", "topic", "category", "skill")


def select(problems: dict, pids: list[str], split: str) -> list[str]:
    def kind(pid: str) -> tuple[bool, bool]:
        p = problems[pid]
        return bool(p.get("image")), bool((p.get("hint") or "").strip())

    if split == "train":
        return [pid for pid in pids if kind(pid)[0]][:4]
    picked: list[str] = []
    for want, n in (((True, False), 4), ((True, True), 4), ((False, False), 2), ((False, True), 2)):
        picked += [pid for pid in pids if kind(pid) == want][:n]
    return sorted(picked, key=int)


def main() -> None:
    problems = json.loads((SOURCE / "problems.json").read_text())
    splits = json.loads((SOURCE / "pid_splits.json").read_text())
    out = HERE / "sqa"
    if out.exists():
        shutil.rmtree(out)
    kept: dict[str, dict] = {}
    new_splits: dict[str, list[str]] = {}
    for split in ("train", "test"):
        pids = select(problems, splits[split], split)
        new_splits[split] = pids
        rows = []
        for pid in pids:
            prob = {k: problems[pid].get(k) for k in FIELDS} | {"split": split}
            kept[pid] = prob
            image = None
            if prob["image"]:
                dst = out / "images" / split / pid / prob["image"]
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(SOURCE / "images" / split / pid / prob["image"], dst)
                image = dst.relative_to(HERE).as_posix()
            rows.append({"pid": pid, **{k: prob[k] for k in FIELDS if k != "image"}, "image": image})
        (HERE / f"sqa_mini_{split}.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    out.mkdir(parents=True, exist_ok=True)
    (out / "problems.json").write_text(json.dumps(kept, indent=1, sort_keys=True) + "\n")
    (out / "pid_splits.json").write_text(json.dumps(new_splits | {"val": []}, indent=1) + "\n")


if __name__ == "__main__":
    main()

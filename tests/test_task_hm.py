"""Hateful Memes: official jsonl loader, rank classification scoring, AUROC, few-shot prompts, bad lines."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from qvlm_harness.errors import DataError
from qvlm_harness.task import Response
from qvlm_harness.tasks.hateful_memes import HatefulMemes


def write_hm(folder: Path) -> Path:
    (folder / "img").mkdir(parents=True)
    rows = {"train": [(101, 0, "a nice day"), (102, 1, "mean words"), (103, 0, "hello")],
            "dev_seen": [(201, 1, "mean caption"), (202, 0, "kind caption"), (203, 1, "other"), (204, 0, "x")]}
    for split, items in rows.items():
        lines = []
        for i, label, text in items:
            Image.new("RGB", (8, 8)).save(folder / "img" / f"{i:05d}.png")
            lines.append(json.dumps({"id": i, "img": f"img/{i:05d}.png", "label": label, "text": text}))
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_loader_and_prompt(tmp_path):
    task = HatefulMemes()
    samples = task.load("test", write_hm(tmp_path))
    assert [s.id for s in samples] == ["201", "202", "203", "204"]
    req = task.request(samples[0])
    assert req.kind == "loglik" and tuple(req.options) == ("yes", "no")
    assert req.prompt == "<image>is an image with: 'mean caption' written on it. Is it hateful? Answer:"


def test_few_shot_demonstrations_are_text_only_before_the_query(tmp_path):
    task = HatefulMemes()
    data = write_hm(tmp_path)
    demos = task.load("train", data)[:2]
    req = task.request(task.load("test", data)[0], demos=demos)
    lines = req.prompt.split("\n")
    assert lines[0] == "An image with: 'a nice day' written on it. Is it hateful? Answer: no"
    assert lines[1] == "An image with: 'mean words' written on it. Is it hateful? Answer: yes"
    assert lines[2].startswith("<image>is an image with: 'mean caption'")


def test_length_normalised_scores_feed_auroc_like_sklearn(tmp_path):
    task = HatefulMemes()
    samples = task.load("dev_seen", write_hm(tmp_path))
    # (logprob yes, n tokens), (logprob no, n tokens) per sample; normalised by token count
    option_lp = [[(-1.0, 1), (-4.0, 2)], [(-3.0, 1), (-1.0, 1)], [(-2.0, 2), (-1.5, 1)], [(-0.5, 1), (-0.2, 1)]]
    records = [task.score(s, Response(option_logprobs=lp)) for s, lp in zip(samples, option_lp, strict=True)]
    p_yes = [r["p_yes"] for r in records]
    expected = [1 / (1 + math.exp(ny / nn - y / n)) for (y, n), (ny, nn) in option_lp]
    assert p_yes == pytest.approx(expected)
    agg = task.aggregate(records)
    assert agg["auroc"] == pytest.approx(100 * roc_auc_score([1, 0, 1, 0], p_yes))
    # predictions: yes(-1 > -2), no, yes (-1 > -1.5), no -> labels 1,0,1,0 -> all correct
    assert agg["acc"] == 100.0


def test_malformed_line_names_file_and_line(tmp_path):
    write_hm(tmp_path)
    path = tmp_path / "dev_seen.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = "{broken"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as exc:
        HatefulMemes().load("dev_seen", tmp_path)
    assert "dev_seen.jsonl:3" in str(exc.value) and "\n" not in str(exc.value)
    lines[2] = json.dumps({"id": 5, "text": "no image field"})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"dev_seen.jsonl:3 lacks field\(s\) img"):
        HatefulMemes().load("dev_seen", tmp_path)


def test_missing_split_file(tmp_path):
    write_hm(tmp_path)
    with pytest.raises(DataError, match="missing test_unseen.jsonl"):
        HatefulMemes().load("test_unseen", tmp_path)


def test_trials_with_an_undefined_metric_give_nan_not_a_crash():
    import math

    from qvlm_harness.task import aggregate_trials

    task = HatefulMemes()
    one_class = [{"trial": t, "record": {"label": 0, "p_yes": 0.1 * (i + 1), "pred": 0, "correct": True}}
                 for t in range(2) for i in range(3)]
    out = aggregate_trials(task, one_class, 2)
    assert math.isnan(out["auroc"]) and math.isnan(out["auroc_std"]) and out["acc"] == 100.0
    assert out["acc_std"] == 0.0

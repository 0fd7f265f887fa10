"""The embedded sample sets: deterministic regeneration and the invariants each format promises."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from qvlm_harness.tasks.samples import build as sample_build
from qvlm_harness.tasks.samples import generators as g

pytest.importorskip("easy_vqa")


def test_rebuild_matches_committed_manifests(capsys):
    assert sample_build.main(["--check"]) == 0
    out = capsys.readouterr().out
    assert out.count("identical") == 4


def test_sqa_problems_are_well_formed_and_balanced():
    problems = json.loads((sample_build.DEFAULT_OUT / "sqa" / "problems.json").read_text())
    test = [p for p in problems.values() if p["split"] == "test"]
    assert all(0 <= p["answer"] < len(p["choices"]) and len(set(p["choices"])) == len(p["choices"]) for p in test)
    subjects = Counter(p["subject"] for p in test)
    assert set(subjects) == {"natural science", "social science", "language science"}
    with_image = sum(bool(p["image"]) for p in test)
    assert 0.4 < with_image / len(test) < 0.8
    # the correct letter is spread over positions (no position bias to exploit)
    for n in (2, 3):
        answers = Counter(p["answer"] for p in test if len(p["choices"]) == n)
        assert min(answers.values()) / max(answers.values()) > 0.6


def test_text_only_pools_are_disjoint_between_train_and_test():
    assert not set(g._split_pool(g.COUNTRIES, "train")) & set(g._split_pool(g.COUNTRIES, "test"))
    assert not set(g._split_pool(g.NONSENSE, "train")) & set(g._split_pool(g.NONSENSE, "test"))


def test_vqav2_has_ten_answers_with_some_disagreement():
    ann = json.loads((sample_build.DEFAULT_OUT / "vqav2" / "v2_mscoco_val2014_annotations.json").read_text())
    answers = [[a["answer"] for a in x["answers"]] for x in ann["annotations"]]
    assert all(len(a) == 10 for a in answers)
    disagree = sum(len(set(a)) > 1 for a in answers) / len(answers)
    assert 0.2 < disagree < 0.9
    assert {x["answer_type"] for x in ann["annotations"]} == {"yes/no", "number", "other"}


def test_vizwiz_has_unanswerable_questions():
    val = json.loads((sample_build.DEFAULT_OUT / "vizwiz" / "val.json").read_text())
    unans = [x for x in val if x["answerable"] == 0]
    assert 0.15 < len(unans) / len(val) < 0.4
    assert all(x["answer_type"] == "unanswerable" for x in unans)
    assert all(Counter(a["answer"] for a in x["answers"]).most_common(1)[0][0] == "unanswerable" for x in unans)


def test_hateful_memes_label_needs_both_modalities():
    """The same caption appears with label 1 and label 0 (benign confounders), so text alone cannot decide."""
    lines = [json.loads(x) for x in (sample_build.DEFAULT_OUT / "hm" / "train.jsonl").read_text().splitlines()]
    lines += [json.loads(x) for x in (sample_build.DEFAULT_OUT / "hm" / "dev_seen.jsonl").read_text().splitlines()]
    by_template = {}
    for x in lines:
        template = x["text"].split(" ", 1)[1] if x["text"].split(" ", 1)[0] in g.COLORS else x["text"]
        by_template.setdefault(template, set()).add(x["label"])
    assert any(labels == {0, 1} for labels in by_template.values())
    assert 0.4 < sum(x["label"] for x in lines) / len(lines) < 0.6


def test_choices_helper_is_uniform_over_positions():
    rng = random.Random(0)
    positions = Counter(g._choices(rng, "x", ["a", "b", "c"], 3)[1] for _ in range(3000))
    assert all(abs(c - 1000) < 120 for c in positions.values())

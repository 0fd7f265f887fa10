"""ScienceQA loader (official + HF parquet layouts), prompt, scoring and category arithmetic on fixtures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from qvlm_harness.errors import DataError
from qvlm_harness.task import Response
from qvlm_harness.tasks.sqa import ScienceQA, format_prompt

PROBLEMS = {
    # pid: (subject, hint, has image, grade, answer, choices)
    "1": ("natural science", "", True, "grade2", 1, ["circle", "triangle"]),
    "2": ("natural science", "A trigon has three corners.", False, "grade8", 0, ["trigon", "orb", "quad"]),
    "3": ("social science", "On the map, red marks the bank.", True, "grade5", 2, ["zoo", "farm", "bank"]),
    "4": ("language science", "", False, "grade1", 0, ["green", "table"]),
    "5": ("language science", "The red dog sat.", False, "grade9", 1, ["dog", "red"]),
    "6": ("social science", "", False, "grade3", 0, ["Asia", "Ohio"]),
}


def write_official(folder: Path, split: str = "test") -> Path:
    problems = {}
    for pid, (subject, hint, has_image, grade, answer, choices) in PROBLEMS.items():
        problems[pid] = {"question": f"Question {pid}?", "choices": choices, "answer": answer, "hint": hint,
                         "image": "image.png" if has_image else None, "task": "closed choice", "grade": grade,
                         "subject": subject, "topic": "t", "category": "c", "skill": "s", "lecture": "",
                         "solution": "", "split": split}
        if has_image:
            (folder / "images" / split / pid).mkdir(parents=True)
            Image.new("RGB", (20, 20), (255, 0, 0)).save(folder / "images" / split / pid / "image.png")
    (folder / "problems.json").write_text(json.dumps(problems))
    (folder / "pid_splits.json").write_text(json.dumps({split: list(PROBLEMS), "train": []}))
    return folder


def test_official_loader_reads_all_fields_and_images(tmp_path):
    samples = ScienceQA().load("test", write_official(tmp_path))
    assert [s.id for s in samples] == list(PROBLEMS)
    assert samples[0].image == tmp_path / "images" / "test" / "1" / "image.png"
    assert samples[1].image is None
    assert samples[2].data["choices"] == ["zoo", "farm", "bank"]


def test_prompt_matches_llava_format():
    prob = {"question": "Which is north?", "choices": ["Ohio", "Maine"], "hint": "A map."}
    assert format_prompt(prob) == ("Context: A map.\nWhich is north?\nA. Ohio\nB. Maine\n"
                                   "Answer with the option's letter from the given choices directly.")
    assert not format_prompt(prob | {"hint": ""}).startswith("Context")


def test_category_arithmetic_against_hand_computed_values(tmp_path):
    task = ScienceQA()
    samples = task.load("test", write_official(tmp_path))
    # model answers: pid1 right (B), pid2 wrong (B), pid3 right ("C."), pid4 unparseable, pid5 right, pid6 wrong
    outputs = {"1": "B", "2": "B", "3": "C.", "4": "I think so", "5": "B", "6": "B"}
    records = [task.score(s, Response(text=outputs[s.id])) for s in samples]
    agg = task.aggregate(records)
    # correct = {1, 3, 5}; NAT = {1, 2} -> 1/2; SOC = {3, 6} -> 1/2; LAN = {4, 5} -> 1/2
    # TXT (hint) = {2, 3, 5} -> 2/3; IMG = {1, 3} -> 2/2; NO = {4, 6} -> 0/2
    # G1-6 = {1, 3, 4, 6} -> 2/4; G7-12 = {2, 5} -> 1/2; parse failures = {4} -> 1/6
    expected = {"acc": 50.0, "NAT": 50.0, "SOC": 50.0, "LAN": 50.0, "TXT": 200 / 3, "IMG": 100.0, "NO": 0.0,
                "G1-6": 50.0, "G7-12": 50.0, "parse_fail": 100 / 6}
    for key, value in expected.items():
        assert agg[key] == pytest.approx(value), key


def test_unparseable_answer_is_wrong_and_deterministic(tmp_path):
    task = ScienceQA()
    sample = task.load("test", write_official(tmp_path))[0]
    rec = [task.score(sample, Response(text="hmm, hard to say")) for _ in range(5)]
    assert all(r["pred"] is None and not r["correct"] and not r["parsed"] for r in rec)


def test_loglik_scoring_picks_highest_option(tmp_path):
    task = ScienceQA()
    sample = task.load("test", write_official(tmp_path))[2]
    req = task.request(sample, scoring="loglik")
    assert req.kind == "loglik" and list(req.options) == ["A", "B", "C"]
    rec = task.score(sample, Response(option_logprobs=[(-3.0, 1), (-2.0, 1), (-0.5, 1)]))
    assert rec["pred"] == 2 and rec["correct"]


def test_hf_parquet_layout(tmp_path):
    pd = pytest.importorskip("pandas")
    import io

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    df = pd.DataFrame([
        {"image": {"bytes": buf.getvalue(), "path": None}, "question": "Q1?", "choices": ["a", "b"], "answer": 1,
         "hint": "", "task": "closed choice", "grade": "grade3", "subject": "natural science", "topic": "x",
         "category": "y", "skill": "z", "lecture": "", "solution": ""},
        {"image": None, "question": "Q2?", "choices": ["c", "d", "e"], "answer": 0, "hint": "ctx",
         "task": "closed choice", "grade": "grade10", "subject": "language science", "topic": "x",
         "category": "y", "skill": "z", "lecture": "", "solution": ""},
    ])
    (tmp_path / "data").mkdir()
    df.to_parquet(tmp_path / "data" / "test-00000-of-00001.parquet")
    samples = ScienceQA().load("test", tmp_path)
    assert len(samples) == 2
    assert isinstance(samples[0].image, bytes) and samples[1].image is None
    assert samples[1].data["choices"] == ["c", "d", "e"] and samples[1].data["grade"] == "grade10"


def test_missing_files_name_the_expected_layout(tmp_path):
    with pytest.raises(DataError) as exc:
        ScienceQA().load("test", tmp_path)
    msg = str(exc.value)
    assert "problems.json" in msg and str(tmp_path) in msg and "\n" not in msg
    with pytest.raises(DataError, match="does not exist"):
        ScienceQA().load("test", tmp_path / "nope")


def test_malformed_json_and_bad_answer_index(tmp_path):
    write_official(tmp_path)
    (tmp_path / "problems.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        ScienceQA().load("test", tmp_path)
    problems = {"1": {"question": "q", "choices": ["a"], "answer": 3}}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1"]}))
    with pytest.raises(DataError, match="outside its 1 choices"):
        ScienceQA().load("test", tmp_path)


def test_unknown_split_lists_known_ones(tmp_path):
    with pytest.raises(DataError, match="has test, train"):
        ScienceQA().load("minival", write_official(tmp_path))


def test_embedded_sample_set_loads_with_categories():
    task = ScienceQA()
    samples = task.load("test")
    assert len(samples) == 600
    records = [task.score(s, Response(text="A")) for s in samples]
    agg = task.aggregate(records)
    for key in ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12"):
        assert agg[f"n_{key}"] > 20 and not math.isnan(agg[key]), key
    assert agg["parse_fail"] == 0.0
    assert all(s.image is None or Path(s.image).is_file() for s in samples)

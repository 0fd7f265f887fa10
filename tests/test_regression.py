"""Regression comparison: a planted regression is caught, sample noise is not, intervals match a brute-force
paired bootstrap, recovery follows llm-compressor's rule, and `harness compare` exits 1 on a regression."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from qvlm_harness.regression import CellScores, compare, format_comparison, load_baseline, save_baseline

N = 200


def vqa_cell(method: str, bits: str, acc: np.ndarray, task: str = "vqav2") -> CellScores:
    entries = [{"trial": 0, "id": f"q{i}", "record": {"accuracy": float(a), "answer_type": "other"}}
               for i, a in enumerate(acc)]
    return CellScores(method, bits, task, 0, {"acc": 100 * float(np.mean(acc)), "other": 100 * float(np.mean(acc)),
                                              "n_acc": float(len(acc))}, entries)


def base_scores(seed: int = 0, p: float = 0.7) -> np.ndarray:
    return (np.random.default_rng(seed).random(N) < p).astype(float)


def flip(acc: np.ndarray, down: int, up: int, seed: int = 1) -> np.ndarray:
    """`down` correct answers become wrong and `up` wrong ones become right."""
    out = acc.copy()
    rng = np.random.default_rng(seed)
    out[rng.choice(np.flatnonzero(acc == 1), down, replace=False)] = 0
    out[rng.choice(np.flatnonzero(acc == 0), up, replace=False)] = 1
    return out


def check(comp, bits: str, metric: str = "acc"):
    return next(c for c in comp.checks if c.key[1] == bits and c.metric == metric)


def test_identical_run_is_exactly_zero_and_passes():
    acc = base_scores()
    comp = compare([vqa_cell("rtn", "w8a8", acc)], [vqa_cell("rtn", "w8a8", acc)])
    c = check(comp, "w8a8")
    assert tuple(c.delta) == (0.0, 0.0, 0.0) and c.status == "ok" and comp.ok


def test_planted_regression_is_caught_and_named():
    acc = base_scores()
    worse = flip(acc, down=30, up=0)  # 15 points lost
    comp = compare([vqa_cell("rtn", "w4a4", worse)], [vqa_cell("rtn", "w4a4", acc)])
    c = check(comp, "w4a4")
    assert c.delta.estimate == pytest.approx(-15.0)
    assert c.delta.high < 0 and c.status == "regressed" and c.failed and not comp.ok
    text = format_comparison(comp)
    assert "REGRESSION: 1 check(s) failed" in text and "rtn w4a4 vqav2" in text


def test_noise_within_the_interval_is_not_a_regression():
    acc = base_scores()
    noisy = flip(acc, down=6, up=4)  # answers churn, the mean moves by 1 point
    comp = compare([vqa_cell("rtn", "w8a8", noisy)], [vqa_cell("rtn", "w8a8", acc)])
    c = check(comp, "w8a8")
    assert c.delta.estimate == pytest.approx(-1.0)
    assert c.delta.low < 0 < c.delta.high and c.status == "ok" and comp.ok


def test_interval_equals_brute_force_paired_bootstrap():
    """Independent reference: resample question indices with the same generator and take percentiles."""
    acc = base_scores()
    cur = flip(acc, down=12, up=3)
    comp = compare([vqa_cell("rtn", "w8a8", cur)], [vqa_cell("rtn", "w8a8", acc)], n_resamples=500, seed=7)
    order = sorted(range(N), key=lambda i: f"q{i}")  # samples are paired in the order of their sorted ids
    cur, acc = cur[order], acc[order]
    idx = np.random.default_rng(7).integers(0, N, size=(500, N))
    deltas = 100 * (cur[idx].mean(axis=1) - acc[idx].mean(axis=1))
    low, high = np.quantile(deltas, [0.025, 0.975])
    c = check(comp, "w8a8")
    assert c.delta.low == pytest.approx(low) and c.delta.high == pytest.approx(high)
    assert c.delta.estimate == pytest.approx(100 * (cur.mean() - acc.mean()))


def test_auroc_delta_uses_the_task_aggregate():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, N)
    good = np.clip(0.5 + 0.3 * (labels - 0.5) + rng.normal(0, 0.2, N), 0, 1)
    bad = np.clip(0.5 + rng.normal(0, 0.2, N), 0, 1)

    def hm_cell(p):
        entries = [{"trial": 0, "id": str(i), "record": {"p_yes": float(x), "pred": int(x > 0.5),
                                                          "label": int(y), "correct": int(x > 0.5) == int(y)}}
                   for i, (x, y) in enumerate(zip(p, labels, strict=True))]
        return CellScores("rtn", "w4a4", "hm", 0, {"auroc": 100 * roc_auc_score(labels, p), "acc": 0.0}, entries)

    comp = compare([hm_cell(bad)], [hm_cell(good)], n_resamples=300)
    c = check(comp, "w4a4", "auroc")
    assert c.delta.estimate == pytest.approx(100 * (roc_auc_score(labels, bad) - roc_auc_score(labels, good)))
    assert c.status == "regressed" and c.gated  # auroc is hm's primary metric
    assert not check(comp, "w4a4", "acc").gated


def test_recovery_threshold_against_fp():
    fp = base_scores(p=0.8)
    q_ok = flip(fp, down=4, up=0)  # 0.975 x FP
    q_low = flip(fp, down=20, up=0)  # 0.875 x FP
    base = [vqa_cell("fp32", "fp", fp), vqa_cell("rtn", "w8a8", q_ok), vqa_cell("rtn", "w4a4", q_low)]
    # same as the baseline: w4a4 is below 0.95 x FP but already was, so it is known, not a regression
    comp = compare(base, base)
    assert check(comp, "w8a8").status == "ok"
    assert check(comp, "w4a4").status == "known-below-recovery" and comp.ok
    assert check(comp, "w4a4").recovery == pytest.approx(q_low.mean() / fp.mean())
    # w8a8 slips below the threshold by 2.5 points, within sample noise: shown, not failed
    q_dropped = flip(q_ok, down=6, up=1, seed=5)
    comp = compare([base[0], vqa_cell("rtn", "w8a8", q_dropped), base[2]], base)
    c = check(comp, "w8a8")
    assert c.recovery < 0.95 and c.status == "near-recovery" and comp.ok
    assert c.recovery_margin.low < 0 < c.recovery_margin.high
    # a new cell far below 0.95 x FP (no baseline to compare with): significantly below the threshold, fails
    q_bad = flip(fp, down=40, up=0)
    comp = compare([*base, vqa_cell("rtn", "w6a6", q_bad)], base)
    c = check(comp, "w6a6")
    assert c.status == "below-recovery" and c.recovery_margin.high < 0 and not comp.ok and not comp.missing
    # independent check of the margin's point value: quantized - 0.95 x FP, in points
    assert c.recovery_margin.estimate == pytest.approx(100 * (q_bad.mean() - 0.95 * fp.mean()))
    # a per-bits threshold relaxes it
    assert compare([*base, vqa_cell("rtn", "w6a6", q_bad)], base, recovery_for={"w6a6": 0.5}).ok


def test_missing_cell_fails_and_min_drop_tolerates_small_significant_drops():
    acc = base_scores()
    comp = compare([vqa_cell("rtn", "w8a8", acc)], [vqa_cell("rtn", "w8a8", acc), vqa_cell("rtn", "w4a4", acc)])
    assert comp.missing == ["rtn w4a4 vqav2"] and not comp.ok
    slightly = flip(acc, down=8, up=0)  # -4 points, every flip one way: significant
    assert not compare([vqa_cell("rtn", "w8a8", slightly)], [vqa_cell("rtn", "w8a8", acc)]).ok
    assert compare([vqa_cell("rtn", "w8a8", slightly)], [vqa_cell("rtn", "w8a8", acc)], min_drop=10).ok


def test_baseline_of_other_model_weights_is_stale():
    acc = base_scores()
    cur, base = vqa_cell("rtn", "w8a8", acc), vqa_cell("rtn", "w8a8", acc)
    cur.info["model_fingerprint"], base.info["model_fingerprint"] = "new", "old"
    comp = compare([cur], [base])
    assert comp.stale and not comp.ok and "STALE BASELINE" in format_comparison(comp)
    assert compare([cur], [base], allow_model_change=True).ok


def test_deterministic_for_a_seed():
    acc = base_scores()
    cur = flip(acc, down=10, up=5)
    a = compare([vqa_cell("rtn", "w8a8", cur)], [vqa_cell("rtn", "w8a8", acc)], seed=3)
    b = compare([vqa_cell("rtn", "w8a8", cur)], [vqa_cell("rtn", "w8a8", acc)], seed=3)
    assert [c.delta for c in a.checks] == [c.delta for c in b.checks]


def test_baseline_file_round_trip(tmp_path):
    cells = [vqa_cell("rtn", "w8a8", base_scores()), vqa_cell("fp32", "fp", base_scores(1))]
    cells[0].metrics["other"] = float("nan")
    path = save_baseline(cells, tmp_path / "b.json", name="b", source={"run": "x"})
    json.loads(path.read_text())  # valid JSON
    meta, loaded = load_baseline(path)
    assert meta["name"] == "b" and meta["format"] == "qvlm-harness-baseline"
    by_key = {c.key: c for c in loaded}
    assert by_key[cells[0].key].entries == sorted(cells[0].entries, key=lambda e: e["id"])
    assert np.isnan(by_key[cells[0].key].metrics["other"])
    assert compare(cells, loaded).ok


def test_cli_compare_exit_codes(capsys, tmp_path, tiny_model_dir):
    from qvlm_harness.cli import main

    out = tmp_path / "out"
    assert main(["run", "--methods", "fp32", "--tasks", "hm", "--model", str(tiny_model_dir), "--limit", "24",
                 "--output", str(out), "--no-progress"]) == 0
    assert main(["compare", "--output", str(out), "--save-baseline", str(tmp_path / "b.json")]) == 0
    assert main(["compare", "--output", str(out), "--baseline", str(tmp_path / "b.json")]) == 0
    assert "OK: no regression" in capsys.readouterr().out
    # plant a better baseline: every hateful meme got a high p_yes, every benign one a low one
    data = json.loads((tmp_path / "b.json").read_text())
    for s in data["cells"][0]["samples"]:
        s["record"]["p_yes"] = 0.9 if s["record"]["label"] else 0.1
    data["cells"][0]["metrics"]["auroc"] = 100.0
    (tmp_path / "better.json").write_text(json.dumps(data))
    assert main(["compare", "--output", str(out), "--baseline", str(tmp_path / "better.json"),
                 "--json", str(tmp_path / "cmp.json")]) == 1
    text = capsys.readouterr().out
    assert "REGRESSION" in text and "fp32 fp hm" in text
    assert json.loads((tmp_path / "cmp.json").read_text())["ok"] is False
    assert main(["compare", "--output", str(out), "--baseline", "nope", "--baselines-dir", str(tmp_path)]) == 2


def test_a_task_scored_two_ways_is_two_cells_each_against_its_own_fp():
    """One suite holds sqa by generation and by log-likelihood: both cells are kept (newest per scoring, not per
    task), and each one's recovery is measured against the FP cell scored the same way."""
    fp_gen, fp_ll = base_scores(p=0.8), base_scores(seed=3, p=0.5)
    q = flip(fp_ll, down=2, up=0)  # 0.98 x the loglik FP, but only ~0.61 x the generation FP

    def cell(method, bits, acc, scoring):
        c = vqa_cell(method, bits, acc)
        c.info["scoring"] = scoring
        return c

    cells = [cell("fp32", "fp", fp_gen, "generate"), cell("fp32", "fp", fp_ll, "loglik"),
             cell("rtn", "w8a8", q, "loglik")]
    comp = compare(cells, cells)
    assert len({c.key for c in comp.checks}) == 3 and comp.ok
    rtn = check(comp, "w8a8")
    assert rtn.key[4] == "loglik" and rtn.recovery == pytest.approx(q.mean() / fp_ll.mean())
    assert "(loglik)" in rtn.cell and "(loglik)" in format_comparison(comp)

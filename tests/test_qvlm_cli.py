"""CLI on the tiny model: `harness quantize/eval` with qvlm, `harness analyze dependency`, `harness ablate`."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from qvlm_harness.cli import main
from qvlm_harness.store import Store


def test_qvlm_checkpoint_saves_and_evaluates(tiny_model_dir, tmp_path, monkeypatch):
    ck = tmp_path / "ck"
    assert main(["quantize", "--method", "qvlm", "--bits", "w4a4", "--model", str(tiny_model_dir),
                 "--calib-samples", "4", "--method-option", "qvlm.iters=1", "--output", str(ck)]) == 0
    manifest = json.loads((ck / "manifest.json").read_text())
    assert manifest["method"] == "qvlm" and manifest["execution"] == "simulated"
    assert manifest["report"]["partition"]["block_sizes_after"]["lm"]
    import qvlm_harness.methods.qvlm.method

    def boom(*a, **k):
        raise AssertionError("eval must not re-quantize")

    monkeypatch.setattr(qvlm_harness.methods.qvlm.method.QVLM, "quantize", boom)
    out = tmp_path / "out"
    assert main(["eval", "--model", str(ck), "--tasks", "sqa", "--limit", "2", "--output", str(out),
                 "--no-progress", "--max-new-tokens", "2"]) == 0
    rows = list(Store(out / "harness.db").rows())
    assert [(r.method, r.bits, r.execution) for r in rows] == [("qvlm", "w4a4", "simulated")]


def test_analyze_dependency_writes_table_json_and_plot(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "an"
    assert main(["analyze", "dependency", "--model", str(tiny_model_dir), "--task", "sqa", "--calib-samples", "4",
                 "--iters", "2", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "R^2(entropy, DED) over layers" in printed and "R^2 over samples" in printed
    files = sorted(p.suffix for p in out.rglob("dependency-*"))
    assert files == [".csv", ".json", ".png"]
    summary = json.loads(next(out.rglob("*.json")).read_text())
    pair = summary["stacks"]["lm"]["pairs"][0]
    assert pair["error_joint"] <= pair["error_layerwise"] and len(pair["sample_ded"]) == 4
    # the sequence-length control: valid tokens per sample, in the analysis's sample order, from an independent
    # tokenisation of the same seeded calibration samples
    from qvlm_harness import plugins
    from qvlm_harness.calibration import CalibrationSet
    from qvlm_harness.methods.qvlm.units import build_batches
    from qvlm_harness.models.llava import LlavaAdapter

    calib = CalibrationSet.from_task(plugins.tasks.get("sqa")(), 4, 0, None)
    batches = build_batches(LlavaAdapter.load(tiny_model_dir), calib, 2)
    assert pair["sample_tokens"] == [int(m.sum()) for b in batches for m in b.token_mask]
    assert pair["r_tokens_ded"] == pytest.approx(float(np.corrcoef(pair["sample_tokens"], pair["sample_ded"])[0, 1]))
    assert "control: r(tokens, DED)" in printed
    table = pd.read_csv(next(out.rglob("*.csv")))
    assert list(table["ded"]) == pytest.approx([pair["ded"]])
    assert main(["analyze", "dependency", "--model", str(tiny_model_dir), "--calib-samples", "2"]) == 2


def test_ablate_runs_the_grid_and_writes_both_tables(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ab"
    assert main(["ablate", "qvlm", "--param", "max_depth=1,2", "--param", "iters=0", "--model", str(tiny_model_dir),
                 "--bits", "w4a4", "--limit", "2", "--calib-samples", "4", "--no-progress",
                 "--max-new-tokens", "2", "--output", str(out)]) == 0
    csv = next((out / "ablation").glob("qvlm-*.csv"))
    table = pd.read_csv(csv)
    assert sorted(table["max_depth"]) == [1, 2]
    assert {"search_s", "peak_rss_mb", "blocks", "mean_block"} <= set(table.columns)
    by_depth = table.set_index("max_depth")
    assert by_depth.loc[1, "mean_block"] == 1.0 and by_depth.loc[2, "blocks"] <= by_depth.loc[1, "blocks"]
    assert "search cost" in (csv.with_suffix(".md")).read_text()
    capsys.readouterr()
    assert main(["ablate", "qvlm", "--param", "depth=1", "--model", str(tiny_model_dir), "--output", str(out)]) == 2
    assert "no option(s) depth" in capsys.readouterr().err

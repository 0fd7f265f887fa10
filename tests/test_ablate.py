"""`harness ablate` is generic: any method's options; the method-specific summary columns come from the method's
own `report_columns` hook (Q-VLM's block counts are tested end to end in test_qvlm_cli.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd

from qvlm_harness import plugins
from qvlm_harness.cli import main
from qvlm_harness.commands.ablate import _record


def test_ablate_of_a_method_without_report_columns_has_only_the_generic_cost_columns(tiny_model_dir, tmp_path):
    out = tmp_path / "ab"
    assert main(["ablate", "rtn", "--param", "observer=minmax,mse", "--model", str(tiny_model_dir), "--bits", "w8a8",
                 "--limit", "2", "--calib-samples", "2", "--no-progress", "--max-new-tokens", "2",
                 "--output", str(out)]) == 0
    csv = next((out / "ablation").glob("rtn-*.csv"))
    table = pd.read_csv(csv)
    assert sorted(table["observer"]) == ["minmax", "mse"]
    generic = {"observer", "bits", "task", "metric", "value", "search_s", "peak_rss_mb"}
    assert {c for c in table.columns if not c.startswith("stage_")} == generic
    md = csv.with_suffix(".md").read_text()
    assert "blocks" not in md and "search_s" in md


def test_method_columns_join_the_record_without_replacing_the_generic_ones():
    row = SimpleNamespace(bits="w4a4", task="sqa", metrics={"acc": 50.0}, settings={"report": {"k": 3}},
                          search_cost={"seconds": 1.26, "peak_rss_mb": 100.4, "stages": {"search": 0.94}})
    rec = _record({"p": 0.5}, row, "acc", lambda report: {"bits": "w1", "k_twice": report["k"] * 2})
    assert rec == {"p": 0.5, "bits": "w4a4", "task": "sqa", "metric": "acc", "value": 50.0, "search_s": 1.3,
                   "peak_rss_mb": 100.0, "k_twice": 6, "stage_search": 0.9}


def test_report_columns_default_and_qvlm_block_summary():
    assert plugins.methods.get("gptq").report_columns({"anything": 1}) == {}
    qvlm = plugins.methods.get("qvlm")
    sizes = {"vision": [1, 2], "lm": [3, 1, 1]}
    flat = [s for v in sizes.values() for s in v]
    assert qvlm.report_columns({"partition": {"block_sizes_after": sizes}}) == {
        "blocks": len(flat), "mean_block": round(sum(flat) / len(flat), 2)}
    assert qvlm.report_columns({}) == {"blocks": None, "mean_block": None}

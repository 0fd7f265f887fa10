"""CLI: `harness quantize` -> `harness eval` on the tiny model (no re-quantization), and every baseline through
`harness run` end to end."""

from __future__ import annotations

import json

import pytest

from qvlm_harness.cli import main
from qvlm_harness.store import Store


def test_quantize_then_eval_uses_the_stored_model(tiny_model_dir, tmp_path, capsys, monkeypatch):
    ck = tmp_path / "ck"
    assert main(["quantize", "--method", "qlora", "--bits", "w4a16", "--model", str(tiny_model_dir),
                 "--output", str(ck)]) == 0
    manifest = json.loads((ck / "manifest.json").read_text())
    assert manifest["method"] == "qlora" and manifest["execution"] == "real"
    assert (ck / "tokenizer_config.json").exists() and (ck / "config.json").exists()
    import qvlm_harness.methods.qlora

    def boom(*a, **k):
        raise AssertionError("eval must not re-quantize")

    monkeypatch.setattr(qvlm_harness.methods.qlora.QLoRA, "quantize", boom)
    out = tmp_path / "out"
    assert main(["eval", "--model", str(ck), "--tasks", "sqa", "--limit", "2", "--output", str(out),
                 "--no-progress", "--max-new-tokens", "2"]) == 0
    rows = list(Store(out / "harness.db").rows())
    assert [(r.method, r.bits, r.execution) for r in rows] == [("qlora", "w4a16", "real")]
    assert "loaded from the quantized checkpoint" in rows[0].describe
    capsys.readouterr()
    assert main(["run", "--model", str(ck), "--methods", "rtn", "--tasks", "sqa", "--output", str(out)]) == 2
    assert "harness eval" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_model_dir), "--tasks", "sqa", "--output", str(out)]) == 2


@pytest.mark.slow
def test_every_baseline_runs_end_to_end(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", "--model", str(tiny_model_dir), "--methods", "fp16,rtn,awq,qlora,zeroquant-v2,gptq,smoothquant",
                 "--tasks", "sqa", "--bits", "w4a16,w8a8", "--limit", "2", "--calib-samples", "4",
                 "--max-new-tokens", "2", "--output", str(out), "--no-progress"])
    assert code == 0
    rows = list(Store(out / "harness.db").rows())
    got = {(r.method, r.bits) for r in rows}
    for m in ("rtn", "awq", "qlora", "zeroquant-v2", "gptq", "smoothquant"):
        assert {(m, "w4a16"), (m, "w8a8")} <= got
    assert ("fp16", "fp") in got
    assert all(r.search_cost["seconds"] > 0 for r in rows if r.method not in ("fp16",))

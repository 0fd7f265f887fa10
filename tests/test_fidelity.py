"""Fidelity next to accuracy: KL(FP || quantized) of next-token distributions and top-1 agreement, per cell."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qvlm_harness import fidelity, plugins
from qvlm_harness.config import QuantSpec, RunSpec
from qvlm_harness.models.llava import LlavaAdapter
from qvlm_harness.runner import Runner


def _probes():
    task = plugins.tasks.get("sqa")()
    return fidelity.probe_requests([task.request(x) for x in task.load("test")[:3]])


def test_kl_and_agreement_equal_a_direct_computation(tiny_model_dir):
    fp = LlavaAdapter.load(tiny_model_dir)
    probes = _probes()
    ref = fidelity.reference(fp, probes)
    same = fidelity.compare(fp, probes, ref)
    assert same["kl_mean"] < 1e-3 and same["top1_agree"] == 100.0  # (float16 reference: not exactly 0)
    q = LlavaAdapter.load(tiny_model_dir)
    plugins.methods.get("rtn")().quantize(q, None, QuantSpec.parse("w4a4"))
    got = fidelity.compare(q, probes, ref)
    kls, agree, n = [], 0, 0
    with torch.no_grad():
        for r in probes:
            lp = torch.log_softmax(fp.model(**fp.encode([r])).logits[0, -fidelity.POSITIONS:].float(), -1)
            lq = torch.log_softmax(q.model(**q.encode([r])).logits[0, -fidelity.POSITIONS:].float(), -1)
            kls.append(F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1))
            agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
            n += len(lp)
    assert abs(got["kl_mean"] - float(torch.cat(kls).mean())) < 2e-3 * max(1.0, got["kl_mean"])
    assert got["top1_agree"] == 100.0 * agree / n and got["kl_mean"] > same["kl_mean"]


def test_every_cell_records_its_fidelity(tiny_model_dir, tmp_path):
    spec = RunSpec(methods=["fp32", "rtn"], tasks=["sqa"], bits=[QuantSpec.parse("w4a4")], limit=3,
                   model=str(tiny_model_dir), output=tmp_path, max_new_tokens=2)
    rows = Runner(spec, log=lambda m: None, progress=False).run().rows
    fid = {r.method: r.measurements["fidelity"] for r in rows}
    assert fid["fp32"]["top1_agree"] == 100.0 and fid["fp32"]["kl_mean"] < 1e-3
    assert fid["rtn"]["kl_mean"] > fid["fp32"]["kl_mean"] and fid["rtn"]["prompts"] == 3

"""`harness bench`'s deployment memory: resident storage bytes, and a variant loaded from its saved checkpoint in a
fresh process (`qvlm_harness.bench_memory`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qvlm_harness import bench_memory
from qvlm_harness.bench import BenchConfig, _config_json, run_bench
from qvlm_harness.checkpoint import load_quantized, save_quantized
from qvlm_harness.config import QuantSpec
from qvlm_harness.measure import resident_bytes, weight_bytes
from qvlm_harness.models.llava import LlavaAdapter
from qvlm_harness.plugins import methods
from qvlm_harness.quantize import quantize


def test_resident_bytes_count_each_storage_once():
    m = nn.Module()
    base = torch.zeros(100, dtype=torch.float32)
    m.register_buffer("a", base[:10])  # two views of one 400-byte storage
    m.register_buffer("b", base[50:])
    m.p = nn.Parameter(torch.zeros(7, 3, dtype=torch.bfloat16))
    m.sub = nn.Linear(4, 2, bias=False)
    m.tied = nn.Module()
    m.tied.w = m.p  # the same parameter under a second name
    assert resident_bytes(m) == 400 + 7 * 3 * 2 + 4 * 2 * 4


@pytest.fixture(scope="module")
def rtn_checkpoint(tiny_model_dir, tmp_path_factory):
    qm = quantize(LlavaAdapter.load(tiny_model_dir), methods.get("rtn")(), QuantSpec.parse("w4a4"))
    return save_quantized(qm, tmp_path_factory.mktemp("bench") / "ck", describe="x", base_model="tiny",
                          fingerprint="x", scope=("vision", "projector", "lm"))


def test_child_loads_the_checkpoint_packed_and_reports_its_memory(rtn_checkpoint, tiny_model_dir):
    cfg = _config_json(BenchConfig(model=str(tiny_model_dir), new_tokens=2, threads=1))
    source = bench_memory.checkpoint_source(rtn_checkpoint, "packed", "torch")
    ballast = torch.ones(2**28)  # 1 GiB held (and touched) by this process while the child runs
    got = bench_memory.checkpoint_rss(source, cfg, 1)
    from qvlm_harness.measure import current_rss_mb

    assert got["ckpt_rss_mb"] < current_rss_mb() - 512, "the child reported the parent's memory"
    del ballast
    assert "error" not in got, got
    direct, _ = load_quantized(rtn_checkpoint, packed=True, backend="torch")
    # the child's storage count equals the per-module count of the same model loaded here (another method)
    assert got["resident_bytes"] == weight_bytes(direct.model, packed=False) == resident_bytes(direct.model)
    assert got["ckpt_rss_mb"] >= got["rss_after_load_mb"] > 0
    fp = bench_memory.checkpoint_rss(bench_memory.float_source(str(tiny_model_dir), "fp32"), cfg, 1)
    assert fp["resident_bytes"] > got["resident_bytes"]


@pytest.mark.slow
def test_bench_reports_checkpoint_rss_and_resident_bytes_with_ratios(tiny_model_dir):
    cfg = BenchConfig(model=str(tiny_model_dir), methods=("fp32", "rtn"), bits=[QuantSpec.parse("w4a4")],
                      batch_sizes=(1,), new_tokens=2, rounds=1, threads=1, embeddings="int8")
    rows = {r["method"]: r for r in run_bench(cfg, log=lambda _m: None)["rows"]}
    fp, rtn = rows["fp32"], rows["rtn"]
    assert fp["resident_x"] == 1.0 and fp["ckpt_rss_x"] == 1.0
    assert rtn["resident_mb"] < fp["resident_mb"] and rtn["resident_x"] == fp["resident_mb"] / rtn["resident_mb"]
    assert rtn["ckpt_rss_mb"] and rtn["peak_rss_mb"] and rtn["exec"] == "real"
    # the in-process model and the one loaded from the checkpoint hold the same bytes
    assert rtn["resident_mb"] == pytest.approx(rtn["weight_mb"], rel=1e-9)


def test_decode_read_bytes_are_the_language_model_and_head(tiny_model_dir):
    from qvlm_harness.kernels.embedding import quantize_embeddings

    model = LlavaAdapter.load(tiny_model_dir).model
    lm = model.model.language_model
    tensors = [t for n, t in list(lm.named_parameters()) + list(lm.named_buffers()) if not n.startswith("embed")]
    row = model.get_input_embeddings().weight[0]
    brute = sum(t.numel() * t.element_size() for t in tensors + [model.lm_head.weight, row])
    assert bench_memory.decode_weight_bytes(model) == brute
    quantize_embeddings(model, "int8")  # untied: the head's own codes and scales, one row of the table
    head, emb = model.lm_head, model.get_input_embeddings()
    packed = sum(t.numel() * t.element_size() for t in tensors + [head.codes, head.scale])
    assert bench_memory.decode_weight_bytes(model) == packed + emb.codes.shape[1] + emb.scale.shape[1] * 4

"""Quantized token embedding and LM head (`--quantize-embeddings`): against brute-force references on the tiny
Llava, tied and untied, through checkpoints (fake-quant and packed loads), and in a run's identity and rows."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from qvlm_harness import plugins
from qvlm_harness.checkpoint import load_quantized, save_quantized
from qvlm_harness.cli import main
from qvlm_harness.config import QuantSpec
from qvlm_harness.errors import HarnessError
from qvlm_harness.kernels.embedding import (
    PackedEmbedding,
    PackedHead,
    check_embeddings,
    int4pack_tiles,
    quantize_embeddings,
)
from qvlm_harness.kernels.linear import WeightOnlyLinear
from qvlm_harness.kernels.packing import pack_codes
from qvlm_harness.measure import resident_bytes, weight_bytes
from qvlm_harness.models.llava import LlavaAdapter
from qvlm_harness.quantize import quantize

FORMATS = ("int8", "int4g32", "int4g64", "int4g128")


def brute_force(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, dequantized weight) by the textbook formula: symmetric max-abs scale per row or group."""
    bits = 8 if fmt == "int8" else 4
    group = w.shape[1] if fmt == "int8" else int(fmt.split("g")[1])
    qmax = 2 ** (bits - 1) - 1
    wg = w.float().reshape(w.shape[0], -1, group)
    scale = (wg.abs().amax(-1, keepdim=True) / qmax).clamp(min=1e-8)
    codes = torch.round(wg / scale).clamp(-qmax, qmax)
    return codes.reshape(w.shape), (codes * scale).reshape(w.shape)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gather_dequant_equals_the_brute_force_table(fmt):
    torch.manual_seed(0)
    emb = nn.Embedding(300, 256)
    packed = PackedEmbedding.quantize(emb, 8 if fmt == "int8" else 4, None if fmt == "int8" else int(fmt[5:]))
    _, table = brute_force(emb.weight.detach(), fmt)
    assert torch.allclose(packed.dequantized_weight(), table, rtol=0, atol=1e-6)
    ids = torch.randint(0, 300, (3, 17))
    assert torch.equal(packed(ids), packed.dequantized_weight()[ids])
    assert torch.allclose(packed(ids), table[ids], rtol=0, atol=1e-6)
    full = 300 * 256 * 4
    assert packed.weight_storage_bytes(False) < full / (3.5 if fmt == "int8" else 5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_head_gemm_equals_matmul_with_the_dequantized_weight(fmt):
    torch.manual_seed(1)
    lin = nn.Linear(256, 300, bias=False)
    bits, group = (8, None) if fmt == "int8" else (4, int(fmt[5:]))
    head = PackedHead.quantize(lin, bits, group)
    assert head.kernel == ("int8pack" if bits == 8 else "int4pack")
    x = torch.randn(5, 256)
    _, w = brute_force(lin.weight.detach(), fmt)
    ref = x.double() @ w.double().t()
    err = float((head(x).double() - ref).norm() / ref.norm())
    assert err < (1e-5 if bits == 8 else 1e-2), err  # int4pack computes in bfloat16


@pytest.mark.parametrize("fmt", ("int8", "int4g32", "int4g64"))
def test_head_rows_do_not_depend_on_the_row_count_or_threads(fmt):
    """Why `invariance_key` does not name `--quantize-embeddings`: the head's kernels (int8pack, int4pack) give
    every row the bits it gets alone, at one and two threads (the gather-dequant embedding is per row anyway)."""
    torch.manual_seed(2)
    lin = nn.Linear(576, 4096, bias=False)
    bits, group = (8, None) if fmt == "int8" else (4, int(fmt[5:]))
    head = PackedHead.quantize(lin, bits, group)
    x = torch.randn(40, 576)
    before = torch.get_num_threads()
    try:
        with torch.inference_mode():
            for threads in (1, 2):
                torch.set_num_threads(threads)
                alone = torch.cat([head(x[i:i + 1]) for i in range(40)])
                for m in (2, 3, 5, 16, 17, 33, 40):
                    assert torch.equal(head(x[:m]), alone[:m]), (threads, m)
            torch.set_num_threads(1)
            one = head(x)
            torch.set_num_threads(2)
            assert torch.equal(head(x), one)
    finally:
        torch.set_num_threads(before)


def test_answers_with_quantized_embeddings_equal_alone(tiny_model_dir):
    from test_evalpath import _generate_requests, _loglik_requests

    adapter = LlavaAdapter.load(tiny_model_dir)
    quantize_embeddings(adapter.model, "int4g32")
    reqs = _generate_requests() + _loglik_requests()
    alone = [adapter.answer([r], batch_size=1)[0] for r in reqs]
    together = adapter.answer(reqs, batch_size=8)
    assert [(r.text, r.option_logprobs) for r in together] == [(r.text, r.option_logprobs) for r in alone]


def test_chunked_int4pack_tiles_equal_the_weight_only_layout():
    torch.manual_seed(2)
    codes = torch.randint(-7, 8, (481, 128), dtype=torch.int8)
    scale = torch.rand(481, 4) + 0.1
    packed = pack_codes(codes, 4, True)
    ref = WeightOnlyLinear(packed, scale, None, None, group_size=32)
    for chunk in (64, 4096):
        q, sz, n_pad, k_pad = int4pack_tiles(packed.data, scale, 128, 32, chunk=chunk)
        assert torch.equal(q, ref.qweight) and torch.equal(sz, ref.scales_and_zeros)
        assert (n_pad, k_pad) == (ref.n_pad, ref.k_pad)


@pytest.fixture(scope="module")
def tied_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Llava with its LM head tied to the embedding (as the default's SmolLM2 is)."""
    folder = tmp_path_factory.mktemp("tied") / "tiny-tied"
    shutil.copytree(tiny_model_dir, folder)
    adapter = LlavaAdapter.load(folder)
    adapter.model.config.tie_word_embeddings = True
    adapter.model.config.text_config.tie_word_embeddings = True
    adapter.model.lm_head.weight = adapter.model.get_input_embeddings().weight
    adapter.model.save_pretrained(folder)
    return folder


def _requests():
    from qvlm_harness.calibration import CalibrationSet

    return CalibrationSet.from_task(plugins.tasks.get("sqa")(), 4, 0).requests


def _logits(adapter, requests):
    with torch.inference_mode():
        return adapter.model(**adapter.encode(requests)).logits


@pytest.mark.parametrize(("tied", "fmt"), [(False, "int8"), (True, "int8"), (False, "int4g32"), (True, "int4g64")])
def test_model_with_quantized_embeddings_equals_the_dequantized_float_model(tied, fmt, tiny_model_dir,
                                                                              tied_model_dir):
    folder = tied_model_dir if tied else tiny_model_dir
    quantized, reference = LlavaAdapter.load(folder), LlavaAdapter.load(folder)
    report = quantize_embeddings(quantized.model, fmt)
    assert report["tied"] is tied
    emb, head = quantized.model.get_input_embeddings(), quantized.model.get_output_embeddings()
    assert isinstance(emb, PackedEmbedding) and isinstance(head, PackedHead)
    assert (head.codes is emb.codes) is tied
    # reference: the float model with the brute-force dequantized embedding and head weights
    ref_emb = reference.model.get_input_embeddings()
    _, table = brute_force(ref_emb.weight.detach(), fmt)
    with torch.no_grad():
        head_w = table if tied else brute_force(reference.model.lm_head.weight.detach(), fmt)[1]
        ref_emb.weight.copy_(table)
        reference.model.lm_head.weight.copy_(head_w)
    requests = _requests()
    got, want = _logits(quantized, requests), _logits(reference, requests)
    err = float((got - want).norm() / want.norm())
    assert err < (1e-5 if fmt == "int8" else 2e-2), err
    held = weight_bytes(quantized.model, packed=False)
    assert held == resident_bytes(quantized.model) or not tied or fmt != "int8"
    assert held < weight_bytes(reference.model, packed=False)


def test_checkpoint_round_trip_stores_a_tied_head_once(tied_model_dir, tmp_path):
    spec = QuantSpec.parse("w4a4")
    method = plugins.methods.get("rtn")()
    qm = quantize(LlavaAdapter.load(tied_model_dir), method, spec, embeddings="int4g32")
    assert qm.report["embeddings"]["format"] == "int4g32" and qm.report["embeddings"]["tied"]
    requests = _requests()
    before = _logits(qm.adapter, requests)
    folder = save_quantized(qm, tmp_path / "ck", describe="x", base_model="tiny", fingerprint="x",
                            scope=("vision", "projector", "lm"))
    fake, manifest = load_quantized(folder)
    assert manifest["modules"]["lm_head"]["type"] == "PackedHead"
    assert {"lm_head.codes", "lm_head.scale"} <= set(manifest["aliases"])
    assert torch.equal(_logits(fake, requests), before)
    assert fake.model.lm_head.codes is fake.model.get_input_embeddings().codes
    direct, _ = load_quantized(folder, packed=True, backend="torch")
    assert direct.model.lm_head.codes is direct.model.get_input_embeddings().codes
    from qvlm_harness.kernels.convert import convert_to_packed

    report = convert_to_packed(fake.model, backend="torch")
    assert report.complete, report.summary()  # the packed embedding and head are not "left simulated"
    assert torch.equal(_logits(direct, requests), _logits(fake, requests))


def test_bad_formats_are_refused_in_one_line(tiny_model_dir, capsys):
    class Stub(nn.Module):
        def __init__(self):
            super().__init__()
            self.e = nn.Embedding(10, 96)

        def get_input_embeddings(self):
            return self.e

        def get_output_embeddings(self):
            return None

    with pytest.raises(HarnessError, match="not a multiple of 64"):
        check_embeddings(Stub(), "int4g64")
    check_embeddings(Stub(), "int4g32")
    code = main(["run", "--model", str(tiny_model_dir), "--methods", "rtn", "--tasks", "sqa",
                 "--quantize-embeddings", "int3"])
    assert code == 2 and "--quantize-embeddings" in capsys.readouterr().err


def test_run_rows_say_so_and_only_set_embeddings_join_the_identity(tiny_model_dir, tmp_path):
    from qvlm_harness.store import Store

    tail = ["--model", str(tiny_model_dir), "--methods", "rtn", "--bits", "w4a16", "--tasks", "sqa", "--limit", "2",
            "--max-new-tokens", "2", "--no-progress"]
    assert main(["run", *tail, "--output", str(tmp_path / "a")]) == 0
    assert main(["run", *tail, "--quantize-embeddings", "int8", "--output", str(tmp_path / "b")]) == 0
    (a,), (b,) = list(Store(tmp_path / "a" / "harness.db").rows()), list(Store(tmp_path / "b" / "harness.db").rows())
    assert "embeddings" not in a.identity and "embeddings" not in a.settings["report"]
    assert b.identity["embeddings"] == "int8" and b.settings["report"]["embeddings"]["format"] == "int8"
    assert a.cell_id != b.cell_id
    assert b.measurements["weight_mb_stored"] < a.measurements["weight_mb_stored"]

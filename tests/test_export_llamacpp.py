"""llama.cpp runs the GGUF export of the tiny model and computes the harness's logits on the same token ids: F32 to
float rounding; Q8_0 / Q4_0 to the rounding of the activations llama.cpp quantizes itself (its CPU dot products for
these types take the input in Q8_0 blocks: 32 values, one float16 scale ``absmax / 127``), which the reference
imitates by rounding every language-model linear's input that way; llama.cpp tokenizes as the harness does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.export_common import llama_cpp_or_skip, make_checkpoint

llama_cpp = llama_cpp_or_skip(module_level=True)

PROMPTS = [[1, 5, 9, 33, 70, 101, 7, 3, 250, 17, 44, 60], [1, 200, 201, 202, 9, 9, 9, 400, 12]]


def q8_0_activations(x: torch.Tensor) -> torch.Tensor:
    """ggml's quantize_row_q8_0 then dequantized: blocks of 32 along the last dim, d = fp16(absmax / 127),
    q = round(x / d) (round half away from zero)."""
    shape = x.shape
    b = x.float().reshape(-1, 32)
    d = b.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.sign(b * inv) * torch.floor((b * inv).abs() + 0.5)
    return (q * d.half().float()).reshape(shape).to(x.dtype)


def harness_logits(model_dir, ids, *, quantized_inputs: bool) -> np.ndarray:
    from qvlm_harness.checkpoint import load_adapter

    adapter = load_adapter(str(model_dir))
    hooks = []
    if quantized_inputs:
        for name, m in adapter.model.named_modules():
            if name.startswith("model.language_model.layers.") and isinstance(m, torch.nn.Module) and \
                    hasattr(m, "in_features"):
                hooks.append(m.register_forward_pre_hook(lambda _m, args: (q8_0_activations(args[0]),)))
    with torch.no_grad():
        logits = adapter.model(input_ids=torch.tensor([ids])).logits[0]
    for h in hooks:
        h.remove()
    return logits.float().numpy()


def llama_cpp_logits(gguf_path, ids) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=64, n_batch=64, n_threads=1, n_threads_batch=1,
                          logits_all=True, verbose=False, type_k=0, type_v=0)  # F32 KV cache
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("llamacpp")

    def get(bits: str | None):
        src = tiny_model_dir if bits is None else make_checkpoint(tiny_model_dir, root / f"rtn-{bits}", "rtn", bits)
        out = root / f"gguf-{bits}"
        if not out.exists():
            from qvlm_harness.cli import main

            assert main(["export", "--model", str(src), "--format", "gguf", "--output", str(out)]) == 0
        return src, next(out.glob("*.gguf"))

    return get


@pytest.mark.parametrize(("bits", "tolerance"), [(None, 1e-4), ("w8a16g32", 1e-2), ("w4a16g32", 1e-2)])
def test_llama_cpp_computes_the_harness_logits(exported, bits, tolerance):
    """F32: llama.cpp's logits are the harness's to float rounding. Q8_0 / Q4_0: llama.cpp rounds every linear's
    input to Q8_0 blocks; against the harness with its inputs rounded the same way, the gap stays within 1% of the
    largest logit and within 1.5x the size of that activation rounding itself (measured: 0.6-0.8x), and the
    greedy next token agrees."""
    src, path = exported(bits)
    for ids in PROMPTS:
        got = llama_cpp_logits(path, ids)
        ref = harness_logits(src, ids, quantized_inputs=bits is not None)
        scale = float(np.abs(ref).max())
        err = float(np.abs(got - ref).max())
        assert err <= tolerance * scale, (bits, err, scale)
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
        if bits is not None:
            rounding = float(np.abs(ref - harness_logits(src, ids, quantized_inputs=False)).max())
            assert err <= 1.5 * rounding, (err, rounding)


def test_llama_cpp_tokenizes_like_the_harness(exported, tiny_model_dir):
    from transformers import AutoTokenizer

    _, path = exported("w4a16g32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False, vocab_only=True)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for text in ["Which shape is shown in the picture? A. circle", "What color is the shape?  red  green 12 34"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text)["input_ids"]

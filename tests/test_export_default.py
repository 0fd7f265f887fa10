"""Slow: the embedded default's language model through `harness export --format gguf` (RTN w4a16g32, 30 layers,
a 49153-token byte-level BPE vocabulary): the Q4_0 tensors read back as the harness's codes times its float16
scales, and, with llama-cpp-python installed, llama.cpp tokenizes text exactly as the checkpoint's tokenizer and
predicts the harness's greedy next tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.export_common import harness_weights, llama_cpp_or_skip
from tests.test_export_gguf import expected_lm, read_back

pytestmark = pytest.mark.slow
gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'qvlm-harness[export]')")


@pytest.fixture(scope="module")
def default_q4(tmp_path_factory):
    from qvlm_harness import plugins
    from qvlm_harness.checkpoint import load_float, save_quantized
    from qvlm_harness.cli import main
    from qvlm_harness.config import QuantSpec
    from qvlm_harness.plan import resolve_model
    from qvlm_harness.quantize import quantize

    root = tmp_path_factory.mktemp("default-export")
    _, path = resolve_model("default")
    adapter = load_float(path)
    method, spec = plugins.methods.get("rtn")(), QuantSpec.parse("w4a16g32")
    qm = quantize(adapter, method, spec, None, scope=("lm",), measure_fp_pass=False)
    folder = save_quantized(qm, root / "ckpt", describe=method.describe(spec), base_model="default",
                            fingerprint="x", scope=("lm",))
    assert main(["export", "--model", str(folder), "--format", "gguf", "--output", str(root / "gguf")]) == 0
    return folder, root / "gguf" / "model-Q4_0.gguf", adapter


def test_default_q4_0_reads_back_as_the_harness_weights(default_q4):
    from transformers import AutoConfig

    folder, path, _ = default_q4
    tensors, fields = read_back(path)
    exact = expected_lm(harness_weights(folder, scale_dtype=torch.float16), AutoConfig.from_pretrained(folder))
    assert len(exact) == 30 * 7
    for name, want in exact.items():
        kind, got = tensors[name]
        assert kind == "Q4_0" and np.array_equal(got, want), name
    assert "output.weight" not in tensors  # tied to the embedding: llama.cpp reuses token_embd
    assert len(fields["tokenizer.ggml.tokens"]) == 49153


def test_llama_cpp_reads_the_default_like_the_harness(default_q4):
    llama_cpp = llama_cpp_or_skip()
    folder, path, _ = default_q4
    from qvlm_harness.checkpoint import load_quantized

    adapter, _ = load_quantized(folder)
    tok = adapter.tokenizer
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, n_threads_batch=1, verbose=False)
    texts = ["Which side of the picture is the shape on?\nA. left\nB. right",
             "Context: Scientists sort shapes, colours and numbers: 3 red circles, 12 blue squares!"]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        chat = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       tokenize=False)
        ids = tok(chat, add_special_tokens=False)["input_ids"]
        llm.reset()
        llm.eval(ids)
        with torch.no_grad():
            ref = adapter.model(input_ids=torch.tensor([ids])).logits[0, -1]
        got = np.asarray(llm.scores[len(ids) - 1])
        assert int(np.argmax(got)) == int(ref.argmax())
        top = torch.topk(ref, 5).indices.tolist()
        assert np.max(np.abs(got[top] - ref[top].numpy())) < 0.05 * float(ref.abs().max())

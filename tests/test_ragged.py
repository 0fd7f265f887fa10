"""Ragged batches (`qvlm_harness.models.ragged`): prompts of any lengths in one forward, each answered exactly as
Hugging Face's own generate answers it alone.

The reference is the adapter's same-length path (`_batches` + `_generate_batch` / `_loglik_batch`: HF
`generate` and a plain forward with a dynamic cache) at batch 1, which shares no code with the ragged attention.
"""

from __future__ import annotations

import pytest
import torch
from test_evalpath import _generate_requests, _img, _loglik_requests, _rows, _rtn, _single_token_requests

from qvlm_harness.models.invariance import batch_invariant_linear
from qvlm_harness.models.llava import LlavaAdapter
from qvlm_harness.models.ragged import RaggedLayout, concat_prompts, ragged_forward
from qvlm_harness.task import Request


@pytest.fixture(scope="module", params=["fp32", "rtn-w8a8", "rtn-w4a4", "rtn-w4a4-packed"])
def variant(request, tiny_model_dir):
    if request.param == "fp32":
        return LlavaAdapter.load(tiny_model_dir)
    adapter = _rtn(tiny_model_dir, request.param.split("-")[1])
    if request.param.endswith("packed"):
        from qvlm_harness.kernels.convert import convert_to_packed

        convert_to_packed(adapter.model)
    return adapter


@torch.inference_mode()
def _hf_alone(adapter: LlavaAdapter, req: Request):
    """The request through the same-length path (HF generate / a plain forward), alone."""
    with batch_invariant_linear():
        ((_, batch),) = list(adapter._batches([req], 1))
        if req.kind == "generate":
            return adapter._generate_batch([req], batch)[0]
        return adapter._loglik_batch(batch, [adapter._option_ids(req)])[0]


def _lengths(adapter, reqs) -> set[int]:
    return {adapter.encode([r])["input_ids"].shape[1] for r in reqs}


def test_the_tiny_llama_takes_the_ragged_path(tiny_adapter):
    assert tiny_adapter.ragged_unsupported() is None


def test_ragged_generation_equals_hf_generate_alone(variant):
    reqs = _generate_requests()
    assert len(_lengths(variant, reqs)) >= 4  # a batch really mixes lengths
    reference = [_hf_alone(variant, r) for r in reqs]
    for size in (1, 3, len(reqs)):
        got = variant.generate(reqs, batch_size=size)
        assert [(r.text, r.new_tokens) for r in got] == [(r.text, r.new_tokens) for r in reference]
        assert all(r.prefill_s > 0 and r.decode_s >= 0 for r in got)


def test_ragged_option_scores_equal_the_plain_forward_alone_bit_for_bit(variant):
    reqs = _loglik_requests() + _single_token_requests()
    assert any(len(ids) > 1 for r in reqs for ids in variant._option_ids(r))
    reference = [_hf_alone(variant, r).option_logprobs for r in reqs]
    for size in (1, 4, len(reqs)):
        assert [r.option_logprobs for r in variant.loglik(reqs, batch_size=size)] == reference


def test_every_decode_step_equals_hf_generate_alone_and_finished_prompts_are_not_fed(tiny_model_dir):
    """The LM head's rows, step by step: each prompt's logits equal those of HF generate alone, bit for bit, and
    a step feeds only the prompts still generating (caps 1..6 here)."""
    adapter = _rtn(tiny_model_dir, "w4a4")
    reqs = [Request(f"r{i}", "What color is the shape?" + " Say it." * i, _img((30 * i, 90, 10)),
                    max_new_tokens=i + 1) for i in range(6)]
    rows: list[torch.Tensor] = []
    hook = adapter.model.lm_head.register_forward_hook(lambda m, i, o: rows.append(_rows(o)))
    try:
        alone = []
        for r in reqs:
            rows.clear()
            _hf_alone(adapter, r)
            alone.append(torch.stack([x[-1] for x in rows]))
        rows.clear()
        got = adapter.generate(reqs, batch_size=len(reqs))
    finally:
        hook.remove()
    fed = [len(r) for r in rows]
    assert fed == sorted(fed, reverse=True) and fed[0] == len(reqs) and fed[-1] < len(reqs)
    expected_steps = [r.new_tokens + 1 if r.new_tokens < q.max_new_tokens else q.max_new_tokens
                      for r, q in zip(got, reqs, strict=True)]
    assert sum(fed) == sum(expected_steps)  # one row per distribution each prompt needed, none after it ended
    steps = {i: [] for i in range(len(reqs))}
    active = list(range(len(reqs)))
    for step_rows in rows:
        for i, row in zip(active, step_rows, strict=True):
            steps[i].append(row)
        active = [i for i in active if len(steps[i]) < expected_steps[i]]
    for i, ref in enumerate(alone):
        assert torch.equal(torch.stack(steps[i]), ref[:len(steps[i])])


def test_prompts_share_nothing_in_attention(tiny_adapter):
    """Changing one prompt of a ragged batch leaves every other prompt's hidden states unchanged."""
    reqs = _generate_requests()[:5]
    other = [Request("x", "Something else entirely, and longer than before?", _img((1, 2, 3)))] + reqs[1:]
    lm = tiny_adapter._lm()

    def last_hidden(requests):
        encodings = [tiny_adapter.encode([r]) for r in requests]
        batch, lengths = concat_prompts(encodings)
        layout = RaggedLayout([], [])
        layout.feed(range(len(requests)), lengths)
        with torch.inference_mode(), batch_invariant_linear(), ragged_forward(lm, layout):
            hidden = tiny_adapter.model(**batch, use_cache=False, output_hidden_states=True).hidden_states[-1][0]
        return list(torch.split(hidden, lengths))

    a, b = last_hidden(reqs), last_hidden(other)
    assert not torch.equal(a[0][:3], b[0][:3]) or a[0].shape != b[0].shape
    assert all(torch.equal(x, y) for x, y in zip(a[1:], b[1:], strict=True))
    assert lm.config._attn_implementation == "sdpa"  # restored


def test_models_the_ragged_path_is_not_exact_for_keep_the_same_length_path(tiny_model_dir):
    from qvlm_harness.models.tiny import tiny_gemma_model_path

    gemma = LlavaAdapter.load(tiny_gemma_model_path(tiny_model_dir.parent / "gemma"))
    assert "sliding" in gemma.ragged_unsupported()
    adapter = LlavaAdapter.load(tiny_model_dir)
    adapter.model.generation_config.repetition_penalty = 1.3
    assert "repetition_penalty" in adapter.ragged_unsupported()
    reqs = _generate_requests()[:6]
    assert [r.text for r in adapter.generate(reqs, batch_size=6)] == [_hf_alone(adapter, r).text for r in reqs]
    adapter.model.generation_config.repetition_penalty = 1.0
    adapter._lm().config._attn_implementation = "eager"
    assert "eager" in adapter.ragged_unsupported()

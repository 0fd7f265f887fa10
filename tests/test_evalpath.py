"""The evaluation path: padding-free batches, row-invariant kernels, KV-reused option scoring, request order.

Every answer is compared with the answer the same request gets alone (batch 1, one request per call), which is the
independent reference: equal means the batch size, the thread count and the neighbouring requests did not matter.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from qvlm_harness.config import QuantSpec
from qvlm_harness.models.batching import same_length_batches
from qvlm_harness.models.invariance import batch_invariant_linear, invariance_key
from qvlm_harness.models.llava import LlavaAdapter
from qvlm_harness.task import Request


def _img(color):
    return Image.new("RGB", (40, 30), color)


def _generate_requests() -> list[Request]:
    """Mixed prompt lengths, images and text-only; several share a length (so batches really form: checked)."""
    colors = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (90, 90, 90)]
    reqs = [Request(f"img{i}", "What color is the shape?", _img(c), max_new_tokens=5) for i, c in enumerate(colors)]
    reqs += [Request("t1", "Count 1?", None, max_new_tokens=5), Request("big", "Is it big?", _img((9, 9, 9)),
                                                                          max_new_tokens=3),
             Request("t2", "Count 2?", None, max_new_tokens=5), Request("t3", "Say yes or no:", None),
             Request("long", "Which color is it? A. red B. blue", _img((3, 200, 90)), max_new_tokens=4),
             Request("t4", "Is it red?", None), Request("t5", "Is it blue?", None, max_new_tokens=2)]
    return reqs


def _loglik_requests() -> list[Request]:
    """Single- and multi-token options (of different lengths), with and without images."""
    reqs = []
    for i, c in enumerate([(255, 0, 0), (0, 0, 255), (30, 60, 90)]):
        reqs.append(Request(f"img{i}", "What color is the shape?", _img(c), kind="loglik",
                            options=("red", "blue square", "no")))
    reqs += [Request("hm", "Is it big?", _img((9, 9, 9)), kind="loglik", options=("yes", "no")),
             Request("t1", "Count 1?", None, kind="loglik", options=("A", "no")),
             Request("t2", "Count 2?", None, kind="loglik", options=("maybe not", "yes", "A")),
             Request("t3", "Say yes or no:", None, kind="loglik", options=("no", "A")),
             Request("t4", "Is it red?", None, kind="loglik", options=("unanswerable here", "red"))]
    return reqs


def _single_token_requests() -> list[Request]:
    """Options of one token each: the prompts of a batch are scored by one forward pass."""
    return [Request(r.sample_id, r.prompt, r.image, kind="loglik", options=("no", "A"))
            for r in _generate_requests()]


def _largest_batch(adapter: LlavaAdapter, requests: list[Request]) -> int:
    lengths = [adapter.encode([r])["input_ids"].shape[1] for r in requests]
    return max(len(b) for b in same_length_batches(lengths, len(requests)))


def _rows(logits: torch.Tensor) -> torch.Tensor:
    """The LM head's output as one row per sequence: [batch, 1, vocab] (a batch of prompts, one position each) and
    [1, prompts, vocab] (a ragged batch: `models.ragged`) alike."""
    return logits.reshape(-1, logits.shape[-1]).clone()


def _rtn(tiny_model_dir, tag: str) -> LlavaAdapter:
    from qvlm_harness.methods.rtn import RTN

    adapter = LlavaAdapter.load(tiny_model_dir)
    RTN().quantize(adapter, None, QuantSpec.parse(tag))
    return adapter


@pytest.fixture(scope="module", params=["fp32", "rtn-w8a8", "rtn-w4a4"])
def variant(request, tiny_model_dir):
    if request.param == "fp32":
        return LlavaAdapter.load(tiny_model_dir)
    return _rtn(tiny_model_dir, request.param.split("-")[1])


# -- batching ----------------------------------------------------------------------------------------------------
def test_same_length_batches_group_by_length_within_the_batch_size():
    rng = random.Random(0)
    lengths = [rng.choice([5, 7, 7, 9, 12]) for _ in range(40)]
    keys = [rng.choice("ab") for _ in range(40)]
    for size in (1, 3, 8, 100):
        batches = same_length_batches(lengths, size, keys=keys)
        assert sorted(i for b in batches for i in b) == list(range(40))
        assert all(1 <= len(b) <= size for b in batches)
        assert all(len({(lengths[i], keys[i]) for i in b}) == 1 for b in batches)
        assert all(b == sorted(b) for b in batches)
        first_lengths = [lengths[b[0]] for b in batches]
        assert first_lengths == sorted(first_lengths, reverse=True)
        # as few batches as the groups allow
        groups = Counter(zip(lengths, keys, strict=True))
        assert len(batches) == sum(-(-c // size) for c in groups.values())


def test_stacked_single_encodings_equal_the_processors_own_batch(tiny_adapter):
    same = [r for r in _generate_requests() if r.prompt in ("What color is the shape?", "Is it big?")]
    assert len(same) == 5 and len({tiny_adapter.encode([r])["input_ids"].shape[1] for r in same}) == 1
    text = [r for r in _generate_requests() if r.prompt in ("Count 1?", "Count 2?", "Say yes or no:")]
    for group in (same, text):
        stacked = tiny_adapter._stack([tiny_adapter.encode([r]) for r in group], group)
        batch = tiny_adapter.encode(group)
        assert stacked.keys() == batch.keys()
        assert all(torch.equal(stacked[k], batch[k]) for k in batch)


# -- invariance -----------------------------------------------------------------------------------------------------
def test_generate_answers_equal_alone_at_batch_1_3_8(variant):
    reqs = _generate_requests()
    assert _largest_batch(variant, reqs) >= 4
    alone = [variant.generate([r], batch_size=1)[0] for r in reqs]
    for size in (1, 3, 8):
        got = variant.generate(reqs, batch_size=size)
        assert [r.text for r in got] == [r.text for r in alone]
        assert [r.new_tokens for r in got] == [r.new_tokens for r in alone]
        assert all(r.prefill_s > 0 and r.decode_s >= 0 for r in got)


def test_loglik_scores_equal_alone_bit_for_bit_at_batch_1_3_8(variant):
    reqs = _loglik_requests() + _single_token_requests()
    assert _largest_batch(variant, reqs) >= 4
    alone = [variant.loglik([r], batch_size=1)[0].option_logprobs for r in reqs]
    for size in (1, 3, 8):
        assert [r.option_logprobs for r in variant.loglik(reqs, batch_size=size)] == alone


def test_decode_steps_of_a_batch_equal_the_step_alone(tiny_model_dir):
    """Every generated step's logits (not only the argmax text) are bit-identical to batch 1: the decode GEMMs run
    at M = batch rows, the prefill ones at M = batch x prompt length."""
    adapter = _rtn(tiny_model_dir, "w4a4")
    req = Request("a", "What color is the shape?", _img((10, 100, 200)), max_new_tokens=6)
    captured: list[torch.Tensor] = []
    hook = adapter.model.lm_head.register_forward_hook(lambda m, i, o: captured.append(_rows(o)))
    try:
        adapter.generate([req], batch_size=1)
        alone = list(captured)
        captured.clear()
        adapter.generate([req] * 5, batch_size=5)
    finally:
        hook.remove()
    assert len(captured) == len(alone) > 1
    for step_alone, step_batch in zip(alone, captured, strict=True):
        assert step_batch.shape[0] == 5
        assert all(torch.equal(row, step_alone[0]) for row in step_batch)


def test_answers_equal_at_one_and_two_threads(tiny_model_dir):
    adapter = _rtn(tiny_model_dir, "w4a4")
    reqs = _loglik_requests()[:5] + _generate_requests()[:5]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = adapter.answer(reqs, batch_size=4)
        torch.set_num_threads(2)
        two = adapter.answer(reqs, batch_size=4)
    finally:
        torch.set_num_threads(before)
    assert [(r.text, r.option_logprobs) for r in one] == [(r.text, r.option_logprobs) for r in two]


def test_batch_invariant_linear_rows_do_not_depend_on_row_count():
    torch.manual_seed(0)
    w, b = torch.randn(96, 80), torch.randn(96)
    x = torch.randn(70, 80)
    torch_linear = F.linear
    with batch_invariant_linear():
        alone = torch.cat([F.linear(x[i:i + 1], w, b) for i in range(70)])
        for m in (2, 5, 16, 33, 70):
            assert torch.equal(F.linear(x[:m], w, b), alone[:m])
        three_d = F.linear(x[:64].reshape(4, 16, 80), w, b)
        assert torch.equal(three_d.reshape(64, 96), alone[:64])
        assert torch.equal(F.linear(x[:8], w), torch.cat([F.linear(x[i:i + 1], w) for i in range(8)]))
        # autograd and other dtypes take torch's own path
        xg = x[:4].clone().requires_grad_(True)
        F.linear(xg, w, b).sum().backward()
        assert xg.grad is not None
        assert F.linear(x[:3].bfloat16(), w.bfloat16()).dtype == torch.bfloat16
    assert F.linear is torch_linear
    torch.testing.assert_close(alone, x @ w.T + b, rtol=1e-5, atol=1e-5)


def test_invariance_key_names_what_still_varies():
    w4a4 = QuantSpec.parse("w4a4")
    assert invariance_key(w4a4, "simulated", "fp32", 16, 2) == {}
    assert invariance_key(w4a4, "packed", torch.float32, 1, 1) == {}
    assert invariance_key(QuantSpec.parse("w8a8-tensor-static"), "simulated", "fp32", 8, 2) == {}
    layout = {"batch_layout": "ragged"}
    assert invariance_key(QuantSpec(), "simulated", "bf16", 8, 2) == {"batch_size": 8, "threads": 2} | layout
    assert invariance_key(QuantSpec(), "simulated", torch.float16, 4, 1) == {"batch_size": 4, "threads": 1} | layout
    assert invariance_key(QuantSpec.parse("w8a8-tensor-dynamic"), "simulated", "fp32", 8, 2) == {"batch_size": 8} \
        | layout
    assert invariance_key(w4a4, "simulated", "fp32", 8, 2, device="cuda:0") == {"batch_size": 8, "threads": 2} \
        | layout


# -- speed paths: KV reuse, early stop, order ------------------------------------------------------------------------
def test_kv_reused_option_scores_equal_the_full_sequence_reference(tiny_model_dir):
    for adapter in (LlavaAdapter.load(tiny_model_dir), _rtn(tiny_model_dir, "w8a8")):
        reqs = _loglik_requests()
        opt_ids = [adapter._option_ids(r) for r in reqs]
        assert any(len(i) > 2 for per in opt_ids for i in per) and any(len(i) == 1 for per in opt_ids for i in per)
        reference = adapter._loglik_sequences(reqs, opt_ids)
        fast = [r.option_logprobs for r in adapter.loglik(reqs, batch_size=8)]
        for ref, got in zip(reference, fast, strict=True):
            assert [n for _, n in got] == [n for _, n in ref]
            for (a, _), (b, _) in zip(got, ref, strict=True):
                assert abs(a - b) < 1e-4


def test_option_scoring_encodes_each_prompt_once(tiny_model_dir):
    """One vision-tower pass per image request (not one per option) and one prompt forward per batch."""
    adapter = LlavaAdapter.load(tiny_model_dir)
    reqs = _loglik_requests()
    images = []

    def count(module, args, kwargs, output):
        images.append((args[0] if args else kwargs["pixel_values"]).shape[0])

    hook = adapter.model.model.vision_tower.register_forward_hook(count, with_kwargs=True)
    try:
        adapter.loglik(reqs, batch_size=8)
    finally:
        hook.remove()
    assert sum(images) == sum(r.image is not None for r in reqs)


def test_generation_stops_when_every_row_has_ended(tiny_model_dir):
    adapter = LlavaAdapter.load(tiny_model_dir)
    reqs = [Request(f"r{i}", "What color is the shape?", _img((40 * i, 0, 0)), max_new_tokens=8) for i in range(3)]
    first = [r.text for r in adapter.generate(reqs, batch_size=3)]
    calls: list[int] = []
    hook = adapter.model.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        adapter.generate(reqs, batch_size=3)
        full = len(calls)
        # make each row's first generated token a stop token: the batch must end after the prefill
        captured = []
        h2 = adapter.model.lm_head.register_forward_hook(lambda m, i, o: captured.append(_rows(o).argmax(-1)))
        adapter.generate(reqs, batch_size=3)
        h2.remove()
        adapter._eos_ids = sorted(set(adapter._eos_ids) | {int(t) for t in captured[0]})
        calls.clear()
        out = adapter.generate(reqs, batch_size=3)
    finally:
        hook.remove()
    assert full > 1 and first
    assert len(calls) == 1
    assert all(r.new_tokens == 0 and r.text == "" for r in out)


def test_answer_keeps_request_order_across_kinds_lengths_and_images(tiny_adapter):
    gen, ll = _generate_requests(), _loglik_requests()
    mixed = [x for pair in zip(gen, ll, strict=False) for x in pair] + gen[len(ll):]
    lengths = [tiny_adapter.encode([r])["input_ids"].shape[1] for r in mixed if r.kind == "generate"]
    order = [i for b in same_length_batches(lengths, 3) for i in b]
    assert order != sorted(order)  # the batches really run out of request order
    got = tiny_adapter.answer(mixed, batch_size=3)
    for req, resp in zip(mixed, got, strict=True):
        alone = tiny_adapter.answer([req], batch_size=1)[0]
        assert (resp.text, resp.option_logprobs, resp.new_tokens) == (alone.text, alone.option_logprobs,
                                                                       alone.new_tokens)
        assert (resp.text is None) == (req.kind == "loglik")


# -- the measurement script ----------------------------------------------------------------------------------------
def test_invariance_bench_counts_no_differences_where_the_key_is_empty(tiny_model_dir):
    path = Path(__file__).resolve().parent.parent / "bench" / "invariance.py"
    spec = importlib.util.spec_from_file_location("bench_invariance", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses resolve their module through sys.modules
    try:
        spec.loader.exec_module(bench)
    finally:
        sys.modules.pop(spec.name, None)
    outcomes = bench.main(["--model", str(tiny_model_dir), "--methods", "fp32,rtn", "--bits", "w4a4",
                           "--tasks", "sqa,hm", "--limit", "6", "--batch-sizes", "1,3", "--threads", "1"])
    assert [(o.method, o.bits, o.batch_size) for o in outcomes] == [("fp32", "fp", 1), ("fp32", "fp", 3),
                                                                     ("rtn", "w4a4", 1), ("rtn", "w4a4", 3)]
    assert all(o.samples == 12 and o.key == "-" for o in outcomes)
    assert all(o.text_differs == o.choice_differs == 0 and o.max_logprob_diff == 0.0 for o in outcomes)
    assert torch.get_num_threads() == 1

"""The Llava adapter on a tiny random checkpoint: batching, option scoring, templates, image placement."""

from __future__ import annotations

import torch
from PIL import Image

from qvlm_harness.models.llava import LlavaAdapter
from qvlm_harness.task import Request


def _img(color):
    return Image.new("RGB", (40, 30), color)


def test_batched_generation_equals_one_by_one(tiny_adapter):
    reqs = [Request("a", "What color is the shape?", _img((255, 0, 0)), max_new_tokens=5),
            Request("b", "Which word is a color? A. red B. run", None, max_new_tokens=5),
            Request("c", "How many corners does it have? Answer with a single word.", _img((0, 0, 255)),
                    max_new_tokens=5)]
    batched = [r.text for r in tiny_adapter.generate(reqs, batch_size=3)]
    single = [tiny_adapter.generate([r], batch_size=1)[0].text for r in reqs]
    assert batched == single


def test_generation_reports_prefill_and_decode_time(tiny_adapter):
    resp = tiny_adapter.generate([Request("a", "What color is the shape?", _img((0, 255, 0)), max_new_tokens=4)])[0]
    assert resp.prefill_s > 0 and resp.decode_s >= 0 and 0 <= resp.new_tokens <= 4


def test_single_token_loglik_equals_explicit_sequence_scoring(tiny_adapter):
    req = Request("a", "Is it hateful? Answer:", _img((9, 9, 9)), kind="loglik", options=("A", "B"))
    fast = tiny_adapter.loglik([req])[0].option_logprobs
    tok = tiny_adapter.tokenizer
    ids = [tok(o, add_special_tokens=False).input_ids for o in req.options]
    assert all(len(i) == 1 for i in ids)
    slow = tiny_adapter._loglik_sequences([req], [ids])[0]
    for (a, na), (b, nb) in zip(fast, slow, strict=True):
        assert na == nb == 1 and abs(a - b) < 1e-4


def test_multi_token_loglik_matches_manual_forward(tiny_adapter):
    req = Request("a", "Say something:", None, kind="loglik", options=("unanswerable here", "no"))
    got = tiny_adapter.loglik([req])[0].option_logprobs
    tok = tiny_adapter.tokenizer
    for option, (logp, n) in zip(req.options, got, strict=True):
        base = tiny_adapter.encode([req])["input_ids"][0].tolist()
        cont = tok(option, add_special_tokens=False).input_ids
        ids = torch.tensor([base + cont])
        with torch.no_grad():
            logits = tiny_adapter.model(input_ids=ids).logits[0].log_softmax(-1)
        manual = sum(float(logits[len(base) - 1 + i, t]) for i, t in enumerate(cont))
        assert n == len(cont) and abs(manual - logp) < 1e-4


def test_render_places_image_at_placeholder_and_uses_checkpoint_template(tiny_adapter):
    text = tiny_adapter.render(Request("a", "demo line\n<image>query", _img((1, 2, 3))))
    assert text.startswith("USER: demo line\n<image>\nquery") and text.endswith("ASSISTANT:")
    no_image = tiny_adapter.render(Request("b", "<image>query", None))
    assert "<image>" not in no_image


def test_linear_names_follow_forward_order_and_scopes(tiny_adapter):
    names = tiny_adapter.linear_names(["vision", "projector", "lm"])
    scopes = [tiny_adapter.stack_of(n) for n in names]
    assert scopes == sorted(scopes, key=["vision", "projector", "lm"].index)
    assert not any(n.endswith("lm_head") for n in names)
    assert tiny_adapter.linear_names(["projector"]) == [n for n in names if "multi_modal_projector" in n]


def test_fp16_and_bf16_loading(tiny_model_dir):
    for dtype, torch_dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        adapter = LlavaAdapter.load(tiny_model_dir, dtype=dtype)
        assert adapter.dtype == torch_dtype
        out = adapter.generate([Request("a", "What color?", _img((5, 5, 5)), max_new_tokens=2)])
        assert isinstance(out[0].text, str)


def test_fingerprint_ignores_load_folder_but_sees_weight_changes(tiny_model_dir, tmp_path):
    """The CI checkout builds the default model in another folder than a developer's cache: the same weights must
    fingerprint alike wherever they were loaded from, and a changed weight must change the fingerprint."""
    import shutil

    copy = tmp_path / "elsewhere" / "tiny-copy"
    shutil.copytree(tiny_model_dir, copy)
    here, there = LlavaAdapter.load(tiny_model_dir), LlavaAdapter.load(copy)
    assert here.fingerprint() == there.fingerprint()
    with torch.no_grad():
        next(there.model.parameters()).view(-1)[0] += 1.0
    assert here.fingerprint() != there.fingerprint()

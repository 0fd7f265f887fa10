"""The `qvlm-harness` lm-eval model: its scores equal the harness adapter's on the same prompts, generation equals
the adapter's greedy output, chat rendering equals the adapter's, and registration keeps lm-eval's built-ins."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is the optional extra `lmeval` (tox installs it): "
                    "pip install -c constraints.txt -e '.[lmeval]'")

from lm_eval.api.instance import Instance

from qvlm_harness.errors import HarnessError
from qvlm_harness.images import load_image
from qvlm_harness.lmeval.model import QVLMHarnessLM, build_quantized
from qvlm_harness.task import Request
from qvlm_harness.tasks.sqa import ScienceQA

DATA = Path(__file__).parent / "data" / "lmeval"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lm(tiny_adapter) -> QVLMHarnessLM:
    return QVLMHarnessLM.from_adapter(tiny_adapter, batch_size=3)


@pytest.fixture(scope="module")
def samples():
    return ScienceQA().load("test", DATA / "sqa")


def _inst(kind: str, args: tuple, idx: int = 0) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=idx, metadata=("t", 0, 1))


def _visual(request: Request) -> dict:
    return {"visual": [load_image(request.image)] if request.image is not None else []}


def test_apply_chat_template_renders_like_the_adapter(lm, samples):
    task = ScienceQA()
    for sample in samples[:4]:
        req = task.request(sample)
        text = ("<image>" if req.image is not None else "") + req.prompt
        assert lm.apply_chat_template([{"role": "user", "content": text}]) == lm.adapter.render(req)


@pytest.mark.parametrize("option_kind", ["letters", "choice_texts"])
def test_loglikelihood_matches_adapter_option_scores(lm, samples, option_kind):
    """Single-token letters go through the adapter's one-pass path, multi-token choice texts through its
    per-sequence path; both must equal lm-eval-style (context, continuation) scoring on the rendered prompt."""
    task = ScienceQA()
    requests = []
    for s in samples[:6]:
        req = task.request(s, scoring="loglik")
        if option_kind == "choice_texts":
            req.options = [f" {c}" for c in s.data["choices"]]
        requests.append(req)
    reference = lm.adapter.loglik(requests, batch_size=4)
    instances = [_inst("loglikelihood", (lm.adapter.render(r), opt, _visual(r)), i)
                 for r in requests for i, opt in enumerate(r.options)]
    got = lm.loglikelihood(instances)
    expected = [lp for resp in reference for lp, _ in resp.option_logprobs]
    assert len(got) == len(expected) == sum(len(r.options) for r in requests)
    assert torch.allclose(torch.tensor([g[0] for g in got]), torch.tensor(expected), atol=1e-4, rtol=0)


def test_is_greedy_and_text_only_requests_against_a_plain_forward(lm):
    """Text-only (2-tuple) requests, scored against an independent forward pass over prompt + continuation."""
    tok = lm.tokenizer
    context, continuation = "USER: What color is the shape? ASSISTANT:", " red"
    (lp, greedy), = lm.loglikelihood([_inst("loglikelihood", (context, continuation))])
    ctx_ids = tok(context).input_ids
    cont_ids = tok(continuation, add_special_tokens=False).input_ids
    ids = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        logp = torch.log_softmax(lm.adapter.model(input_ids=ids).logits[0].float(), -1)
    rows = logp[len(ctx_ids) - 1:-1]
    assert lp == pytest.approx(float(rows[range(len(cont_ids)), cont_ids].sum()), abs=1e-4)
    assert greedy == bool((rows.argmax(-1) == torch.tensor(cont_ids)).all())
    # the greedy continuation itself must be reported as greedy
    best = tok.decode([int(logp[len(ctx_ids) - 1].argmax())])
    (_, is_greedy), = lm.loglikelihood([_inst("loglikelihood", (context, best))])
    if tok(best, add_special_tokens=False).input_ids == [int(logp[len(ctx_ids) - 1].argmax())]:
        assert is_greedy


def test_loglikelihood_rolling_equals_full_sequence_score(lm):
    text = "What color is the shape? red green blue"
    (total,) = lm.loglikelihood_rolling([_inst("loglikelihood_rolling", (text,))])
    ids = [lm.tokenizer.bos_token_id] + lm.tokenizer(text, add_special_tokens=False).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(lm.adapter.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    expected = float(logp[range(len(ids) - 1), ids[1:]].sum())
    assert total == pytest.approx(expected, abs=1e-4)


def test_generate_until_matches_adapter_greedy_generation(lm, samples):
    task = ScienceQA()
    requests = [task.request(s) for s in samples[:4]]
    for r in requests:
        r.max_new_tokens = 8
    native = lm.adapter.generate(requests, batch_size=4)
    instances = [_inst("generate_until", (lm.adapter.render(r), {"until": [], "max_gen_toks": 8}, _visual(r)))
                 for r in requests]
    got = QVLMHarnessLM.from_adapter(lm.adapter, batch_size=4).generate_until(instances)
    assert [g.strip() for g in got] == [n.text for n in native]
    # an `until` string cuts the output where it first occurs
    target = next(g for g in got if len(g.strip()) > 2)
    stop = target.strip()[1:3]
    i = got.index(target)
    cut = lm.generate_until([_inst("generate_until", (instances[i].args[0], {"until": [stop], "max_gen_toks": 8},
                                                      instances[i].args[2]))])
    assert cut == [target.split(stop)[0]]


def test_image_placeholders_are_matched_to_images(lm):
    tok = lm.image_token
    assert lm._place_images("<image>a<image>b", [object()]) == f"a{tok}b"  # the last placeholder keeps the image
    assert lm._place_images("question", [object()]) == f"{tok}\nquestion"
    assert lm._place_images("<image>q", []) == "q"


def test_quantized_model_arguments_are_checked_before_loading(tiny_model_dir):
    common = dict(model=str(tiny_model_dir), calib_task=None, calib_samples=4, data_dir=None, seed=0, dtype="fp32",
                  device="cpu", threads=None, method_options={})
    with pytest.raises(HarnessError, match="bits=w4a4"):
        build_quantized(method="rtn", bits=None, scope="lm", **common)
    with pytest.raises(HarnessError, match="scope takes"):
        build_quantized(method="rtn", bits="w4a4", scope="lm+decoder", **common)
    with pytest.raises(HarnessError, match="calib_task=sqa"):
        build_quantized(method="rtn", bits="w8a8-tensor-static", scope="lm", **common)
    with pytest.raises(HarnessError, match="unknown qvlm-harness model argument 'colour'"):
        build_quantized(method="rtn", bits="w4a4", scope="lm", **(common | {"method_options": {"colour": 1}}))


def test_model_args_build_a_quantized_model(tiny_model_dir):
    lm = QVLMHarnessLM(model=str(tiny_model_dir), method="rtn", bits="w4a4", scope="lm", device="cuda:0",
                       batch_size="auto")
    info = lm.get_model_info()
    assert info["qvlm_method"] == "rtn" and info["qvlm_bits"] == "w4a4" and info["qvlm_execution"] == "simulated"
    from qvlm_harness.quant import QLinear

    swapped = [n for n, m in lm.adapter.model.named_modules() if isinstance(m, QLinear)]
    assert info["qvlm_quantized_modules"] == len(swapped) > 0
    assert all(n.startswith("model.language_model.") for n in swapped)  # scope=lm: nothing else touched
    assert str(lm.device) == "cpu" or torch.cuda.is_available()


def test_register_keeps_lm_eval_builtins_in_a_fresh_process():
    code = ("from qvlm_harness.lmeval import register; register(); register()\n"
            "from lm_eval.api.registry import get_model\n"
            "print(get_model('qvlm-harness').__name__, get_model('hf-multimodal').__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["QVLMHarnessLM", "HFMultimodalLM"]


def test_quantized_checkpoint_folder_is_evaluated_as_stored(tiny_model_dir, tmp_path, capsys):
    from qvlm_harness.cli import main

    folder = tmp_path / "rtn-w4a4"
    assert main(["quantize", "--method", "rtn", "--bits", "w4a4", "--model", str(tiny_model_dir), "--quantize", "lm",
                 "--output", str(folder)]) == 0
    fresh = QVLMHarnessLM(model=str(tiny_model_dir), method="rtn", bits="w4a4", scope="lm")
    stored = QVLMHarnessLM(model=str(folder))
    assert stored.get_model_info()["qvlm_bits"] == "w4a4" and stored.get_model_info()["qvlm_method"] == "rtn"
    request = _inst("loglikelihood", ("USER: Which shape is shown? ASSISTANT:", " circle"))
    assert stored.loglikelihood([request])[0][0] == pytest.approx(fresh.loglikelihood([request])[0][0], abs=1e-5)
    with pytest.raises(HarnessError, match="drop method=/bits="):
        QVLMHarnessLM(model=str(folder), method="rtn", bits="w4a4")

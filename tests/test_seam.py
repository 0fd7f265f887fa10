"""The model seam on every tiny architecture: structure, per-unit stack inputs, fold conformance, prompting.

Architectures: `tiny` (CLIP tower + Llama LM, LLaVA-1.5 template) and `tiny-gemma` (DINOv2 tower with LayerNorm +
LayerScale, Gemma3 LM: offset RMSNorm, sandwich norms, q/k norms, alternating sliding/full attention with
different rotary bases; a template rendering ``{{ bos_token }}`` and ending turns with ``<end_of_turn>``).
References are independent of the seam: forward hooks on the real forward, the FP model's own logits.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from qvlm_harness.calibration import CalibrationSet
from qvlm_harness.config import QuantSpec
from qvlm_harness.errors import HarnessError
from qvlm_harness.methods.awq import AWQ
from qvlm_harness.methods.smoothquant import SmoothQuant
from qvlm_harness.models.architectures import NORMS, class_key, describe_config, describe_model
from qvlm_harness.models.capture import capture_stack_inputs, first_output, run_unit
from qvlm_harness.models.llava import CalibBatch, LlavaAdapter
from qvlm_harness.models.structure import STACK_NAMES, NormKind
from qvlm_harness.models.tiny import tiny_gemma_model_path
from qvlm_harness.models.transforms import fold_group, fold_scales, replay_transforms
from qvlm_harness.quant.sequential import run_sequential
from qvlm_harness.tasks.sqa import ScienceQA

ARCHS = ["tiny", "tiny-gemma"]


@pytest.fixture(scope="module")
def tiny_gemma_dir(tmp_path_factory):
    return tiny_gemma_model_path(tmp_path_factory.mktemp("tiny-gemma") / "tiny-gemma")


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir, tiny_gemma_dir):
    return {"tiny": tiny_model_dir, "tiny-gemma": tiny_gemma_dir}


@pytest.fixture(scope="module")
def calib():
    return CalibrationSet.from_task(ScienceQA(), 6, seed=0)


def load(model_dirs, arch: str) -> LlavaAdapter:
    """A fresh adapter with random norm parameters (same for every load): a fresh norm's w = 1, b = 0 (w = 0 for
    Gemma) would hide a fold that mishandles the bias or the offset."""
    a = LlavaAdapter.load(model_dirs[arch])
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for m in a.model.modules():
            if class_key(m) in NORMS:
                centre = 0.0 if NORMS[class_key(m)] is NormKind.RMSNORM_OFFSET else 1.0
                m.weight.copy_(centre + 0.3 * torch.randn(m.weight.shape, generator=g))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return a


def real_unit_io(adapter: LlavaAdapter, inputs: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of every unit during one real forward of the whole model, by unit name."""
    io: dict[str, list] = {}
    handles = []
    for stack in adapter.stacks():
        for u in stack.units:
            def pre(_m, args, kwargs, _n=u.name):
                io[_n] = [args[0] if args else kwargs["hidden_states"], None]

            def post(_m, _args, _kwargs, out, _n=u.name):
                io[_n][1] = first_output(out)

            handles.append(u.module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(u.module.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            adapter.model(**inputs, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: (v[0].detach(), v[1].detach()) for k, v in io.items()}


def eval_inputs(adapter: LlavaAdapter, calib) -> dict:
    return adapter.encode(calib.requests[:4])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# -- (i) per-unit stack inputs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_unit_by_unit_propagation_reproduces_the_real_forward(model_dirs, calib, arch):
    a = load(model_dirs, arch)
    stacks = a.stacks()
    batches = list(a.calibration_batches(calib, batch_size=3))
    assert any(b.n_images for b in batches)
    entries = capture_stack_inputs(a.model, stacks, batches)
    for stack in stacks:
        assert entries[stack.name], stack.name
        for si in entries[stack.name]:
            real = real_unit_io(a, batches[si.batch].inputs)
            assert torch.equal(si.hidden, real[stack.units[0].name][0])
            h = si.hidden
            with torch.no_grad():
                for u in stack.units:
                    h = run_unit(u, h, si)
                    assert torch.allclose(h, real[u.name][1], rtol=0, atol=1e-6), u.name


def test_alternating_attention_needs_each_layers_own_arguments(model_dirs, calib):
    """The control for the test above: on the Gemma3 LM, replaying the first (sliding-window) layer's mask and
    rotary embeddings for the full-attention layer 1 gives another output, so per-unit capture is what makes it
    exact there."""
    a = load(model_dirs, "tiny-gemma")
    lm = a.stacks(["lm"])[0]
    assert [u.attention.layer_type for u in lm.units] == ["sliding_attention", "full_attention"] * 2
    batch = next(iter(a.calibration_batches(calib, batch_size=3)))
    si = capture_stack_inputs(a.model, [lm], [batch])["lm"][0]
    real = real_unit_io(a, batch.inputs)
    x = real[lm.units[1].name][0]
    first = si.calls[0]
    with torch.no_grad():
        wrong = first_output(lm.units[1].module(x, *first.args, **first.kwargs))
        right = run_unit(lm.units[1], x, si)
    assert torch.allclose(right, real[lm.units[1].name][1], atol=1e-6)
    assert relative(wrong, real[lm.units[1].name][1]) > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_run_sequential_feeds_every_unit_its_own_inputs(model_dirs, calib, arch):
    a = load(model_dirs, arch)
    batches = list(a.calibration_batches(calib, batch_size=3))
    seen: dict[str, list[torch.Tensor]] = {}
    linears = a.linear_names(["vision", "projector", "lm"])
    covered = run_sequential(a, calib, ["vision", "projector", "lm"], linears,
                             lambda ctx: seen.setdefault(ctx.name, ctx.run()), propagate="float", batch_size=3)
    assert sorted(covered) == sorted(linears)
    image_batches = [b for b in batches if b.n_images]
    for stack in a.stacks():
        reached = batches if stack.name == "lm" else image_batches
        real = [real_unit_io(a, b.inputs) for b in reached]
        for u in stack.units:
            assert len(seen[u.name]) == len(reached)
            for out, r in zip(seen[u.name], real, strict=True):
                assert torch.allclose(out, r[u.name][1], rtol=0, atol=1e-5), u.name


def _family_model(text_family: str, vision_family: str):
    """A tiny random Llava for one (LM, vision tower) pairing of the architecture table, with random norms, and a
    left-padded batch of two rows with 16 image tokens each."""
    import transformers as tf

    vocab, image_token = 100, 99
    text_kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    text = {"mistral": lambda: tf.MistralConfig(sliding_window=8, **text_kw),
            "qwen2": lambda: tf.Qwen2Config(**text_kw),
            "qwen3": lambda: tf.Qwen3Config(**text_kw),
            "gemma": lambda: tf.GemmaConfig(**text_kw),
            "gemma2": lambda: tf.Gemma2Config(sliding_window=8, query_pre_attn_scalar=16, **text_kw)}[text_family]()
    vision_kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                     patch_size=8)
    vision = {"clip": lambda: tf.CLIPVisionConfig(**vision_kw),
              "siglip": lambda: tf.SiglipVisionConfig(**vision_kw),
              "dinov2-swiglu": lambda: tf.Dinov2Config(use_swiglu_ffn=True, **vision_kw)}[vision_family]()
    torch.manual_seed(0)
    config = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token, image_seq_length=16,
                            vision_feature_select_strategy="full" if vision_family == "siglip" else "default",
                            vision_feature_layer=-1)
    model = tf.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for m in model.modules():
            if class_key(m) in NORMS:
                centre = 0.0 if NORMS[class_key(m)] is NormKind.RMSNORM_OFFSET else 1.0
                m.weight.copy_(centre + 0.3 * torch.randn_like(m.weight))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.1 * torch.randn_like(m.bias))
    g = torch.Generator().manual_seed(1)
    rows = [torch.cat([torch.randint(1, 90, (5,), generator=g), torch.full((16,), image_token),
                       torch.randint(1, 90, (9,), generator=g)]) for _ in range(2)]
    ids = torch.stack(rows)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # left padding
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    return model, CalibBatch(inputs, torch.zeros_like(ids, dtype=torch.bool), torch.zeros(0, dtype=torch.long), 2, 2)


@pytest.mark.parametrize(("text", "vision"), [("mistral", "dinov2-swiglu"), ("qwen2", "clip"), ("qwen3", "siglip"),
                                              ("gemma", "siglip"), ("gemma2", "clip")])
def test_every_family_of_the_table_propagates_and_folds_exactly(text, vision):
    """The families no tiny checkpoint covers: unit-by-unit propagation from the captured inputs equals the real
    forward, and folding random scales through every scale group leaves the logits unchanged."""
    model, batch = _family_model(text, vision)
    # the seam's parts of an adapter (a model without a tokenizer: the inputs are built by hand)
    adapter = SimpleNamespace(model=model, transforms=[], stacks=lambda names=STACK_NAMES: describe_model(model, names))
    stacks = adapter.stacks()
    real = real_unit_io(adapter, batch.inputs)
    for stack, entries in capture_stack_inputs(model, stacks, [batch]).items():
        si = entries[0]
        h = si.hidden
        with torch.no_grad():
            for u in next(s for s in stacks if s.name == stack).units:
                h = run_unit(u, h, si)
                assert torch.allclose(h, real[u.name][1], rtol=0, atol=1e-5), u.name
    keep = batch.token_mask
    with torch.no_grad():
        ref = model(**batch.inputs).logits[keep]
    g = torch.Generator().manual_seed(2)
    groups = [grp for s in stacks for u in s.units for grp in u.scale_groups]
    assert {grp.producer_kind for grp in groups} == {"norm", "linear"}
    for grp in groups:
        width = model.get_submodule(grp.consumers[0]).in_features
        fold_group(adapter, grp, 0.5 + 1.5 * torch.rand(width, generator=g))
    with torch.no_grad():
        assert relative(model(**batch.inputs).logits[keep], ref) < 1e-5
    assert len(adapter.transforms) == len(groups)


# -- (ii) fold conformance -------------------------------------------------------------------------------------------

FOLDING = [("smoothquant", "w16a16"), ("smoothquant", "w8a8"), ("awq", "w4a16")]


def _method(name: str):
    # AWQ searches the LM only by default; the vision tower's LayerNorm groups are folded too with search=vision,lm
    return SmoothQuant() if name == "smoothquant" else AWQ(search="vision,lm")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("method", "bits"), FOLDING)
def test_a_methods_transforms_alone_leave_the_fp_logits_unchanged(model_dirs, calib, arch, method, bits):
    quantized = load(model_dirs, arch)
    inputs = eval_inputs(quantized, calib)
    with torch.no_grad():
        ref = quantized.model(**inputs).logits
    _method(method).quantize(quantized, calib, QuantSpec.parse(bits))
    log = quantized.transforms
    assert log and all(t.op == "scale" for t in log)
    kinds = {t.norm_kind for t in log}
    if arch == "tiny-gemma":
        assert NormKind.RMSNORM_OFFSET in kinds and NormKind.LAYERNORM in kinds
    if bits == "w16a16":  # nothing is quantized: the method's model itself must be the FP model
        with torch.no_grad():
            assert relative(quantized.model(**inputs).logits, ref) < 1e-5
    fresh = load(model_dirs, arch)
    before = copy.deepcopy(fresh.model.state_dict())
    replay_transforms(log, fresh)
    moved = max(float((fresh.model.state_dict()[k] - v).abs().max()) for k, v in before.items())
    assert moved > 1e-2  # the transforms really changed weights
    with torch.no_grad():
        assert relative(fresh.model(**inputs).logits, ref) < 1e-5
    assert fresh.transforms == list(log)


def test_folding_an_offset_norm_as_a_plain_one_would_change_the_model(model_dirs, calib):
    """What the conformance test guards against, shown on the Gemma3 LM: ``w / s`` on an ``x * (1 + w)`` norm
    moves the logits; the seam's ``(1 + w) / s - 1`` does not."""
    a = load(model_dirs, "tiny-gemma")
    group = a.stacks(["lm"])[0].units[1].scale_groups[0]
    assert group.norm_kind is NormKind.RMSNORM_OFFSET
    inputs = eval_inputs(a, calib)
    s = torch.linspace(0.5, 2.0, a.model.get_submodule(group.producer).weight.numel())
    with torch.no_grad():
        ref = a.model(**inputs).logits
        naive = copy.deepcopy(a.model)
        naive.get_submodule(group.producer).weight.div_(s)
        for c in group.consumers:
            naive.get_submodule(c).weight.mul_(s)
        assert relative(naive(**inputs).logits, ref) > 1e-3
        a.fold_scales(group, s)
        assert relative(a.model(**inputs).logits, ref) < 1e-5


class FakeNorm(nn.Module):
    """An RMSNorm-looking module the seam does not know."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def test_an_unknown_norm_class_is_refused_in_one_line(model_dirs, calib):
    a = load(model_dirs, "tiny")
    layer = a.model.model.language_model.layers[0]
    layer.input_layernorm = FakeNorm(layer.input_layernorm.weight.detach())
    with pytest.raises(HarnessError) as err:
        SmoothQuant().quantize(a, calib, QuantSpec.parse("w8a8"))
    msg = str(err.value)
    assert "\n" not in msg and "FakeNorm" in msg and "LlamaRMSNorm" in msg and "known:" in msg
    with pytest.raises(HarnessError, match="FakeNorm"):
        fold_scales(layer.input_layernorm, [layer.self_attn.q_proj], torch.ones(layer.input_layernorm.weight.numel()))


# -- (iii) prompting: one BOS, answers end with the template's end of turn --------------------------------------------


def test_a_template_rendering_bos_gets_one_bos(model_dirs, calib):
    a = LlavaAdapter.load(model_dirs["tiny-gemma"])
    bos = a.tokenizer.bos_token_id
    assert a.render(calib.requests[0]).startswith(a.tokenizer.bos_token)
    assert a.tokenizer("x").input_ids[0] == bos  # the tokenizer adds BOS on its own: the double-BOS trap is set
    ids = a.encode(calib.requests[:3])
    for row, mask in zip(ids["input_ids"], ids["attention_mask"].bool(), strict=True):
        real = row[mask].tolist()
        assert real[0] == bos and real.count(bos) == 1
    for b in a.calibration_batches(calib, batch_size=3):
        for row, mask in zip(b.inputs["input_ids"], b.token_mask, strict=True):
            assert row[mask].tolist().count(bos) == 1


@pytest.mark.parametrize(("arch", "end"), [("tiny", "</s>"), ("tiny-gemma", "<end_of_turn>")])
def test_calibration_answers_end_with_the_templates_end_of_turn(model_dirs, calib, arch, end):
    a = LlavaAdapter.load(model_dirs[arch])
    end_id = a.tokenizer.convert_tokens_to_ids(end)
    assert a.answer_suffix(calib.requests[0], "B").endswith("B" + end)
    for b in a.calibration_batches(calib, batch_size=3):
        ids = b.inputs["input_ids"]
        t = ids.shape[1]
        for i in range(ids.shape[0]):
            pos = b.answer_pos[i].nonzero().flatten()
            assert int(pos[-1]) == t - 2 and int(ids[i, -1]) == end_id
        assert b.answer_ids.numel() == int(b.answer_pos.sum())
    if arch == "tiny-gemma":  # the template's end of turn, not the tokenizer's EOS
        assert a.tokenizer.eos_token_id not in [int(x) for b in a.calibration_batches(calib) for x in b.answer_ids]


def test_an_assistant_turn_without_an_end_token_gets_eos(model_dirs, calib):
    a = LlavaAdapter.load(model_dirs["tiny"])
    a.processor.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' }}{% for c in m['content'] %}"
                                 "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{{ ' ' }}"
                                 "{% endfor %}{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")
    assert a.answer_suffix(calib.requests[0], "C") == " C" + a.tokenizer.eos_token


# -- (iv)-(vi) structure ----------------------------------------------------------------------------------------------


def test_sandwich_block_groups_read_the_norms_their_linears_read(model_dirs):
    a = LlavaAdapter.load(model_dirs["tiny-gemma"])
    for u in a.stacks(["lm"])[0].units:
        mlp = [g for g in u.scale_groups if g.inspect == f"{u.name}.mlp"]
        assert [g.producer for g in mlp] == [f"{u.name}.pre_feedforward_layernorm"]
        assert mlp[0].consumers == (f"{u.name}.mlp.gate_proj", f"{u.name}.mlp.up_proj")
        producers = {g.producer for g in u.scale_groups}
        assert not producers & {f"{u.name}.post_attention_layernorm", f"{u.name}.post_feedforward_layernorm"}
        assert set(u.norms.values()) == {NormKind.RMSNORM_OFFSET} and len(u.norms) == 6
        assert u.attention.qk_norm and u.attention.rope
    # independent check of the claim: the MLP's gate projection reads exactly pre_feedforward_layernorm's output
    u = a.stacks(["lm"])[0].units[0]
    got: dict[str, torch.Tensor] = {}
    hooks = [u.module.pre_feedforward_layernorm.register_forward_hook(lambda m, i, o: got.setdefault("norm", o)),
             u.module.mlp.gate_proj.register_forward_pre_hook(lambda m, i: got.setdefault("gate", i[0]))]
    with torch.no_grad():
        a.model(**a.encode([CalibrationSet.from_task(ScienceQA(), 1, seed=0).requests[0]]))
    for h in hooks:
        h.remove()
    assert torch.equal(got["norm"], got["gate"])


def test_an_unknown_layer_architecture_is_refused_by_name(model_dirs):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    class MysteryDecoderLayer(LlamaDecoderLayer):
        pass

    a = LlavaAdapter.load(model_dirs["tiny"])
    for layer in a.model.model.language_model.layers:
        layer.__class__ = MysteryDecoderLayer
    with pytest.raises(HarnessError) as err:
        a.stacks()
    msg = str(err.value)
    assert "\n" not in msg and "MysteryDecoderLayer" in msg
    assert "known:" in msg and "LlamaDecoderLayer" in msg and "Gemma3DecoderLayer" in msg
    assert a.stacks(["vision", "projector"])  # the other stacks are still described


def _signature(stacks) -> list:
    return [(s.name, s.root, s.final_norm,
             [(u.name, u.stack, u.index, u.arch, u.linears, u.attention, u.scale_groups, u.norms, u.used)
              for u in s.units]) for s in stacks]


@pytest.mark.parametrize("arch", ARCHS)
def test_describe_config_on_a_meta_skeleton_matches_the_loaded_model(model_dirs, arch):
    a = LlavaAdapter.load(model_dirs[arch])
    meta = describe_config(a.model.config)
    assert all(p.is_meta for s in meta for u in s.units for p in u.module.parameters())
    loaded = a.stacks()
    assert _signature(meta) == _signature(loaded)
    # and the loaded description agrees with the config it came from
    text = a.model.config.text_config
    lm = loaded[-1]
    assert len(lm.units) == text.num_hidden_layers
    assert {(u.attention.heads, u.attention.kv_heads) for u in lm.units} == {(text.num_attention_heads,
                                                                             text.num_key_value_heads)}
    linears = [f for s in loaded for u in s.units for f in u.linears]
    assert sorted(linears) == sorted(a.linear_names(["vision", "projector", "lm"]))


# -- end to end ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gptq_awq_smoothquant_qvlm_run_end_to_end_on_tiny_gemma(tiny_gemma_dir, tmp_path):
    """Every method that walks the model's structure, through `harness run`, on the Gemma3 + DINOv2 architecture."""
    from qvlm_harness.cli import main
    from qvlm_harness.store import Store

    out = tmp_path / "out"
    methods = ("rtn", "awq", "gptq", "smoothquant", "zeroquant-v2", "qvlm")
    code = main(["run", "--model", str(tiny_gemma_dir), "--methods", ",".join(methods), "--tasks", "sqa",
                 "--bits", "w4a16,w8a8", "--limit", "2", "--calib-samples", "4", "--max-new-tokens", "2",
                 "--method-option", "qvlm.iters=2", "--output", str(out), "--no-progress"])
    assert code == 0
    got = {(r.method, r.bits) for r in Store(out / "harness.db").rows()}
    assert {(m, b) for m in methods for b in ("w4a16", "w8a8")} <= got

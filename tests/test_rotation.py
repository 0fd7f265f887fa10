"""QuaRot rotation through the seam (qvlm_harness.models.rotation), on the tiny Llava.

The rotated float model computes the FP function (logits within 1e-4 relative, the same greedy answers); with an
injected outlier channel, rotation makes RTN W4A4 much closer to FP than RTN W4A4 alone; the online Hadamards
survive every registered method's module swaps, the packed kernels and a checkpoint round trip; the planner
refuses what cannot be rotated in one line; a cell's identity changes only when it is rotated."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qvlm_harness import plugins
from qvlm_harness.calibration import CalibrationSet
from qvlm_harness.checkpoint import load_quantized, save_quantized
from qvlm_harness.config import QuantSpec, RunSpec
from qvlm_harness.errors import HarnessError
from qvlm_harness.kernels.convert import convert_to_packed
from qvlm_harness.kernels.linear import IntLinear
from qvlm_harness.models.llava import LlavaAdapter
from qvlm_harness.models.rotation import RotationTransform, rotate_model
from qvlm_harness.models.tiny import tiny_gemma_model_path
from qvlm_harness.models.transforms import replay_transforms
from qvlm_harness.plan import make_plan
from qvlm_harness.quant.apply import quantize_linears, set_submodule
from qvlm_harness.quant.online import OnlineHadamard, attach_online_transform, online_transform, online_transforms
from qvlm_harness.quant.qlinear import QLinear
from qvlm_harness.quantize import quantize
from tests.test_conformance import BUDGET

LM = "model.language_model.layers"
ONLINE = {f"{LM}.{i}.{name}" for i in range(2) for name in ("mlp.down_proj", "self_attn.o_proj")}


@pytest.fixture(scope="module")
def samples():
    """Four ScienceQA train prompts (the last with an image) and their answers."""
    return CalibrationSet.from_task(plugins.tasks.get("sqa")(), 4, 0)


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return LlavaAdapter.load(tiny_model_dir)


def fresh(adapter: LlavaAdapter) -> LlavaAdapter:
    return LlavaAdapter(copy.deepcopy(adapter.model), adapter.processor, adapter.name, adapter.path)


def logits(adapter: LlavaAdapter, requests) -> torch.Tensor:
    with torch.inference_mode():
        return adapter.model(**adapter.encode(requests)).logits.double()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def mean_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """KL(P || Q) per position, nats."""
    p = torch.log_softmax(p_logits, -1)
    q = torch.log_softmax(q_logits, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


# -- exactness ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_a_rotated_float_model_computes_the_fp_function(base, samples, kind):
    rotated = fresh(base)
    report = rotate_model(rotated, kind, seed=0)
    assert set(report["online"]) == ONLINE and set(online_transforms(rotated.model)) == ONLINE
    assert rotated.transforms == [RotationTransform(kind, 0)]
    ref, got = logits(base, samples.requests), logits(rotated, samples.requests)
    assert relative(got, ref) <= 1e-4
    # the weights really moved, and the norms were folded to the identity scale
    lm, lm0 = rotated.model.model.language_model, base.model.model.language_model
    assert not torch.allclose(lm.layers[0].self_attn.q_proj.weight, lm0.layers[0].self_attn.q_proj.weight)
    assert torch.equal(lm.layers[0].input_layernorm.weight, torch.ones_like(lm.layers[0].input_layernorm.weight))
    want = [r.text for r in base.answer(samples.requests)]
    assert [r.text for r in rotated.answer(samples.requests)] == want


def test_a_tied_embedding_and_head_are_untied_and_the_config_says_so(base, samples):
    tied = fresh(base)
    tied.model.lm_head.weight = tied.model.get_input_embeddings().weight  # as SmolLM2 (the default) ships
    tied.model.config.tie_word_embeddings = True
    ref = logits(tied, samples.requests)
    report = rotate_model(tied, "hadamard", seed=1)
    assert report["untied_lm_head"] and tied.model.config.tie_word_embeddings is False
    assert tied.model.lm_head.weight.data_ptr() != tied.model.get_input_embeddings().weight.data_ptr()
    assert relative(logits(tied, samples.requests), ref) <= 1e-4


def test_the_rotation_replays_alone_on_a_fresh_model(base, samples):
    rotated = fresh(base)
    rotate_model(rotated, "hadamard", seed=3)
    replayed = fresh(base)
    replay_transforms(rotated.transforms, replayed)
    for (name, a), b in zip(rotated.model.state_dict().items(), replayed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert online_transforms(replayed.model) == online_transforms(rotated.model)


def test_rotating_twice_or_after_quantizing_is_refused(base):
    a = fresh(base)
    quantize_linears(a.model, QuantSpec.parse("w8a8"), include=[LM])
    with pytest.raises(HarnessError, match="rotate before quantizing"):
        rotate_model(a, "hadamard", seed=0)


# -- the online transform through module swaps -------------------------------------------------------------------------
def test_the_online_transform_moves_to_replacements_and_is_applied_once():
    parent = nn.Sequential(nn.Linear(8, 3))
    t = OnlineHadamard(8)
    attach_online_transform(parent[0], t)
    x = torch.randn(2, 8)
    want = parent[0].weight.detach() @ t.apply(x).T
    q = QLinear.from_linear(parent[0], QuantSpec())
    set_submodule(parent, "0", q)
    assert online_transform(q) is t
    torch.testing.assert_close(parent(x).detach().T - q.bias.detach()[:, None], want)

    class Wrapper(nn.Module):  # holds the old module as a child (LoRC, a capture wrapper...)
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    set_submodule(parent, "0", Wrapper(q))
    assert online_transform(parent[0]) is t and online_transform(q) is None  # once, at the outermost module
    torch.testing.assert_close(parent(x).detach().T - q.bias.detach()[:, None], want)
    set_submodule(parent, "0", q)  # and back
    assert online_transform(q) is t
    copied = copy.deepcopy(parent)  # a deep copy keeps it (and its own hook, not the original's)
    assert online_transform(copied[0]) == t
    torch.testing.assert_close(copied(x), parent(x))


def test_quantized_layers_quantize_the_rotated_input(base, samples):
    """Per-token activation quantization sees the Hadamard-transformed input: what QLinear.quantize_input receives
    is the transform of the layer's raw input."""
    a = fresh(base)
    rotate_model(a, "hadamard", seed=0)
    quantize_linears(a.model, QuantSpec.parse("w8a8"), include=[LM])
    q = a.model.get_submodule(f"{LM}.0.mlp.down_proj")
    t = online_transform(q)
    assert isinstance(q, QLinear) and t == OnlineHadamard(256)
    raw, seen = [], []
    q.register_forward_pre_hook(lambda _m, args: raw.append(args[0]), prepend=True)  # before the Hadamard
    original = q.quantize_input
    q.quantize_input = lambda x: (seen.append(x), original(x))[1]
    logits(a, samples.requests[:1])
    assert len(raw) == len(seen) == 1
    torch.testing.assert_close(seen[0], t.apply(raw[0]))
    assert not torch.allclose(seen[0], raw[0])


def with_outlier_channels(adapter: LlavaAdapter, factor: float = 50.0) -> LlavaAdapter:
    """The same float function with outlier activation channels: each pre-norm's weight scaled up on one channel
    and its readers' input columns scaled down to match (q/k/v and gate/up see a channel `factor` times the
    others), and one up_proj row scaled up with down_proj's column to match (down_proj's input has one too)."""
    out = fresh(adapter)
    with torch.no_grad():
        for layer in out.model.model.language_model.layers:
            layer.input_layernorm.weight[5] *= factor
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                lin.weight[:, 5] /= factor
            layer.post_attention_layernorm.weight[17] *= factor
            for lin in (layer.mlp.gate_proj, layer.mlp.up_proj):
                lin.weight[:, 17] /= factor
            layer.mlp.up_proj.weight[9] *= factor
            layer.mlp.down_proj.weight[:, 9] /= factor
    return out


@pytest.mark.parametrize("execution", ["simulated", "packed"])
def test_rotation_beats_plain_rtn_at_w4a4_on_a_model_with_outlier_channels(base, samples, execution):
    """Per-token 4-bit activations lose the ordinary channels next to an outlier one; rotated, they do not."""
    outlier = with_outlier_channels(base)
    ref = logits(base, samples.requests)
    assert relative(logits(outlier, samples.requests), ref) <= 1e-5  # the same function
    spec = QuantSpec.parse("w4a4")
    rtn = plugins.methods.get("rtn")()
    plain = quantize(fresh(outlier), rtn, spec, scope=("lm",), execution=execution, kernel_backend="torch")
    rotated = quantize(fresh(outlier), rtn, spec, scope=("lm",), execution=execution, kernel_backend="torch",
                       rotate="hadamard")
    assert rotated.report["rotation"]["kind"] == "hadamard" and "rotate" in rotated.search_cost.stages
    if execution == "packed":
        packed = [m for m in rotated.adapter.model.modules() if isinstance(m, IntLinear)]
        assert sum(online_transform(m) is not None for m in packed) == len(ONLINE)
    err_plain = relative(logits(plain.adapter, samples.requests), ref)
    err_rotated = relative(logits(rotated.adapter, samples.requests), ref)
    assert err_rotated < 0.7 * err_plain, (err_rotated, err_plain)
    assert mean_kl(ref, logits(rotated.adapter, samples.requests)) < mean_kl(ref, logits(plain.adapter,
                                                                                         samples.requests))


# -- every method, rotated ---------------------------------------------------------------------------------------------
def _quantizing() -> list[str]:
    return [n for n in plugins.methods.names() if not plugins.methods.get(n).fixed_precision]


def _method(name: str):
    return plugins.methods.get(name)(**BUDGET.get(name, {}))


FIDELITY_BITS = ("w8a8", "w8a16", "w4a16")


@pytest.mark.parametrize("name", _quantizing())
def test_every_method_runs_rotated_and_keeps_the_online_hadamards(name, base, samples):
    """At w4a4 (where supported) every method quantizes the rotated model and leaves one online transform at each
    rotated layer; at a gentle setting the rotated result is about as close to FP as the unrotated one (a method
    that dropped a transform would be off by the whole function)."""
    method = _method(name)
    calibration = CalibrationSet(samples.task, samples.requests[::3], samples.targets[::3], samples.seed)
    ref = logits(base, samples.requests)
    w4a4 = QuantSpec.parse("w4a4")
    if method.supports(w4a4) is None:
        qm = quantize(fresh(base), method, w4a4, calibration if method.needs_calibration(w4a4) else None,
                      measure_fp_pass=False, rotate="hadamard")
        assert set(online_transforms(qm.adapter.model)) == ONLINE
        assert torch.isfinite(logits(qm.adapter, samples.requests)).all()
    spec = next(QuantSpec.parse(t) for t in FIDELITY_BITS if method.supports(QuantSpec.parse(t)) is None)
    calib = calibration if method.needs_calibration(spec) else None
    plain = quantize(fresh(base), method, spec, calib, measure_fp_pass=False)
    rotated = quantize(fresh(base), method, spec, calib, measure_fp_pass=False, rotate="hadamard")
    hooks = [m for m in rotated.adapter.model.modules() if online_transform(m) is not None]
    assert len(hooks) == len(ONLINE) and set(online_transforms(rotated.adapter.model)) == ONLINE
    err_plain = relative(logits(plain.adapter, samples.requests), ref)
    err_rotated = relative(logits(rotated.adapter, samples.requests), ref)
    assert err_rotated <= 2 * err_plain + 0.05, (spec.tag, err_rotated, err_plain)


# -- checkpoints -------------------------------------------------------------------------------------------------------
def test_a_rotated_quantized_checkpoint_loads_with_its_online_transforms(base, samples, tmp_path):
    spec = QuantSpec.parse("w4a4")
    qm = quantize(fresh(base), plugins.methods.get("rtn")(), spec, rotate="hadamard")
    before = logits(qm.adapter, samples.requests)
    folder = save_quantized(qm, tmp_path / "ck", describe="rtn rotated", base_model="tiny", fingerprint="x",
                            scope=("vision", "projector", "lm"))
    loaded, manifest = load_quantized(folder)
    assert set(manifest["online_transforms"]) == ONLINE
    assert manifest["report"]["rotation"]["kind"] == "hadamard"
    assert loaded.model.config.tie_word_embeddings is False
    assert torch.equal(logits(loaded, samples.requests), before)
    packed = convert_to_packed(loaded.model, backend="torch")
    assert packed.complete and set(online_transforms(loaded.model)) == ONLINE
    got = logits(loaded, samples.requests)
    assert relative(got, before) <= 0.25 * relative(before, logits(base, samples.requests))


# -- planner, identity, CLI --------------------------------------------------------------------------------------------
def _spec(model, tmp_path, **kw) -> RunSpec:
    return RunSpec(**({"methods": ["rtn"], "tasks": ["sqa"], "model": str(model), "limit": 2,
                       "output": tmp_path / "out"} | kw))


def test_rotation_joins_a_cells_identity_only_when_rotated(tiny_model_dir, tmp_path):
    plain = make_plan(_spec(tiny_model_dir, tmp_path))
    none = make_plan(_spec(tiny_model_dir, tmp_path, rotate="none"))
    rotated = make_plan(_spec(tiny_model_dir, tmp_path, rotate="hadamard"))
    randomised = make_plan(_spec(tiny_model_dir, tmp_path, rotate="random"))
    cell = plain.cells[0]
    assert "rotate" not in plain.identity(cell) and plain.cell_id(cell) == none.cell_id(cell)
    assert rotated.identity(cell)["rotate"] == "hadamard"
    assert len({plain.cell_id(cell), rotated.cell_id(cell), randomised.cell_id(cell)}) == 3


def test_the_planner_refuses_a_model_the_rotation_cannot_fold_through(tmp_path):
    gemma = tiny_gemma_model_path(tmp_path / "gemma")
    with pytest.raises(HarnessError) as err:
        make_plan(_spec(gemma, tmp_path, rotate="hadamard"))
    text = str(err.value)
    assert "\n" not in text and "--rotate hadamard cannot rotate this model" in text and "branch outputs" in text
    with pytest.raises(HarnessError, match="unknown rotate"):
        make_plan(_spec(gemma, tmp_path, rotate="givens"))


def test_run_with_rotate_labels_rows_and_gives_the_fp_answers_for_fp32(tiny_model_dir, tmp_path, capsys):
    from tests.test_cli import run_cli

    common = ["run", "--model", str(tiny_model_dir), "--tasks", "sqa", "--limit", "3", "--no-progress",
              "--output", str(tmp_path / "out")]
    code, out_plain, err = run_cli(capsys, *common, "--methods", "fp32")
    assert code == 0, err
    code, out, err = run_cli(capsys, *common, "--methods", "fp32,rtn", "--bits", "w8a8", "--rotate", "hadamard")
    assert code == 0, err
    assert "fp32+hadamard" in out and "rtn+hadamard" in out
    from qvlm_harness.store import Store

    rows = Store(tmp_path / "out" / "harness.db").rows()
    by = {(r.method, r.settings.get("rotate")): r for r in rows}
    fp, fp_rot = by[("fp32", "none")], by[("fp32", "hadamard")]
    assert fp.cell_id != fp_rot.cell_id and fp.metrics == fp_rot.metrics
    assert fp_rot.measurements["fidelity"]["transforms_alone"]["kl_mean"] <= 1e-3
    assert "Rotated first" in by[("rtn", "hadamard")].describe


def test_bench_twins_every_quantized_variant_with_its_rotated_one():
    from qvlm_harness.bench import BenchConfig, split_rotation, variant_specs

    cfg = BenchConfig(methods=["rtn", "gptq+random"], bits=[QuantSpec.parse("w4a4")], rotate="hadamard")
    names = [n for n, _ in variant_specs(cfg)]
    assert names == ["fp32", "rtn", "rtn+hadamard", "gptq+random"]
    assert split_rotation("rtn+hadamard") == ("rtn", "hadamard") and split_rotation("rtn") == ("rtn", "none")
    with pytest.raises(HarnessError, match="unknown rotation"):
        split_rotation("rtn+givens")

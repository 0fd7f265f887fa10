"""The one-run GPTQ pass against the run-per-group way it replaced.

`BlockContext.run_grouped` (every batch waits at a group until the group is solved) must compute exactly what one
run of the block per group plus one for the outputs computes; the GPTQ pass built on it (one float32 Hessian per
group, the group's members solved as one matrix) must give the weights of the former pass (float64 Hessian per
layer, each layer solved alone, one run per group) up to float rounding, whose effect is measured here.
References are written out in this file with the public per-group API (`run_with_inputs`, `run`).
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from qvlm_harness.calibration import CalibrationSet
from qvlm_harness.config import QuantSpec
from qvlm_harness.errors import HarnessError
from qvlm_harness.models.llava import LlavaAdapter
from qvlm_harness.models.tiny import tiny_gemma_model_path
from qvlm_harness.quant.apply import set_submodule
from qvlm_harness.quant.gptq import HessianAccumulator, gptq_pass, gptq_quantize, hessian
from qvlm_harness.quant.pausable import Pausable
from qvlm_harness.quant.qlinear import QLinear
from qvlm_harness.quant.sequential import Batch, BlockContext, run_sequential, valid_rows
from qvlm_harness.tasks.sqa import ScienceQA

SCOPE = ("vision", "projector", "lm")


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir, tmp_path_factory):
    return {"tiny": tiny_model_dir,
            "tiny-gemma": tiny_gemma_model_path(tmp_path_factory.mktemp("tiny-gemma") / "tiny-gemma")}


@pytest.fixture(scope="module")
def calib():
    return CalibrationSet.from_task(ScienceQA(), 12, seed=0)


def rtn_solver(ctx: BlockContext, groups, spec: QuantSpec):
    """A deterministic solve: RTN QLinears at the group's members (what the block computes next depends on it)."""
    def solve(i: int) -> None:
        for f in groups[i]:
            set_submodule(ctx.model, f, QLinear.from_linear(ctx.module(f), spec, name=f))
    return solve


@pytest.mark.parametrize("arch", ["tiny", "tiny-gemma"])
def test_grouped_run_equals_one_run_per_group(model_dirs, calib, arch):
    """Same inputs seen at every group of every unit (bit for bit), same propagated outputs, same weights."""
    spec = QuantSpec.parse("w3a16")
    seen: dict[str, dict] = {"grouped": {}, "per_group": {}}
    outs: dict[str, dict] = {"grouped": {}, "per_group": {}}
    models = {}
    for way in seen:
        a = LlavaAdapter.load(model_dirs[arch])

        def process(ctx, way=way) -> None:
            groups = ctx.input_groups()
            got = seen[way].setdefault(ctx.name, [[] for _ in groups])
            solve = rtn_solver(ctx, groups, spec)
            if way == "grouped":
                outs[way][ctx.name] = ctx.run_grouped(groups, lambda i, x, b: got[i].append(x.clone()), solve)
            else:
                for i, g in enumerate(groups):
                    ctx.run_with_inputs(g[:1], lambda _f, x, b, i=i: got[i].append(x.clone()))
                    solve(i)
                outs[way][ctx.name] = ctx.run()

        run_sequential(a, calib, SCOPE, a.linear_names(SCOPE), process, batch_size=4)
        models[way] = a.model
    assert seen["grouped"].keys() == seen["per_group"].keys() and len(seen["grouped"]) > 3
    for unit, groups in seen["grouped"].items():
        ref = seen["per_group"][unit]
        assert len(groups) == len(ref) >= 1
        for mine, theirs in zip(groups, ref, strict=True):
            assert len(mine) == len(theirs) > 0
            assert all(torch.equal(x, y) for x, y in zip(mine, theirs, strict=True)), unit
        assert all(torch.equal(x, y) for x, y in zip(outs["grouped"][unit], outs["per_group"][unit], strict=True))
    sd = {k: models["per_group"].state_dict()[k] for k in models["per_group"].state_dict()}
    assert all(torch.equal(v, sd[k]) for k, v in models["grouped"].state_dict().items())


def former_gptq_pass(adapter, calibration, spec, *, float64: bool):
    """The GPTQ pass as it was: one run of the block per group, a Hessian per layer (float64 per batch, or float32
    over all batches), each layer solved alone, one more run for the outputs."""
    model = adapter.model
    wanted = adapter.linear_names(SCOPE)

    def process(ctx) -> None:
        for group in ctx.input_groups():
            rows: dict[str, list] = {f: [] for f in group}
            accs = {f: HessianAccumulator(ctx.module(f).in_features) for f in group}

            def see(f, x, b, rows=rows, accs=accs):
                if float64:
                    accs[f].add(valid_rows(x.detach(), b.mask))
                else:
                    rows[f].append(valid_rows(x.detach(), b.mask).float())

            ctx.run_with_inputs(group, see)
            for f in group:
                lin = ctx.module(f)
                H = accs[f].value() if float64 else hessian(rows[f])
                res = gptq_quantize(lin.weight, H, spec.w_bits, spec.w_symmetric, spec.w_group_size)
                q = QLinear.from_codes(res.codes, res.qparams, lin.bias.detach() if lin.bias is not None else None,
                                       spec, dtype=lin.weight.dtype, name=f)
                q.calibrating = True
                set_submodule(model, f, q)

    run_sequential(adapter, calibration, SCOPE, wanted, process, propagate="quantized")
    return {f: model.get_submodule(f).codes.clone() for f in wanted}


def kl_to(reference: list[torch.Tensor], adapter: LlavaAdapter, evalset: CalibrationSet) -> float:
    """Mean KL(reference || model) of next-token distributions over the real tokens of `evalset`."""
    got = logits(adapter, evalset)
    kl = sum(float(nn.functional.kl_div(q.log_softmax(-1), p.log_softmax(-1), log_target=True, reduction="sum"))
             for p, q in zip(reference, got, strict=True))
    return kl / sum(p.shape[0] for p in reference)


def logits(adapter: LlavaAdapter, evalset: CalibrationSet) -> list[torch.Tensor]:
    with torch.no_grad():
        return [adapter.model(**b.inputs, use_cache=False).logits[b.token_mask] for b in
                adapter.calibration_batches(evalset)]


@pytest.mark.parametrize("tag", ["w3a16", "w4a16", "w4a16g32"])
def test_gptq_pass_keeps_the_former_pass_weights(tiny_model_dir, calib, tag):
    """Against the former pass with the same float32 Hessians every code is equal (the grouped run, shared
    Hessians and member-stacked solves change no rounding here). Against the former float64 Hessians (measured:
    all codes equal at w3a16 and w4a16, a handful differ at w4a16g32): a near-tie that float32 rounding flips
    (the tiny vision tower's first layer has a Hessian condition number near 1e10) changes a code, and the flip
    propagates through GPTQ's error feedback and the later layers' inputs, so the bound is 99% of the codes equal
    and KL to the float model within 15% of the former's."""
    spec = QuantSpec.parse(tag)
    evalset = CalibrationSet.from_task(ScienceQA(), 8, seed=5)
    fp = logits(LlavaAdapter.load(tiny_model_dir), evalset)
    results = {}
    for way in ("new", "former32", "former64"):
        a = LlavaAdapter.load(tiny_model_dir)
        if way == "new":
            names = a.linear_names(SCOPE)
            gptq_pass(a, calib, spec, SCOPE, layer_spec=lambda f, lin: spec)
            codes = {f: a.model.get_submodule(f).codes for f in names}
        else:
            codes = former_gptq_pass(a, calib, spec, float64=way == "former64")
        for m in a.model.modules():
            if hasattr(m, "calibrating"):
                m.calibrating = False
        results[way] = (codes, kl_to(fp, a, evalset))
    new, former32, former64 = results["new"][0], results["former32"][0], results["former64"][0]
    assert new.keys() == former32.keys()
    assert all(torch.equal(new[f], former32[f]) for f in new)
    equal = sum(int((new[f] == former64[f]).sum()) for f in new) / sum(new[f].numel() for f in new)
    assert equal > 0.99
    kl_new, kl_former = results["new"][1], results["former64"][1]
    assert 0 < kl_new < 1.15 * kl_former, (kl_new, kl_former)


def test_float32_hessian_is_2xtx_over_n_to_float_rounding():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, 96, generator=g) * (1 + 4 * torch.rand(96, generator=g)) for n in (700, 1300, 5)]
    x = torch.cat(chunks).double()
    ref = 2 * x.T @ x / x.shape[0]
    H = hessian(chunks)
    assert H.dtype == torch.float32
    assert float((H.double() - ref).abs().max() / ref.abs().max()) < 1e-6
    with pytest.raises(HarnessError, match="no calibration tokens"):
        hessian([torch.empty(0, 96)])


class TwiceBlock(nn.Module):
    """fc1 is called twice per forward (a shared layer): one run cannot see its second call before solving it."""

    def __init__(self, d=16):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, d)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.tanh(self.fc1(x)))))


class SwitchBlock(nn.Module):
    """Calls its two linears in an order that depends on the batch."""

    def __init__(self, d=16):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)

    def forward(self, x):
        if x.shape[0] == 3:
            return self.a(torch.relu(self.b(x)))
        return self.b(torch.relu(self.a(x)))


def block_ctx(block: nn.Module, sizes=(2, 2, 2)) -> BlockContext:
    """A context for `block` installed as ``root`` of a model, with random batches of the given sizes."""
    g = torch.Generator().manual_seed(1)
    model = nn.Module()
    model.root = block
    batches = [Batch((torch.randn(n, 16, generator=g),), {}) for n in sizes]
    names = [f"root.{n}" for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    return BlockContext("lm", "root", block, batches, names, model)


def test_block_calling_a_linear_twice_gets_one_run_per_group():
    spec = QuantSpec.parse("w3a16")
    results = []
    for grouped in (True, False):
        ctx = block_ctx(TwiceBlock())
        groups = ctx.input_groups()
        seen: list[list[torch.Tensor]] = [[] for _ in groups]
        solve = rtn_solver(ctx, groups, spec)
        if grouped:
            out = ctx.run_grouped(groups, lambda i, x, b, seen=seen: seen[i].append(x.clone()), solve)
        else:
            for i, gr in enumerate(groups):
                ctx.run_with_inputs(gr[:1], lambda _f, x, b, i=i, seen=seen: seen[i].append(x.clone()))
                solve(i)
            out = ctx.run()
        results.append((seen, out))
    (s1, o1), (s2, o2) = results
    # input_groups lists fc1 once per distinct input; each of its groups sees both calls of every batch
    assert [len(s) for s in s1] == [len(s) for s in s2] == [6, 6, 3]
    assert all(torch.equal(x, y) for a, b in zip(s1, s2, strict=True) for x, y in zip(a, b, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(o1, o2, strict=True))


def test_batch_dependent_call_order_is_refused_and_cleaned_up():
    ctx = block_ctx(SwitchBlock(), sizes=(2, 3))
    before = threading.active_count()
    with pytest.raises(HarnessError, match="order"):
        ctx.run_grouped(ctx.input_groups(), lambda i, x, b: None, lambda i: None)
    assert "forward" not in ctx.block.a.__dict__ and "forward" not in ctx.block.b.__dict__
    assert threading.active_count() == before


def test_a_failing_solve_ends_every_paused_batch():
    ctx = block_ctx(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)))
    before = threading.active_count()

    def solve(i):
        raise RuntimeError("solver failed")

    with pytest.raises(RuntimeError, match="solver failed"):
        ctx.run_grouped(ctx.input_groups(), lambda i, x, b: None, solve)
    assert threading.active_count() == before
    assert "forward" not in ctx.block[0].__dict__


@pytest.mark.parametrize("arch", ["tiny", "tiny-gemma"])
def test_input_groups_shared_by_units_of_one_class_are_each_units_own(model_dirs, calib, arch):
    a = LlavaAdapter.load(model_dirs[arch])
    checked = []

    def process(ctx) -> None:
        alone = BlockContext(ctx.stack, ctx.name, ctx.block, ctx.batches, ctx.linears, ctx.model, ctx.unit)
        assert ctx.input_groups() == alone.input_groups()
        checked.append(ctx.name)

    run_sequential(a, calib, SCOPE, a.linear_names(SCOPE), process, propagate="float", batch_size=6)
    assert len(checked) == sum(len(s.units) for s in a.stacks())


def test_pausable_runs_in_steps_and_hands_back_errors():
    log = []

    def work(p: Pausable):
        log.append(("worker", torch.is_grad_enabled()))
        p.pause("first")
        log.append("after first")
        p.pause("second")
        raise ValueError("boom")

    p = Pausable(work)
    p.step()
    assert p.at == "first" and log == [("worker", False)] and not p.done
    p.step()
    assert p.at == "second" and log[-1] == "after first"
    with pytest.raises(ValueError, match="boom"):
        p.step()
    assert p.done
    q = Pausable(lambda pp: pp.pause(1) or log.append("never"))
    q.step()
    q.close()
    assert q.done and log[-1] == "after first"

"""aespa's fast learned rounding computes what the reference loop computes: the fused step's gradient against
autograd of the objective + regulariser, the fused loop against the reference loop (float32: the same codes), the
bfloat16 product against float32, the compiled step against eager, and the paper preset."""

from __future__ import annotations

import pytest
import torch

from qvlm_harness import plugins
from qvlm_harness.config import QuantSpec
from qvlm_harness.errors import HarnessError
from qvlm_harness.methods.aespa.adaround import (
    BETA1,
    BETA2,
    GAMMA,
    ZETA,
    Objective,
    learn_rounding,
    learn_rounding_reference,
    qparams_for_ratio,
    rounding_step,
    rounding_step_fn,
)
from qvlm_harness.methods.aespa.method import PAPER
from qvlm_harness.quant.quantizer import qrange


def problem(seed: int, out: int = 24, inp: int = 48, heads: int = 0, bits: int = 3, group: int | None = None):
    """A weight, an objective (layer-wise, or per-head with an output-side G as aespa's query/key objectives) and
    its grid."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g)
    X = torch.randn(300, inp, generator=g) @ torch.randn(inp, inp, generator=g)
    G = None
    if heads:
        B = torch.randn(heads, out // heads, out // heads, generator=g)
        G = B @ B.transpose(-1, -2) / (out // heads)
    obj = Objective(2 * X.T @ X / 300, G).damped(0.01)
    return W, obj, qparams_for_ratio(W, 1.0, bits, True, group)


def _expand(t, cols, group):
    return t.repeat_interleave(group, dim=1) if group else t.expand(-1, cols)


@pytest.mark.parametrize(("heads", "group"), [(0, None), (4, None), (0, 16)])
@pytest.mark.parametrize("rw", [0.0, 1.5])
def test_rounding_step_gradient_equals_autograd(heads, group, rw):
    """The gradient `rounding_step` feeds Adam equals autograd of ``obj(Q(V) - W) + rw * sum(1 - |2h - 1|^b)``
    (float64, relative 1e-10): checked through the Adam update itself - one step from zero moments moves V by
    ``-lr * g / (|g| + eps)``, so the first moment it returns is ``(1 - beta1) * g``."""
    W, obj, qp = problem(0, heads=heads, group=group)
    W, obj = W.double(), Objective(obj.H.double(), None if obj.G is None else obj.G.double(), obj.heads)
    s = _expand(qp.scale.double(), W.shape[1], group)
    z = _expand(qp.zero_point.double(), W.shape[1], group)
    base = torch.floor(W / s)
    g = torch.Generator().manual_seed(1)
    v = (torch.randn(W.shape, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    b = 7.0
    qmin, qmax = qrange(qp.bits, qp.symmetric)
    h = torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)
    q = torch.clamp(base + h + z, qmin, qmax)
    E = (q - z) * s - W
    M = obj._split(E) @ obj.H
    loss = ((obj.G @ M if obj.G is not None else M).reshape(E.shape) * E).sum()
    loss = loss + rw * (1 - (2 * h - 1).abs().pow(b)).sum()
    loss.backward()
    E = E.detach()
    bounds = torch.tensor([float(qmin), float(qmax)], dtype=torch.float64)
    hyper = torch.tensor([0.01 / (1 - BETA1), (1 - BETA2) ** 0.5, rw, b], dtype=torch.float64)
    zeros = torch.zeros_like(W)
    _, m, _, _ = rounding_step(v.detach(), zeros, zeros, obj.grad_half(E), base, z, s, W, bounds, hyper)
    grad = m / (1 - BETA1)
    assert float(v.grad.abs().max()) > 0
    assert torch.allclose(grad, v.grad, rtol=1e-10, atol=1e-12 * float(v.grad.abs().max()))


@pytest.mark.parametrize(("heads", "group"), [(0, None), (4, None), (0, 16)])
def test_fused_loop_in_float32_gives_the_reference_codes(heads, group):
    """300 iterations: the fused float32 loop (one pass per iteration, Adam written in) ends at the reference
    loop's codes and objective (float32 round-off only: identical codes, objective to 1e-5 relative)."""
    W, obj, qp = problem(2, heads=heads, group=group)
    ref = learn_rounding_reference(W, W, obj, qp, iters=300, keep_best=False)
    fused = learn_rounding(W, W, obj, qp, iters=300, keep_best=False, dtype="fp32")
    assert ref.loss < ref.loss_init  # the search did something
    assert torch.equal(ref.codes, fused.codes)
    assert fused.loss == pytest.approx(ref.loss, rel=1e-5)


@pytest.mark.parametrize("heads", [0, 4])
def test_bf16_products_reach_the_float32_objective(heads):
    """With ``G E H`` in bfloat16 the learned rounding's objective (float32) is within 2% of the float32 loop's;
    both are well below the nearest rounding's."""
    W, obj, qp = problem(3, out=48, inp=96, heads=heads)
    f32 = learn_rounding(W, W, obj, qp, iters=400, keep_best=False, dtype="fp32")
    b16 = learn_rounding(W, W, obj, qp, iters=400, keep_best=False, dtype="bf16")
    assert f32.loss < 0.9 * f32.loss_init and b16.loss < 0.9 * b16.loss_init
    assert b16.loss == pytest.approx(f32.loss, rel=0.02)


@pytest.mark.slow  # one torch.compile of the step: 20-80 s on the shared 2-core machine
def test_compiled_step_equals_eager():
    W, obj, qp = problem(4, group=16)
    eager = learn_rounding(W, W, obj, qp, iters=50, keep_best=False, dtype="fp32", compiled=False)
    compiled = learn_rounding(W, W, obj, qp, iters=50, keep_best=False, dtype="fp32", compiled=True)
    assert torch.equal(eager.codes, compiled.codes)
    assert compiled.loss == pytest.approx(eager.loss, rel=1e-5)
    assert rounding_step_fn(True) is rounding_step_fn(True)  # compiled once per process


def test_paper_preset_is_the_official_budget_and_explicit_options_win():
    cls = plugins.methods.get("aespa")
    paper = cls(preset="paper").config
    assert {k: getattr(paper, k) for k in PAPER} == PAPER
    assert paper.num_iters == 2000 and paper.round_layers == "all" and paper.learn_rounding
    cheap = cls(preset="paper", num_iters="100", round_layers="qkv").config
    assert cheap.num_iters == 100 and cheap.round_layers == "qkv" and cheap.lr == 0.015
    assert cheap.changed() == {"preset": "paper", "num_iters": 100, "round_layers": "qkv"}
    d = paper.to_dict()
    assert d["preset"] == "paper" and d["num_iters"] == 2000
    assert type(paper).from_options({k: v for k, v in d.items() if k != "version"}) == paper
    assert paper.canonical() != cheap.canonical()
    text = cls(preset="paper").describe(QuantSpec.parse("w3a16"))
    assert "[preset paper]" in text and "2000 Adam steps with bf16 products" in text
    assert paper.solver_options().compiles() and not cls(num_iters="20").config.solver_options().compiles()
    with pytest.raises(HarnessError, match="search_dtype"):
        cls(search_dtype="fp8")

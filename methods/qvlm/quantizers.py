"""Learnable quantizers for the block-wise search, and the module that carries them until it becomes a `QLinear`.

Weights: uniform on the harness grid (symmetric restricted range, per output channel or per group; asymmetric
with `-wasym`), scale fixed at initialisation (MSE range search by default), rounding learned AdaRound-style
(Nagel et al. 2020): ``W~ = s * (clamp(floor(W/s) + h(V) + z, qmin, qmax) - z)`` with the rectified sigmoid
``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``, zeta = 1.1, gamma = -0.1, V initialised so that
h(V) equals the fractional part of W/s (the soft weight starts at the float weight), and the regulariser
``1 - |2h - 1|^beta`` with beta annealed from 20 to 2 after a warm-up, which drives h to 0 or 1. At the end the
rounding is hard: up where V >= 0 (h >= 0.5), which is round-to-nearest for untouched variables.

Activations: per-token dynamic (nothing to learn: each row's min/max, as `QLinear` does it at inference), or
static per tensor or per input channel (``-channel``: one step per column, simulated only) with learnable step
sizes (LSQ, Esser et al. 2020): the step s receives the straight-through
gradient of the quantizer (round(x/s) - x/s inside the range, the clip level outside), initialised by an MSE
grid search (`qvlm_harness.quant.mse_search_range`); it is optimised in log space, so it stays positive, and is
floored at `MIN_SCALE`. The zero point stays at its initial integer value.

In hard mode (after the search) the forward is bit-identical to the `QLinear` that `to_qlinear` builds: the
weight is the dequantized integer codes and the activation quantizer is the same function with the same scale.

Search-time speed (`fused_soft_weight`): the reference soft weight (`soft_weight`, plain autograd) and the
regulariser (`regulariser`, its own graph) cost about 50 element-wise passes over every weight per step, four
times the block's matrix products. The fused form computes the soft weight, its derivative with respect to V and
the regulariser's gradient in one function of V (`soft_round_parts`, optionally `torch.compile`d into one kernel)
and hands the backward pass a single multiply-add; the regulariser's value, which no step reads, is not computed.
`tests/test_qvlm_quantizers.py` checks its gradient against the reference formulation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qvlm_harness.config import QuantSpec
from qvlm_harness.errors import HarnessError
from qvlm_harness.quant import (
    MIN_SCALE,
    QLinear,
    QParams,
    compute_qparams,
    fake_quantize,
    fake_quantize_per_token,
    mse_search_range,
    per_tensor_qparams,
    weight_qparams,
)
from qvlm_harness.quant.compiled import compiled_once
from qvlm_harness.quant.methodkit import layer_spec

ZETA, GAMMA = 1.1, -0.1


def signed_power(t: Tensor, p: Tensor) -> Tensor:
    """``|t|^p * sign(t)`` for p > 0, as ``exp(p log|t|)`` (0 at t = 0): the compiled kernels vectorise exp and log,
    not pow with a tensor exponent (3-4x faster here, relative difference 6e-8)."""
    a = t.abs()
    return torch.where(a > 0, torch.exp(p * torch.log(a)), 0.0) * torch.sign(t)


def soft_round_parts(v: Tensor, fz: Tensor, zp: Tensor, scale: Tensor, bounds: Tensor, reg: Tensor | None,
                     out_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor | None]:
    """The soft weight ``s * (clamp(fz + h(V), qmin, qmax) - zp)`` (``fz = floor(W/s) + zp``) in `out_dtype`, the
    factor ``dW~/dV`` (so that the gradient of any loss of W~ is ``g * dfac``), and, when `reg` = (coefficient c,
    exponent beta) is given, the gradient of ``c * sum(1 - |2h - 1|^beta)`` with respect to V. `bounds` = (qmin,
    qmax).

    Derivatives follow autograd's conventions for the reference formulation: clamp passes the gradient on its
    closed interval, so ``dh/dV = (zeta - gamma) sigma (1 - sigma)`` where ``0 <= raw <= 1`` and the weight's
    derivative is zero where the code is clipped to the grid's edge."""
    sig = torch.sigmoid(v)
    raw = sig * (ZETA - GAMMA) + GAMMA
    h = raw.clamp(0.0, 1.0)
    q = fz + h
    qc = torch.minimum(torch.maximum(q, bounds[0]), bounds[1])
    w = ((qc - zp) * scale).to(out_dtype)
    dh = torch.where((raw >= 0.0) & (raw <= 1.0), (ZETA - GAMMA) * sig * (1.0 - sig), 0.0)
    dfac = torch.where((q >= bounds[0]) & (q <= bounds[1]), dh * scale, 0.0)
    if reg is None:
        return w, dfac, None
    rgrad = (-2.0 * reg[0] * reg[1]) * signed_power(2.0 * h - 1.0, reg[1] - 1.0) * dh
    return w, dfac, rgrad


def soft_round_fn(compiled: bool):
    """`soft_round_parts`, eager or compiled once per process (`qvlm_harness.quant.compiled`)."""
    return compiled_once(soft_round_parts, compiled)


class _SoftRound(torch.autograd.Function):
    """W~(V) with the precomputed backward factor (and the regulariser's gradient folded into V's gradient)."""

    @staticmethod
    def forward(ctx, v, fz, zp, scale, bounds, reg, compiled, out_dtype):  # type: ignore[override]
        # detached: a Parameter would pin the compiled kernel to its static shape (one recompile per layer shape)
        w, dfac, rgrad = soft_round_fn(compiled)(v.detach(), fz, zp, scale, bounds, reg, out_dtype)
        ctx.save_for_backward(dfac, rgrad)
        return w

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        dfac, rgrad = ctx.saved_tensors
        g = g.float()
        gv = g * dfac if rgrad is None else torch.addcmul(rgrad, g, dfac)
        return gv, None, None, None, None, None, None, None


def init_weight_qparams(w: Tensor, spec: QuantSpec, mse: bool = True, grid: int = 20, min_shrink: float = 0.5,
                        name: str = "") -> QParams:
    """Weight grid (per output channel, or per group of `spec.w_group_size` inputs): min/max, or the range
    shrink with the lowest squared error among `grid` factors from 1.0 to `min_shrink` (a coarser grid than the
    harness default: it runs on every weight of the model, and weights are rarely worth clipping below half)."""
    if not mse:
        return weight_qparams(w, spec.w_bits, spec.w_symmetric, spec.w_group_size, name=name)
    wf = w.detach().float()
    out, k = wf.shape
    g = spec.w_group_size
    if g:
        if k % g:
            raise HarnessError(f"group size {g} does not divide the input width {k} of layer {name}; choose a "
                               f"group size that divides {k}")
        view = wf.reshape(out, k // g, g)
    else:
        view = wf
    what = f"the weight of layer {name}" if name else "the weight"
    lo, hi = mse_search_range(view, spec.w_bits, spec.w_symmetric, dim=-1, grid=grid, min_shrink=min_shrink,
                              what=what)
    qp = compute_qparams(lo, hi, spec.w_bits, spec.w_symmetric, what=what)
    if g:
        return QParams(qp.scale.squeeze(-1), qp.zero_point.squeeze(-1), qp.bits, qp.symmetric, g)
    return qp


def rectified_sigmoid(v: Tensor) -> Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _inverse_h(h: float) -> float:
    """V with rectified_sigmoid(V) = h for h in (0, 1); rectified_sigmoid(-V) = 1 - h (the map is odd-symmetric
    around h = 0.5 because zeta - 1 = -gamma)."""
    s = (h - GAMMA) / (ZETA - GAMMA)
    return math.log(s / (1.0 - s))


def _view(w: Tensor, qp: QParams) -> tuple[Tensor, Tensor, Tensor]:
    """(weight viewed for broadcasting, scale, zero point), grouping ``[out, in] -> [out, in/g, g]``."""
    if qp.group_size is None:
        return w, qp.scale, qp.zero_point.float()
    out, k = w.shape
    g = qp.group_size
    return w.reshape(out, k // g, g), qp.scale.unsqueeze(-1), qp.zero_point.float().unsqueeze(-1)


class AdaRoundWeight(nn.Module):
    """Learnable rounding of one weight matrix on a fixed uniform grid."""

    def __init__(self, weight: Tensor, qp: QParams):
        super().__init__()
        w = weight.detach().float()
        self.shape = tuple(w.shape)
        self.qp = qp.detach()
        wv, scale, zp = _view(w, self.qp)
        scaled = wv / scale
        floor = torch.floor(scaled)
        rest = (scaled - floor).clamp(0.0, 1.0)
        self.register_buffer("floor", floor)
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("zp", zp)
        # h(V0) = rest  <=>  V0 = -log((zeta - gamma) / (rest - gamma) - 1); keep V0 finite at rest in {0, 1}.
        v0 = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)
        self.register_buffer("v_init", v0.clone())
        self.v = nn.Parameter(v0.clone())
        self.register_buffer("fz", floor + zp)
        self.register_buffer("bounds", torch.tensor([float(self.qp.qmin), float(self.qp.qmax)]))
        # set by the block search for one step: (coefficient, beta) of the rounding regulariser whose gradient the
        # fused soft weight adds to V's (None: no regulariser this step)
        self.reg: Tensor | None = None
        # when set, the hard weight is built from this float 0/1 offset tensor instead of sign(v): a leaf that
        # collects the gradient of a loss with respect to each rounding decision (the dependency analysis's
        # flip search reads it)
        self.probe: Tensor | None = None

    def reset(self) -> None:
        with torch.no_grad():
            self.v.copy_(self.v_init)

    def h(self) -> Tensor:
        return rectified_sigmoid(self.v)

    def _dequant(self, offset: Tensor) -> Tensor:
        q = torch.clamp(self.floor + offset + self.zp, self.qp.qmin, self.qp.qmax)
        return ((q - self.zp) * self.scale).reshape(self.shape)

    def soft_weight(self) -> Tensor:
        """The reference formulation (plain autograd), kept for the tests and the dependency analysis."""
        return self._dequant(self.h())

    def fused_soft_weight(self, compiled: bool = False, dtype: torch.dtype = torch.float32) -> Tensor:
        """The same soft weight (in `dtype`: bfloat16 spares autocast a cast per step) with a one-pass backward;
        adds the gradient of the regulariser set in `reg`."""
        w = _SoftRound.apply(self.v, self.fz, self.zp, self.scale, self.bounds, self.reg, compiled, dtype)
        return w.reshape(self.shape)

    def hard_offset(self) -> Tensor:
        return (self.v.detach() >= 0).float()

    def hard_weight(self) -> Tensor:
        return self._dequant(self.hard_offset() if self.probe is None else self.probe)

    def flippable(self) -> Tensor:
        """True where inverting the rounding decision changes the code (false where the grid's edge clamps both
        choices to the same code), shaped like `floor`."""
        off = self.hard_offset()
        lo, hi = self.qp.qmin, self.qp.qmax
        now = torch.clamp(self.floor + off + self.zp, lo, hi)
        other = torch.clamp(self.floor + 1.0 - off + self.zp, lo, hi)
        return now != other

    def flip_(self, mask: Tensor) -> None:
        """Invert the hard rounding decision wherever `mask` (shaped like `floor`) is true."""
        with torch.no_grad():
            up = self.v >= 0
            self.v.copy_(torch.where(mask & up, -self.v.abs().clamp(min=1e-3),
                                     torch.where(mask & ~up, self.v.abs().clamp(min=1e-3), self.v)))

    def codes(self) -> Tensor:
        q = torch.clamp(self.floor + self.hard_offset() + self.zp, self.qp.qmin, self.qp.qmax)
        return q.reshape(self.shape)

    def sharpen_(self, h: float = 0.9) -> None:
        """Move every soft offset to `h` (rounded up) or `1 - h` (rounded down), keeping the hard decisions: a warm
        start whose soft weight is close to its hard weight, with gradients still flowing (h inside (0, 1))."""
        if not 0.5 < h < 1.0:
            raise ValueError("h must be in (0.5, 1)")
        up = _inverse_h(h)
        with torch.no_grad():
            self.v.copy_(torch.where(self.v >= 0, torch.full_like(self.v, up), torch.full_like(self.v, -up)))

    def regulariser(self, beta: float) -> Tensor:
        """Mean over variables of ``1 - |2h - 1|^beta`` (0 when every h is 0 or 1)."""
        return (1.0 - (2.0 * self.h() - 1.0).abs().pow(beta)).mean()


class ActQuantizer(nn.Module):
    """The activation quantizer of one linear input: none, dynamic per token / per tensor, or static per tensor
    (mode "static") or per input channel (mode "channel") with learnable (LSQ) step sizes, one per range."""

    def __init__(self, spec: QuantSpec, in_features: int | None = None):
        super().__init__()
        self.bits = spec.a_bits
        self.symmetric = spec.a_symmetric
        self.enabled = spec.quantizes_activations
        self.mode = ("none" if not self.enabled else "token" if spec.a_granularity == "token"
                     else "tensor-dynamic" if spec.a_dynamic else "channel" if spec.a_granularity == "channel"
                     else "static")
        if self.mode == "channel" and not in_features:
            raise ValueError("per-input-channel activation ranges need the layer's in_features")
        shape = (in_features,) if self.mode == "channel" else ()
        self.log_scale = nn.Parameter(torch.zeros(shape), requires_grad=self.learnable)
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        self.register_buffer("log_scale_init", torch.zeros(shape))
        self.initialised = not self.learnable
        self.bypass = False  # while True the input passes unquantized (to observe inputs for initialisation)

    @property
    def learnable(self) -> bool:
        return self.mode in ("static", "channel")

    def init_from(self, samples: Tensor, grid: int = 40) -> None:
        """MSE-optimal static range of `samples` (valid input rows ``[n, in]``), as the initial step size and zero
        point: one range for the tensor, or one per input channel (the search runs per column)."""
        if not self.learnable:
            return
        dim = 0 if self.mode == "channel" else None
        lo, hi = mse_search_range(samples.float(), self.bits, self.symmetric, dim=dim, grid=grid,
                                  what="the calibration inputs")
        qp = compute_qparams(lo, hi, self.bits, self.symmetric)
        shape = self.log_scale.shape
        with torch.no_grad():
            self.log_scale.copy_(torch.log(qp.scale.reshape(shape)))
            self.log_scale_init.copy_(self.log_scale)
            self.zero_point.copy_(qp.zero_point.reshape(shape))
        self.initialised = True

    def reset(self) -> None:
        with torch.no_grad():
            self.log_scale.copy_(self.log_scale_init)

    def clamp_(self) -> None:
        """Keep the step size finite and >= MIN_SCALE after an optimiser step."""
        with torch.no_grad():
            bad = ~torch.isfinite(self.log_scale)
            if bool(bad.any()):
                self.log_scale.copy_(torch.where(bad, self.log_scale_init, self.log_scale))
            self.log_scale.clamp_(min=math.log(MIN_SCALE))

    def scale(self) -> Tensor:
        return torch.exp(self.log_scale).clamp(min=MIN_SCALE)

    def qparams(self) -> QParams | None:
        if not self.learnable:
            return None
        return QParams(self.scale().detach().float().reshape(self.log_scale.shape), self.zero_point.clone(), self.bits,
                       self.symmetric)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "none" or self.bypass:
            return x
        if self.mode == "token":
            return fake_quantize_per_token(x, self.bits, self.symmetric, ste=True)
        if self.mode == "tensor-dynamic":
            return fake_quantize(x, per_tensor_qparams(x, self.bits, self.symmetric), ste=True)
        if not self.initialised:
            raise RuntimeError("static activation quantizer used before init_from()")
        qp = QParams(self.scale().reshape(self.log_scale.shape), self.zero_point, self.bits, self.symmetric)
        return fake_quantize(x, qp, ste=True)  # a per-channel step [in] broadcasts along the last dim


class LearnableQLinear(nn.Module):
    """An `nn.Linear` under search: learnable rounding + activation quantizer; `to_qlinear()` freezes it."""

    def __init__(self, linear: nn.Linear, spec: QuantSpec, name: str = "", weight_mse: bool = True):
        super().__init__()
        self.name = name
        self.spec = spec = layer_spec(spec, linear.in_features, spec.w_group_size)  # the harness's group rule
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.orig_dtype = linear.weight.dtype
        self.register_buffer("weight_fp", linear.weight.detach().float().clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.rounding: AdaRoundWeight | None = None
        if spec.quantizes_weights:
            qp = init_weight_qparams(self.weight_fp, spec, mse=weight_mse, name=name)
            self.rounding = AdaRoundWeight(self.weight_fp, qp)
        self.act = ActQuantizer(spec, linear.in_features)
        self.soft = False  # soft (continuous h) during the search, hard (integer codes) otherwise
        self.fused = False  # soft weight through `fused_soft_weight` (the search sets it) or the reference
        self.compiled = False  # ... and its compiled kernel
        self.work_dtype: torch.dtype | None = None  # bfloat16 while the search runs under autocast
        self.record: list[Tensor] | None = None  # when a list, valid input rows are appended (act init)

    def weight(self) -> Tensor:
        if self.rounding is None:
            return self.weight_fp
        if not self.soft:
            return self.rounding.hard_weight()
        if self.fused:
            return self.rounding.fused_soft_weight(self.compiled, self.work_dtype or torch.float32)
        return self.rounding.soft_weight()

    def forward(self, x: Tensor) -> Tensor:
        if self.record is not None:
            self.record.append(x.detach().reshape(-1, x.shape[-1]).float())
        xq = self.act(x)
        w = self.weight()
        b = self.bias
        if self.soft and self.work_dtype is not None:  # under the search's autocast, which casts x and b itself
            return F.linear(xq, w, b)
        return F.linear(xq, w.to(x.dtype), None if b is None else b.to(x.dtype))

    def reset(self) -> None:
        if self.rounding is not None:
            self.rounding.reset()
        if self.act.learnable:
            self.act.reset()

    def to_qlinear(self) -> QLinear:
        """The deployable module: integer codes + weight QParams, static activation QParams if any."""
        bias = None if self.bias is None else self.bias.to(self.orig_dtype)
        if self.rounding is None:
            lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(self.weight_fp)
                if self.bias is not None:
                    lin.bias.copy_(self.bias)
            lin = lin.to(self.orig_dtype)
            return QLinear.from_linear(lin, self.spec, act_qparams=self.act.qparams(), name=self.name)
        qp = self.rounding.qp
        return QLinear.from_codes(self.rounding.codes(), qp, bias, self.spec, act_qparams=self.act.qparams(),
                                  dtype=self.orig_dtype, name=self.name)

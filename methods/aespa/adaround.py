"""Weight rounding for quadratic objectives with per-head Kronecker structure (aespa's solver).

Every objective aespa uses has the form ``L(dW) = sum_h tr(G_h dW_h H_h dW_h^T)`` where ``dW_h`` are the output rows
of head h (all rows form one "head" for ordinary layers), ``H_h`` an input-side second moment (shared, or per head
for the value projection) and ``G_h`` an output-side one (identity except for the query/key projections). Once
``G`` and ``H`` are precomputed, evaluating L or its gradient costs the same whatever the calibration set size.

Three steps, as in the paper's pipeline and its official code:
1. `clip_search`: per output row (and group), the clipping ratio of the min/max range that minimises the row's
   ``e H e^T`` (the row-wise Hessian-weighted error; ``G``'s diagonal only rescales a row, so it is left out).
2. OPTQ initialisation: `qvlm_harness.quant.gptq.gptq_quantize` on the fixed grid, per head with that head's ``H_h``;
   its error-fed weights are where rounding starts.
3. `learn_rounding`: AdaRound (Nagel et al. 2020) on L: rounding offsets ``h(v)`` in [0, 1] (rectified sigmoid,
   stretch -0.1..1.1) on top of ``floor(W_init / s)``, Adam, and the regulariser ``sum 1 - |2h - 1|^b`` with b
   annealed linearly from 20 to 2 after a 20% warm-up. Gradients are analytic (``dL/dW = 2 G dW H``): one batched
   matmul per iteration.

What an iteration costs, and why it is cheap: the only matrix product is ``G E H``; everything else (soft weight,
masks, the regulariser's gradient, Adam) is element-wise. The reference loop (`learn_rounding_reference`, the
formulation the speed-up is checked against) spends about 40 element-wise passes over the weight per iteration
plus torch.optim.Adam's; `learn_rounding` does one pass (`rounding_step`: gradient, Adam written in, and the next
iteration's error ``E``), optionally compiled into one kernel, and runs the product in bfloat16 when asked (``E``,
``H`` and ``G`` rounded to bfloat16, accumulation in float32; V, Adam's state and every reported objective stay
float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qvlm_harness.quant.compiled import compiled_once
from qvlm_harness.quant.quantizer import QParams, compute_qparams, qrange

GAMMA, ZETA = -0.1, 1.1  # rectified-sigmoid stretch (AdaRound)


@dataclass
class Objective:
    """``L(dW) = sum_h tr(G_h dW_h H_h dW_h^T)``; `H` ``[in, in]`` or ``[heads, in, in]``, `G` ``[heads, d, d]``
    or None (identity), `heads` the number of row blocks."""

    H: Tensor
    G: Tensor | None = None
    heads: int = 1

    def __post_init__(self) -> None:
        if self.H.dim() == 3:
            self.heads = self.H.shape[0]
        if self.G is not None:
            self.heads = self.G.shape[0]

    def _split(self, E: Tensor) -> Tensor:
        return E.reshape(self.heads, E.shape[0] // self.heads, E.shape[1])

    def grad_half(self, E: Tensor) -> Tensor:
        """``G dW H`` (half the gradient), shaped like `E` ``[out, in]``."""
        Eh = self._split(E)
        M = Eh @ self.H
        if self.G is not None:
            M = self.G @ M
        return M.reshape(E.shape)

    def __call__(self, E: Tensor) -> float:
        return float((self.grad_half(E) * E).sum())

    def row_errors(self, E: Tensor, group_size: int | None = None) -> Tensor:
        """``e H e^T`` per row ``[out]`` (or per row and group ``[out, in // g]`` with the group's diagonal block
        of H), without G."""
        Eh = self._split(E)
        H = self.H if self.H.dim() == 3 else self.H.unsqueeze(0)
        if group_size is None:
            return ((Eh @ H) * Eh).sum(-1).reshape(E.shape[0])
        ng = E.shape[1] // group_size
        Eg = Eh.reshape(self.heads, -1, ng, group_size)
        Hb = torch.stack([H[:, i * group_size:(i + 1) * group_size, i * group_size:(i + 1) * group_size]
                          for i in range(ng)], dim=1)  # [heads or 1, ng, g, g]
        out = torch.einsum("hrgi,hgij,hrgj->hrg", Eg, Hb, Eg)
        return out.reshape(E.shape[0], ng)

    def cast(self, dtype: torch.dtype) -> Objective:
        """The same objective with its matrices in `dtype` (for the bfloat16 products of the rounding search)."""
        return Objective(self.H.to(dtype), None if self.G is None else self.G.to(dtype), self.heads)

    def damped(self, percdamp: float) -> Objective:
        """The objective with ``percdamp * mean(diag H)`` added to H's diagonal, and dead inputs (zero diagonal)
        given a unit diagonal, as GPTQ does before inverting (the official aespa code damps the AdaRound loss too)."""
        H = self.H.clone()
        diag = H.diagonal(dim1=-2, dim2=-1)
        diag[diag == 0] = 1.0
        diag += percdamp * diag.mean(-1, keepdim=True)
        return Objective(H, self.G, self.heads)


def _expand(t: Tensor, cols: int, group_size: int | None) -> Tensor:
    return t.repeat_interleave(group_size, dim=1) if group_size else t.expand(-1, cols)


def qparams_for_ratio(W: Tensor, ratio: Tensor | float, bits: int, symmetric: bool,
                      group_size: int | None) -> QParams:
    """Min/max QParams of `W` per row (or group) with the range shrunk by `ratio` (broadcast per row/group)."""
    Wg = W.reshape(W.shape[0], -1, group_size) if group_size else W.unsqueeze(1)
    lo, hi = Wg.amin(-1), Wg.amax(-1)
    qp = compute_qparams(lo * ratio, hi * ratio, bits, symmetric, what="the weight")
    return QParams(qp.scale, qp.zero_point, bits, symmetric, group_size)


def fake_quant(W: Tensor, qp: QParams) -> Tensor:
    s = _expand(qp.scale.float(), W.shape[1], qp.group_size)
    z = _expand(qp.zero_point.float(), W.shape[1], qp.group_size)
    return (torch.clamp(torch.round(W / s) + z, qp.qmin, qp.qmax) - z) * s


def clip_search(W: Tensor, obj: Objective, bits: int, symmetric: bool, group_size: int | None, *,
                steps: int = 100, min_ratio: float = 0.01) -> QParams:
    """Per row (group) clipping ratio in ``linspace(1, min_ratio, steps)`` minimising the row's ``e H e^T``."""
    W = W.float()
    ratios = torch.linspace(1.0, min_ratio, max(int(steps), 1)).tolist()
    shape = (W.shape[0], W.shape[1] // group_size) if group_size else (W.shape[0], 1)
    best = torch.full(shape, float("inf"), device=W.device)
    best_ratio = torch.ones(shape, device=W.device)
    for r in ratios:
        qp = qparams_for_ratio(W, r, bits, symmetric, group_size)
        err = obj.row_errors(fake_quant(W, qp) - W, group_size).reshape(shape)
        better = err < best
        best = torch.where(better, err, best)
        best_ratio = torch.where(better, torch.full_like(best_ratio, r), best_ratio)
    return qparams_for_ratio(W, best_ratio, bits, symmetric, group_size)


def _rect_sigmoid(v: Tensor) -> tuple[Tensor, Tensor]:
    """h(v) and dh/dv."""
    sig = torch.sigmoid(v)
    raw = sig * (ZETA - GAMMA) + GAMMA
    inside = (raw > 0) & (raw < 1)
    return raw.clamp(0, 1), torch.where(inside, (ZETA - GAMMA) * sig * (1 - sig), torch.zeros_like(sig))


def _rect_sigmoid_inverse(y: Tensor) -> Tensor:
    return -torch.log((ZETA - GAMMA) / (y - GAMMA) - 1)


@dataclass
class RoundingResult:
    codes: Tensor  # int32 [out, in]
    weight: Tensor  # dequantized float32 [out, in]
    loss_init: float  # objective of the nearest rounding of W_init (the OPTQ result)
    loss: float  # objective of the returned rounding


def codes_of(W: Tensor, qp: QParams) -> Tensor:
    s = _expand(qp.scale.float(), W.shape[1], qp.group_size)
    z = _expand(qp.zero_point.float(), W.shape[1], qp.group_size)
    return torch.clamp(torch.round(W / s) + z, qp.qmin, qp.qmax)


def dequant(codes: Tensor, qp: QParams) -> Tensor:
    s = _expand(qp.scale.float(), codes.shape[1], qp.group_size)
    z = _expand(qp.zero_point.float(), codes.shape[1], qp.group_size)
    return (codes - z) * s


def learn_rounding_reference(W: Tensor, W_init: Tensor, obj: Objective, qp: QParams, *, iters: int = 2000,
                             lr: float = 0.015, round_weight: float = 1.0, warmup: float = 0.2,
                             b_range: tuple[float, float] = (20.0, 2.0), keep_best: bool = True) -> RoundingResult:
    """AdaRound on ``obj(Q - W)`` starting from ``W_init`` (see the module docstring), the reference formulation
    (eager, float32, torch.optim.Adam). With `keep_best`, the nearest rounding of `W_init` is returned instead
    when the learned rounding scores worse on the objective."""
    W = W.float()
    W_init = W_init.float()
    qmin, qmax = qrange(qp.bits, qp.symmetric)
    s = _expand(qp.scale.float(), W.shape[1], qp.group_size)
    z = _expand(qp.zero_point.float(), W.shape[1], qp.group_size)
    base = torch.floor(W_init / s)
    init_codes = codes_of(W_init, qp)
    loss_init = obj(dequant(init_codes, qp) - W)
    if iters <= 0:
        return RoundingResult(init_codes.to(torch.int32), dequant(init_codes, qp), loss_init, loss_init)

    v = torch.nn.Parameter(_rect_sigmoid_inverse((W_init / s - base).clamp(0, 1)))
    opt = torch.optim.Adam([v], lr=lr)
    start = int(iters * warmup)
    b_start, b_end = b_range
    for it in range(iters):
        h, dh = _rect_sigmoid(v.detach())
        soft = base + h + z
        inside = (soft >= qmin) & (soft <= qmax)
        E = (soft.clamp(qmin, qmax) - z) * s - W
        grad = 2.0 * obj.grad_half(E) * s * inside
        if it >= start:
            b = b_end + (b_start - b_end) * max(0.0, 1.0 - (it - start) / max(iters - start, 1))
            t = 2 * h - 1
            grad = grad + round_weight * (-2.0 * b * t.abs().pow(b - 1) * torch.sign(t))
        v.grad = grad * dh
        opt.step()
    codes = torch.clamp(base + (v.detach() >= 0).float() + z, qmin, qmax)
    weight = dequant(codes, qp)
    loss = obj(weight - W)
    if keep_best and loss > loss_init:
        return RoundingResult(init_codes.to(torch.int32), dequant(init_codes, qp), loss_init, loss_init)
    return RoundingResult(codes.to(torch.int32), weight, loss_init, loss)


# -- the fused iteration ----------------------------------------------------------------------------------------------
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults, as the reference uses them


def rounding_step(v: Tensor, m: Tensor, s2: Tensor, ghalf: Tensor, base: Tensor, z: Tensor, s: Tensor, W: Tensor,
                  bounds: Tensor, hyper: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One AdaRound iteration after the product ``ghalf = G E H``: the gradient with respect to V (the reference's
    analytic form), one Adam update as torch.optim.Adam computes it, and the next iteration's error ``E``.

    `hyper` = (lr / bias_correction1, sqrt(bias_correction2), regulariser weight (0 during the warm-up), b).
    Returns the new (V, Adam first moment, second moment, E)."""
    sig = torch.sigmoid(v)
    raw = sig * (ZETA - GAMMA) + GAMMA
    h = raw.clamp(0.0, 1.0)
    dh = torch.where((raw > 0.0) & (raw < 1.0), (ZETA - GAMMA) * sig * (1.0 - sig), 0.0)
    soft = base + h + z
    inside = (soft >= bounds[0]) & (soft <= bounds[1])
    t = 2.0 * h - 1.0
    a = t.abs()  # |t|^(b - 1) as exp((b - 1) log|t|): vectorised when compiled, unlike pow (3-4x faster)
    reg = hyper[2] * (-2.0 * hyper[3]) * torch.where(a > 0, torch.exp((hyper[3] - 1.0) * torch.log(a)), 0.0) * \
        torch.sign(t)
    grad = (torch.where(inside, 2.0 * ghalf * s, 0.0) + reg) * dh
    m = m + (1.0 - BETA1) * (grad - m)
    s2 = s2 * BETA2 + (1.0 - BETA2) * grad * grad
    v = v - hyper[0] * m / (s2.sqrt() / hyper[1] + EPS)
    h = (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)
    e = (torch.minimum(torch.maximum(base + h + z, bounds[0]), bounds[1]) - z) * s - W
    return v, m, s2, e


def rounding_step_fn(compiled: bool):
    """`rounding_step`, eager or compiled once per process (`qvlm_harness.quant.compiled`)."""
    return compiled_once(rounding_step, compiled)


def learn_rounding(W: Tensor, W_init: Tensor, obj: Objective, qp: QParams, *, iters: int = 2000, lr: float = 0.015,
                   round_weight: float = 1.0, warmup: float = 0.2, b_range: tuple[float, float] = (20.0, 2.0),
                   keep_best: bool = True, dtype: str = "bf16", compiled: bool = False) -> RoundingResult:
    """`learn_rounding_reference` with one fused pass per iteration (`rounding_step`) and the product ``G E H`` in
    `dtype` ("fp32" or "bf16"); `compiled` runs the step as one compiled kernel. Same schedule, same Adam, same
    keep-the-better rule; the objectives it reports are float32."""
    W = W.float()
    W_init = W_init.float()
    qmin, qmax = qrange(qp.bits, qp.symmetric)
    s = _expand(qp.scale.float(), W.shape[1], qp.group_size).contiguous()
    z = _expand(qp.zero_point.float(), W.shape[1], qp.group_size).contiguous()
    base = torch.floor(W_init / s)
    init_codes = codes_of(W_init, qp)
    loss_init = obj(dequant(init_codes, qp) - W)
    if iters <= 0:
        return RoundingResult(init_codes.to(torch.int32), dequant(init_codes, qp), loss_init, loss_init)
    mm_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    mm_obj = obj.cast(mm_dtype)
    bounds = torch.tensor([float(qmin), float(qmax)], device=W.device)
    v = _rect_sigmoid_inverse((W_init / s - base).clamp(0, 1))
    m = torch.zeros_like(v)
    s2 = torch.zeros_like(v)
    h = _rect_sigmoid(v)[0]
    e = (torch.clamp(base + h + z, qmin, qmax) - z) * s - W
    step = rounding_step_fn(compiled)
    start = int(iters * warmup)
    b_start, b_end = b_range
    for it in range(iters):
        b, rw = b_start, 0.0
        if it >= start:
            b = b_end + (b_start - b_end) * max(0.0, 1.0 - (it - start) / max(iters - start, 1))
            rw = round_weight
        n = it + 1
        hyper = torch.tensor([lr / (1 - BETA1 ** n), (1 - BETA2 ** n) ** 0.5, rw, b], device=W.device)
        ghalf = mm_obj.grad_half(e.to(mm_dtype)).float()
        v, m, s2, e = step(v, m, s2, ghalf, base, z, s, W, bounds, hyper)
    codes = torch.clamp(base + (v >= 0).float() + z, qmin, qmax)
    weight = dequant(codes, qp)
    loss = obj(weight - W)
    if keep_best and loss > loss_init:
        return RoundingResult(init_codes.to(torch.int32), dequant(init_codes, qp), loss_init, loss_init)
    return RoundingResult(codes.to(torch.int32), weight, loss_init, loss)

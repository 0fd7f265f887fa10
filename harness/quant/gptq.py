"""The GPTQ solver (Frantar et al. 2022): quantize a weight column by column, compensating each column's error
on the not-yet-quantized columns through the inverse Hessian of the layer-wise squared error.

For a layer ``y = W x`` and calibration inputs ``X`` (columns = tokens), ``H = 2 X X^T / n``. GPTQ minimises
``||W X - Q X||^2`` greedily: with ``U = chol(H^-1)`` (upper), quantizing column ``j`` gives the error
``e = (w_j - q_j) / U[j, j]`` that is propagated to the remaining columns as ``W[:, j+1:] -= e U[j, j+1:]``.
Updates are applied lazily in blocks of `block_size` columns (the result equals the column-by-column one up to
float rounding). Dampening adds ``percdamp * mean(diag H)`` to the diagonal; columns whose input is always zero
are set to zero. `act_order` processes columns by decreasing ``diag(H)``.

Quantization grid: the harness's (`qvlm_harness.quant.quantizer`): symmetric = restricted signed range with zero
point 0, asymmetric = unsigned range with a zero point; min/max ranges per output channel (computed once on
the float weight) or per group of `group_size` consecutive input columns. Without act-order a group's range is
computed when its first column is reached, from the error-updated weights (as GPTQ does); with act-order the
group ranges are computed up front from the float weight ("static groups"), so the codes keep the plain
contiguous group layout every kernel expects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qvlm_harness.errors import HarnessError
from qvlm_harness.quant.quantizer import QParams, compute_qparams, qrange, weight_qparams


@dataclass
class GPTQResult:
    codes: Tensor  # int32 [out, in]
    qparams: QParams  # per channel ([out, 1]) or per group ([out, in // g], group_size set)
    weight: Tensor  # dequantized float32 [out, in]
    loss: float  # sum over columns of the GPTQ objective increments (the reference's "error")
    updated: Tensor | None = None  # float32 [out, in]: each column as it was when quantized (after error feedback)


class HessianAccumulator:
    """Running ``H = 2 X X^T / n`` over rows ``[tokens, in]`` (float64 accumulation for stability)."""

    def __init__(self, columns: int):
        self.H = torch.zeros(columns, columns, dtype=torch.float64)
        self.n = 0

    def add(self, rows: Tensor) -> None:
        x = rows.detach().reshape(-1, rows.shape[-1]).double().cpu()
        if x.shape[0] == 0:
            return
        self.H += x.T @ x
        self.n += x.shape[0]

    def value(self) -> Tensor:
        if self.n == 0:
            raise HarnessError("no calibration tokens reached this layer; GPTQ needs calibration inputs")
        return (2.0 * self.H / self.n).float()


def _quant(w: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    q = torch.clamp(torch.round(w / scale) + zero, qmin, qmax)
    return q, (q - zero) * scale


def _range_qparams(w: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """(scale, zero) ``[out]`` from the min/max of each row of `w` ``[out, k]``."""
    qp = compute_qparams(w.amin(dim=1), w.amax(dim=1), bits, symmetric)
    return qp.scale.float(), qp.zero_point.float()


def gptq_quantize(W: Tensor, H: Tensor, bits: int, symmetric: bool = True, group_size: int | None = None, *,
                  block_size: int = 128, percdamp: float = 0.01, act_order: bool = False,
                  qparams: QParams | None = None) -> GPTQResult:
    """Quantize ``W [out, in]`` with Hessian ``H [in, in]``; see the module docstring.

    `qparams` fixes the grid instead of deriving it from min/max (scale ``[out, 1]`` per channel, or ``[out, in //
    group_size]`` with ``group_size`` set): methods that search the ranges first (aespa's Hessian-weighted clipping)
    then use GPTQ only for the rounding. `GPTQResult.updated` holds the error-fed weights GPTQ rounded, the
    starting point of learned-rounding methods (aespa's OPTQ initialisation).
    """
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise HarnessError(f"Hessian shape {tuple(H.shape)} does not match the weight's {cols} input columns")
    if group_size is not None and cols % group_size:
        raise HarnessError(f"group size {group_size} does not divide the {cols} input columns")
    qmin, qmax = qrange(bits, symmetric)
    if qparams is not None and (qparams.bits, qparams.symmetric, qparams.group_size) != (bits, symmetric,
                                                                                            group_size):
        raise HarnessError("gptq_quantize: the given qparams do not match bits/symmetric/group_size")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    fixed = qparams is not None
    if group_size is None:
        qp0 = qparams if fixed else weight_qparams(W, bits, symmetric)
        ch_scale, ch_zero = qp0.scale.reshape(-1).float(), qp0.zero_point.reshape(-1).float()
        g_scale = g_zero = None
    else:
        n_groups = cols // group_size
        g_scale = torch.zeros(rows, n_groups)
        g_zero = torch.zeros(rows, n_groups)
        if fixed:
            g_scale[:], g_zero[:] = qparams.scale.float(), qparams.zero_point.float()
        elif act_order:  # static groups from the float weight
            for g in range(n_groups):
                g_scale[:, g], g_zero[:, g] = _range_qparams(W[:, g * group_size:(g + 1) * group_size], bits,
                                                             symmetric)
        # lazy updates must never split a group, so that a group's range sees all updates of earlier columns
        block_size = group_size * max(1, block_size // group_size)

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    W = W[:, perm]
    H = H[perm][:, perm]
    damp = percdamp * torch.mean(torch.diag(H))
    H[range(cols), range(cols)] += damp
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except RuntimeError as exc:  # torch raises LinAlgError (a RuntimeError) for non-PD matrices
        raise HarnessError(f"the GPTQ Hessian is not positive definite ({exc}); use more calibration samples or "
                           "a larger dampening") from None

    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    updated = torch.zeros_like(W)
    losses = torch.zeros(rows)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            w = W1[:, i]
            d = Hinv1[i, i]
            if group_size is None:
                scale, zero = ch_scale, ch_zero
            else:
                g = col // group_size
                if not act_order and not fixed and (i1 + i) % group_size == 0:
                    g_scale[:, g], g_zero[:, g] = _range_qparams(W1[:, i:i + group_size], bits, symmetric)
                scale, zero = g_scale[:, g], g_zero[:, g]
            c, q = _quant(w, scale, zero, qmin, qmax)
            updated[:, i1 + i] = w
            codes[:, i1 + i] = c
            Q[:, i1 + i] = q
            losses += (w - q) ** 2 / d**2 / 2
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    inv = torch.argsort(perm)
    codes, Q, updated = codes[:, inv], Q[:, inv], updated[:, inv]
    if group_size is None:
        qp = QParams(ch_scale.reshape(-1, 1), ch_zero.reshape(-1, 1).to(torch.int32), bits, symmetric)
    else:
        qp = QParams(g_scale, g_zero.to(torch.int32), bits, symmetric, group_size)
    return GPTQResult(codes.to(torch.int32), qp, Q, float(losses.sum()), updated)


def gptq_pass(adapter, calibration, spec, scope, *, layer_spec, make_module=None, act_order: bool = False,
              percdamp: float = 0.01, block_size: int = 128, batch_size: int = 8, method: str = "GPTQ") -> dict:
    """Quantize every in-scope linear of a Llava model with GPTQ, unit by unit (the seam's stacks) and, inside a
    unit, group of layers sharing an input by group (q/k/v, then o, ...), each group's Hessian coming from the
    inputs of the already-quantized prefix. Activation quantizers stay off during the pass (Hessians are taken on float
    activations of the weight-quantized prefix).

    `layer_spec(fqn, linear) -> QuantSpec` gives each layer's spec; `make_module(fqn, linear, qlinear)` may wrap
    the resulting `QLinear` (ZeroQuant-V2's LoRC). Linears outside any block, or never reached by calibration
    data, get round-to-nearest. Returns ``{"quantized": [...], "rtn_fallback": [...]}``.
    """
    from qvlm_harness.quant.apply import set_submodule
    from qvlm_harness.quant.qlinear import QLinear
    from qvlm_harness.quant.sequential import run_sequential, valid_rows

    model = adapter.model
    wanted = adapter.linear_names(scope)
    fallback: list[str] = []
    make = make_module or (lambda f, lin, q: q)

    def install(fqn: str, linear, q: QLinear) -> None:
        q.calibrating = True
        new = make(fqn, linear, q)
        for m in new.modules():
            if hasattr(m, "calibrating"):
                m.calibrating = True
        set_submodule(model, fqn, new)

    def process(ctx) -> None:
        for group in ctx.input_groups():
            accs = {f: HessianAccumulator(ctx.module(f).in_features) for f in group}
            ctx.run_with_inputs(group, lambda f, x, b, accs=accs: accs[f].add(valid_rows(x.detach(), b.mask)))
            for f in group:
                lin = ctx.module(f)
                lspec = layer_spec(f, lin)
                if accs[f].n == 0:
                    fallback.append(f)
                    install(f, lin, QLinear.from_linear(lin, lspec, name=f))
                    continue
                res = gptq_quantize(lin.weight, accs[f].value(), lspec.w_bits, lspec.w_symmetric,
                                    lspec.w_group_size, block_size=block_size, percdamp=percdamp,
                                    act_order=act_order)
                bias = lin.bias.detach() if lin.bias is not None else None
                q = QLinear.from_codes(res.codes, res.qparams, bias, lspec, dtype=lin.weight.dtype, name=f)
                install(f, lin, q)

    covered = run_sequential(adapter, calibration, scope, wanted, process, propagate="quantized",
                             batch_size=batch_size)
    modules = dict(model.named_modules())
    for f in wanted:
        if f not in covered:
            fallback.append(f)
            install(f, modules[f], QLinear.from_linear(modules[f], layer_spec(f, modules[f]), name=f))
    for m in model.modules():
        if hasattr(m, "calibrating"):
            m.calibrating = False
    return {"quantized": list(wanted), "rtn_fallback": fallback}

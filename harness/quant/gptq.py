"""The GPTQ solver (Frantar et al. 2022): quantize a weight column by column, compensating each column's error
on the not-yet-quantized columns through the inverse Hessian of the layer-wise squared error.

For a layer ``y = W x`` and calibration inputs ``X`` (columns = tokens), ``H = 2 X X^T / n``. GPTQ minimises
``||W X - Q X||^2`` greedily: with ``U = chol(H^-1)`` (upper), quantizing column ``j`` gives the error
``e = (w_j - q_j) / U[j, j]`` that is propagated to the remaining columns as ``W[:, j+1:] -= e U[j, j+1:]``.
Updates are applied lazily in blocks of `block_size` columns, and inside a block in sub-blocks of 16 (the result
equals the column-by-column one up to float rounding). Dampening adds ``percdamp * mean(diag H)`` to the
diagonal; columns whose input is always zero are set to zero. `act_order` processes columns by decreasing ``diag(H)``.

Quantization grid: the harness's (`qvlm_harness.quant.quantizer`): symmetric = restricted signed range with zero
point 0, asymmetric = unsigned range with a zero point; min/max ranges per output channel (computed once on
the float weight) or per group of `group_size` consecutive input columns. Without act-order a group's range is
computed when its first column is reached, from the error-updated weights (as GPTQ does); with act-order the
group ranges are computed up front from the float weight ("static groups"), so the codes keep the plain
contiguous group layout every kernel expects.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
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
        x = rows.detach().reshape(-1, rows.shape[-1]).double()
        if x.shape[0] == 0:
            return
        if self.H.device != x.device:  # accumulate where the activations are (a GPU model's stay on the GPU)
            self.H = self.H.to(x.device)
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

    Runs on one intra-op thread: its operations are too small to gain from threads (each one's barrier costs
    more than the work, and on a shared machine a descheduled thread stalls every barrier), and the result then
    does not depend on the machine's thread count.
    """
    with one_thread():
        return _gptq_quantize(W, H, bits, symmetric, group_size, block_size=block_size, percdamp=percdamp,
                              act_order=act_order, qparams=qparams)


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch's intra-op thread count set to 1 for the block (restored after)."""
    n = torch.get_num_threads()
    if n != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n != 1:
            torch.set_num_threads(n)


def _gptq_quantize(W: Tensor, H: Tensor, bits: int, symmetric: bool, group_size: int | None, *, block_size: int,
                   percdamp: float, act_order: bool, qparams: QParams | None) -> GPTQResult:
    """The column loop runs on the CPU (NumPy views, see `_solve`): W and H come over once per call and the
    result goes back to W's device (no copies on the CPU)."""
    device = W.device
    W = W.detach().float().cpu().clone()
    H = H.detach().float().cpu().clone()
    if qparams is not None:
        qparams = QParams(qparams.scale.cpu(), qparams.zero_point.cpu(), qparams.bits, qparams.symmetric,
                          qparams.group_size)
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
    if dead.any():
        torch.diagonal(H)[dead] = 1
        W[:, dead] = 0

    fixed = qparams is not None
    if group_size is None:
        qp0 = qparams if fixed else weight_qparams(W, bits, symmetric)
        ch_scale, ch_zero = qp0.scale.reshape(-1).float(), qp0.zero_point.reshape(-1).float()
        g_scale = g_zero = None
    else:
        ch_scale = ch_zero = None
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
    if act_order:
        W = W[:, perm]
        H = H[perm][:, perm]
    damp = percdamp * torch.mean(torch.diag(H))
    torch.diagonal(H).add_(damp)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except RuntimeError as exc:  # torch raises LinAlgError (a RuntimeError) for non-PD matrices
        raise HarnessError(f"the GPTQ Hessian is not positive definite ({exc}); use more calibration samples or "
                           "a larger dampening") from None

    codes, updated, losses = _solve(W, Hinv, perm, qmin, qmax, group_size, ch_scale, ch_zero, g_scale, g_zero,
                                    dynamic_groups=group_size is not None and not act_order and not fixed,
                                    bits=bits, symmetric=symmetric, block_size=block_size)
    if act_order:
        inv = torch.argsort(perm)
        codes, updated = codes[:, inv], updated[:, inv]
    if group_size is None:
        qp = QParams(ch_scale.reshape(-1, 1), ch_zero.reshape(-1, 1).to(torch.int32), bits, symmetric)
        Q = (codes - ch_zero[:, None]) * ch_scale[:, None]
    else:
        qp = QParams(g_scale, g_zero.to(torch.int32), bits, symmetric, group_size)
        Q = (codes - g_zero.repeat_interleave(group_size, 1)) * g_scale.repeat_interleave(group_size, 1)
    if device.type != "cpu":
        qp = QParams(qp.scale.to(device), qp.zero_point.to(device), bits, symmetric, qp.group_size)
        codes, Q, updated = codes.to(device), Q.to(device), updated.to(device)
    return GPTQResult(codes.to(torch.int32), qp, Q, float(losses.sum()), updated)


def _sub_block(block_size: int, group_size: int | None, target: int = 16) -> int:
    """Columns per inner step of the lazy updates: at most `target`, and a divisor of the group size so that a
    dynamic group's range is taken when every earlier column's update has reached it."""
    if group_size is None:
        return min(target, block_size)
    return max(d for d in range(1, min(target, group_size) + 1) if group_size % d == 0)


def _solve(W: Tensor, Hinv: Tensor, perm: Tensor, qmin: int, qmax: int, group_size: int | None,
           ch_scale: Tensor | None, ch_zero: Tensor | None, g_scale: Tensor | None, g_zero: Tensor | None, *,
           dynamic_groups: bool, bits: int, symmetric: bool, block_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ's column loop on the permuted weight; returns (codes, the error-fed columns, loss per row).

    Two levels of lazy updates: inside a block of `block_size` columns the error of each column is fed to the
    next columns of its sub-block of at most 16 (a rank-1 update), the sub-block's errors to the rest of the block
    in one matmul, and the block's errors to the later columns in one matmul (the reference's lazy batch), so
    the work per column is a few vector operations on a contiguous row. The weight is held transposed (a column
    is a contiguous row) and the per-column steps run as NumPy ufuncs on views of the same memory (torch's
    per-call overhead is several times NumPy's for vectors this short; the elementwise results are the same
    IEEE operations). Equal to the column-by-column algorithm up to float rounding of the update sums."""
    rows, cols = W.shape
    Wt = W.T.contiguous()  # [cols, rows]
    codes_t = torch.empty_like(Wt)
    err_t = torch.empty_like(Wt)
    losses = torch.zeros(rows)
    sub = _sub_block(block_size, group_size)
    wn, cn, en = Wt.numpy(), codes_t.numpy(), err_t.numpy()
    hn = Hinv.numpy()
    t = np.empty(rows, dtype=np.float32)
    q = np.empty(rows, dtype=np.float32)
    s_np = z_np = None
    if group_size is None:
        s_np, z_np = ch_scale.contiguous().numpy(), ch_zero.contiguous().numpy()
    gs = gz = None
    if group_size is not None and not dynamic_groups:  # static groups: each column reads its group's range
        gs, gz = g_scale.T.contiguous().numpy(), g_zero.T.contiguous().numpy()
        col_group = (perm // group_size).tolist()
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        for j1 in range(i1, i2, sub):
            j2 = min(j1 + sub, i2)
            for i in range(j1, j2):
                if group_size is not None:
                    if dynamic_groups:
                        if i % group_size == 0:
                            g = i // group_size
                            g_scale[:, g], g_zero[:, g] = _range_qparams(Wt[i:i + group_size].T, bits, symmetric)
                            s_np, z_np = g_scale[:, g].contiguous().numpy(), g_zero[:, g].contiguous().numpy()
                    else:
                        s_np, z_np = gs[col_group[i]], gz[col_group[i]]
                w = wn[i]
                np.divide(w, s_np, out=t)
                np.rint(t, out=t)
                np.add(t, z_np, out=t)
                np.maximum(t, qmin, out=t)
                np.minimum(t, qmax, out=t)
                cn[i] = t
                np.subtract(t, z_np, out=q)
                np.multiply(q, s_np, out=q)
                e = en[i]
                np.subtract(w, q, out=e)
                np.divide(e, hn[i, i], out=e)
                if i + 1 < j2:
                    wn[i + 1:j2] -= np.multiply.outer(hn[i, i + 1:j2], e)
            if j2 < i2:
                Wt[j2:i2] -= Hinv[j1:j2, j2:i2].T @ err_t[j1:j2]
        if i2 < cols:
            Wt[i2:] -= Hinv[i1:i2, i2:].T @ err_t[i1:i2]
        losses += err_t[i1:i2].pow(2).sum(0) / 2
    return codes_t.T.contiguous(), Wt.T.contiguous(), losses


def hessian(chunks: Sequence[Tensor]) -> Tensor:
    """``2 X^T X / n`` over the rows of every chunk (``[tokens, in]`` each), in one float32 matmul over all of them:
    the reference GPTQ accumulates in float32 too, and one large product runs at full speed where per-batch float64
    updates ran several times slower."""
    x = torch.cat([c.reshape(-1, c.shape[-1]).float() for c in chunks]) if len(chunks) != 1 else \
        chunks[0].reshape(-1, chunks[0].shape[-1]).float()
    if x.shape[0] == 0:
        raise HarnessError("no calibration tokens reached this layer; GPTQ needs calibration inputs")
    return (x.T @ x).mul_(2.0 / x.shape[0])


def gptq_pass(adapter, calibration, spec, scope, *, layer_spec, make_module=None, act_order: bool = False,
              percdamp: float = 0.01, block_size: int = 128, batch_size: int = 8, method: str = "GPTQ") -> dict:
    """Quantize every in-scope linear of a Llava model with GPTQ, unit by unit (the seam's stacks) and, inside a
    unit, group of layers sharing an input by group (q/k/v, then o, ...), each group's Hessian coming from the
    inputs of the already-quantized prefix. Activation quantizers stay off during the pass (Hessians are taken on float
    activations of the weight-quantized prefix).

    One run of each unit does it all (`BlockContext.run_grouped`: every batch waits at a group until the group is
    quantized, and the run's outputs are the quantized unit's, propagated to the next unit). A group's members share
    their input, hence their Hessian: it is computed once, and members with the same layer spec are solved as one
    matrix (GPTQ treats output rows independently given the Hessian).

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

    def solve_group(ctx, group: list[str], chunks: list[Tensor]) -> None:
        if sum(c.shape[0] for c in chunks) == 0:
            for f in group:
                lin = ctx.module(f)
                fallback.append(f)
                install(f, lin, QLinear.from_linear(lin, layer_spec(f, lin), name=f))
            return
        H = hessian(chunks)
        chunks.clear()
        by_spec: dict = {}
        for f in group:
            lin = ctx.module(f)
            by_spec.setdefault(layer_spec(f, lin), []).append((f, lin))
        for lspec, members in by_spec.items():
            W = torch.cat([lin.weight.detach().float() for _, lin in members])
            res = gptq_quantize(W, H, lspec.w_bits, lspec.w_symmetric, lspec.w_group_size, block_size=block_size,
                                percdamp=percdamp, act_order=act_order)
            start = 0
            for f, lin in members:
                end = start + lin.out_features
                qp = res.qparams
                qp = QParams(qp.scale[start:end], qp.zero_point[start:end], qp.bits, qp.symmetric, qp.group_size)
                bias = lin.bias.detach() if lin.bias is not None else None
                install(f, lin, QLinear.from_codes(res.codes[start:end], qp, bias, lspec, dtype=lin.weight.dtype,
                                                   name=f))
                start = end

    def process(ctx) -> None:
        groups = ctx.input_groups()
        seen: list[list[Tensor]] = [[] for _ in groups]
        ctx.run_grouped(groups, lambda i, x, b: seen[i].append(valid_rows(x.detach(), b.mask).float()),
                        lambda i: solve_group(ctx, groups[i], seen[i]))

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

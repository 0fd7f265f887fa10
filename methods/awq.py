"""AWQ (`awq`, Lin et al. 2023; reference: mit-han-lab/llm-awq auto_scale.py / auto_clip.py).

Unit by unit over the language model (and, with the `search` option, the vision tower):
1. Scale search per scale group (layers sharing an input, from the model seam: `Unit.scale_groups`; a sandwich
   block's MLP group reads `pre_feedforward_layernorm`): the per-input-channel
   statistic ``x_mean = mean |x|`` over calibration tokens; for alpha in {0, 0.05, ..., 0.95}
   ``s = x_mean^alpha`` (duo_scaling: ``/ (w_mean^(1-alpha) + 1e-4)``), clamped at 1e-4 and normalised by
   ``sqrt(max(s) min(s))``; the group's linears get ``Q(W s) / s`` and the output of the inspected module
   (attention for q/k/v, MLP for gate/up or fc1, the layer itself for o/down) is compared with the float
   output; the alpha with the lowest MSE wins. All groups of a block are searched on the float block, then
   the scales are folded into the producing norm / linear through the seam (`adapter.fold_scales`: correct for
   every norm kind, recorded in `adapter.transforms`).
2. Clip search per linear (not q/k): per output channel and group, max |w| shrunk by up to 50% on a 20-point
   grid, keeping the shrink with the lowest MSE of the group's partial outputs on 512 sampled tokens.
3. Round to nearest with the searched weights: asymmetric with zero point, groups of 128 (per channel where the
   input width is not a multiple of 128, e.g. SmolLM2's 576).
The next block's inputs are the float block's outputs (as llm-awq). Parts not searched (vision tower and
projector by default) are quantized in the same weight format without search.

Weight format vs the bits string: AWQ's own format (4-bit asymmetric, group 128) is its default whatever the
symmetric/per-channel defaults of the `--bits` string; a `g<N>` suffix or the `group_size` option sets the group
size (given together they must agree), `w_symmetric` the symmetry. Activations get the shared quantizer when
A < 16.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qvlm_harness.config import ALL_SCOPES, QuantSpec, Scope
from qvlm_harness.cost import stage
from qvlm_harness.errors import HarnessError
from qvlm_harness.method import MethodConfig, QuantizedModel, require_calibration
from qvlm_harness.methodconfig import option, resolve_group_size
from qvlm_harness.quant.apply import quantize_linears, set_submodule
from qvlm_harness.quant.methodkit import (
    CalibratedWeightMethod,
    activation_text,
    calibrate_activations,
    layer_spec,
)
from qvlm_harness.quant.qlinear import QLinear
from qvlm_harness.quant.quantizer import compute_qparams, fake_quantize_weight, qrange
from qvlm_harness.quant.sequential import BlockContext, first_output, run_sequential, valid_rows

DEFAULT_GROUP = 128
N_GRID = 20


def awq_scales(x_mean: Tensor, ratio: float, w_mean: Tensor | None = None) -> Tensor:
    """llm-awq's candidate scales for one alpha (duo scaling when `w_mean` is given)."""
    if w_mean is None:
        s = x_mean.pow(ratio).clamp(min=1e-4)
    else:
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def weight_mean(linears: Sequence[nn.Module], group: int | None) -> Tensor:
    """AutoAWQ's duo-scaling weight statistic: |w| normalised by its group's max, averaged over output rows."""
    w = torch.cat([m.weight.detach().float() for m in linears], dim=0)
    g = group or w.shape[1]
    v = w.reshape(-1, g).abs()
    v = v / (v.amax(dim=1, keepdim=True) + 1e-6)
    return v.reshape(w.shape).mean(0)


def search_scale(linears: Sequence[nn.Module], x_mean: Tensor, run: Callable[[], Tensor],
                 quant: Callable[[Tensor], Tensor], *, n_grid: int = N_GRID, duo: bool = False,
                 group: int | None = None, org: Tensor | None = None) -> tuple[float, Tensor, list[float]]:
    """Grid-search alpha for one scale group. `run()` returns the inspected output (rows) for the current
    weights (`org`: its float value, when the caller has it already); `quant(w)` fake-quantizes a weight, each
    row on its own (per channel or group). Returns (best alpha, its scales, loss per alpha)."""
    with torch.no_grad():
        org = run() if org is None else org
        return _alpha_grid(linears, x_mean, lambda: float((org - run()).float().pow(2).mean()), quant,
                           n_grid=n_grid, duo=duo, group=group)


def search_scale_linear(linear: nn.Module, x_mean: Tensor, gram: Tensor, tokens: int,
                        quant: Callable[[Tensor], Tensor], *, n_grid: int = N_GRID, duo: bool = False,
                        group: int | None = None) -> tuple[float, Tensor, list[float]]:
    """`search_scale` for a group whose inspected module is its one linear (o after v, down after up), without
    running it: the loss ``mean((x W^T - x W_a^T)^2)`` over `tokens` rows ``x`` and the outputs equals
    ``sum(E * (E @ G)) / (tokens * out)`` with ``E = W - W_a`` and the Gram matrix ``G = X^T X``, which costs
    ``out * in^2`` per alpha instead of ``tokens * out * in`` (the bias cancels)."""
    with torch.no_grad():
        w_float = linear.weight.detach().float().clone()
        out_f = w_float.shape[0]

        def loss() -> float:
            e = w_float - linear.weight.float()
            return float((e * (e @ gram)).sum()) / (tokens * out_f)

        return _alpha_grid([linear], x_mean, loss, quant, n_grid=n_grid, duo=duo, group=group)


def _alpha_grid(linears: Sequence[nn.Module], x_mean: Tensor, loss: Callable[[], float],
                quant: Callable[[Tensor], Tensor], *, n_grid: int, duo: bool, group: int | None
                ) -> tuple[float, Tensor, list[float]]:
    """The alpha loop: install ``Q(W s) / s`` in the group's linears, `loss()`, keep the best; weights restored.
    The group's weights are quantized as one matrix (rows are quantized independently) into buffers reused for
    every alpha."""
    originals = [m.weight.detach().clone() for m in linears]
    stacked = torch.cat([w.float() for w in originals]) if len(originals) > 1 else originals[0].float()
    w_mean = weight_mean(linears, group) if duo else None
    scaled = torch.empty_like(stacked)
    rows = [w.shape[0] for w in originals]
    losses: list[float] = []
    best, best_loss, best_s = -1.0, float("inf"), None
    try:
        for i in range(n_grid):
            ratio = i / n_grid
            s = awq_scales(x_mean, ratio, w_mean)
            torch.mul(stacked, s[None, :], out=scaled)
            candidate = quant(scaled).div_(s[None, :])
            for m, w, part in zip(linears, originals, candidate.split(rows), strict=True):
                m.weight.copy_(part.to(w.dtype))
            value = loss()
            losses.append(value)
            if value < best_loss:
                best, best_loss, best_s = ratio, value, s.clone()
    finally:
        for m, w in zip(linears, originals, strict=True):
            m.weight.copy_(w)
    if best_s is None:
        raise HarnessError("AWQ scale search found no finite loss (NaN activations?)")
    return best, best_s, losses


def _inspected_run(module: nn.Module, calls: list, x: Tensor) -> tuple[Callable[[], Tensor], Tensor]:
    """(run, its float output) for an inspected module (attention, MLP) over its recorded calls, real tokens only.

    A module called on nothing but the group's input whose output rows depend only on their own input row (an
    MLP) is run once on the real-token rows of every batch together (``x``): no padding is computed and one call
    replaces one per batch. Whether the module is such is checked, not assumed: the float output both ways must
    agree to float rounding, else every call is replayed as recorded."""
    def replay() -> Tensor:
        return torch.cat([valid_rows(first_output(module(*a, **k)), b.mask) for a, k, b in calls])

    with torch.no_grad():
        org = replay()
        single_input = all(len(a) == 1 and not k for a, k, _ in calls)
        if single_input and x.shape[0] == org.shape[0]:
            rows = first_output(module(x))
            if rows.shape == org.shape and torch.allclose(rows, org, rtol=1e-4, atol=1e-5 * float(org.abs().max())):
                return (lambda: first_output(module(x))), rows
    return replay, org


def _fake_quant_rows(w: Tensor, bits: int, symmetric: bool) -> Tensor:
    """Fake-quantize along the last dim with min/max ranges (any leading shape)."""
    qmin, qmax = qrange(bits, symmetric)
    qp = compute_qparams(w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True), bits, symmetric)
    q = torch.clamp(torch.round(w / qp.scale) + qp.zero_point, qmin, qmax)
    return (q - qp.zero_point) * qp.scale


def search_clip(w: Tensor, x: Tensor, bits: int, symmetric: bool, group: int | None, *, max_shrink: float = 0.5,
                n_grid: int = N_GRID, n_tokens: int = 512, oc_batch: int = 256) -> Tensor:
    """llm-awq's clip search: the best max |w| per (output channel, group) ``[out, n_groups]``."""
    out_f, in_f = w.shape
    g = group or in_f
    ng = in_f // g
    x = x[:: max(1, x.shape[0] // n_tokens)].float()  # sampled tokens, every k-th
    xg = x.reshape(x.shape[0], ng, g)
    best_all = []
    for o0 in range(0, out_f, oc_batch):
        wb = w[o0:o0 + oc_batch].float().reshape(-1, ng, g)
        org_max = wb.abs().amax(dim=-1, keepdim=True)
        best = org_max.clone()
        min_err = torch.full_like(org_max, float("inf"))
        org_out = torch.einsum("tgk,ogk->otg", xg, wb)
        for i in range(int(max_shrink * n_grid)):
            mx = org_max * (1 - i / n_grid)
            qw = _fake_quant_rows(torch.maximum(torch.minimum(wb, mx), -mx), bits, symmetric)
            err = (torch.einsum("tgk,ogk->otg", xg, qw) - org_out).pow(2).mean(dim=1)[..., None]
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best = torch.where(better, mx, best)
        best_all.append(best.squeeze(-1))
    return torch.cat(best_all)


def apply_clip(linear: nn.Module, max_val: Tensor, group: int | None) -> None:
    with torch.no_grad():
        w = linear.weight
        out_f, in_f = w.shape
        g = group or in_f
        mx = max_val[..., None].to(w.dtype)
        v = w.reshape(out_f, in_f // g, g)
        linear.weight.copy_(torch.maximum(torch.minimum(v, mx), -mx).reshape(out_f, in_f))


@dataclass(frozen=True)
class AWQConfig(MethodConfig):
    METHOD = "awq"
    group_size: int | None = option(None, f"weight groups of N input channels (default {DEFAULT_GROUP}; same as a "
                                    "g<N> bits suffix)", min=1)
    w_symmetric: bool = option(False, "symmetric weights (AWQ's own format is asymmetric with a zero point)")
    search: tuple[str, ...] = option(("lm",), "parts whose scales and clips are searched (comma list of "
                                     "vision, projector, lm); the rest gets RTN in the same format")
    n_grid: int = option(N_GRID, "points of the alpha grid and of the clip-shrink grid", min=1)
    duo_scaling: bool = option(False, "AutoAWQ's duo scaling: divide by the weight statistic too")
    clip: bool = option(True, "search a clipping threshold per output channel and group (not q/k)")
    max_shrink: float = option(0.5, "largest fraction the clip search may cut off max |w|", min=0.0, max=0.99)
    clip_tokens: int = option(512, "tokens sampled for the clip search", min=1)
    batch_size: int = option(8, "calibration sequences per forward batch", min=1)

    def validate(self) -> None:
        bad = [s for s in self.search if s not in ALL_SCOPES]
        if bad:
            raise HarnessError(f"option awq.search takes a comma list of {', '.join(ALL_SCOPES)}, got {bad}")


class AWQ(CalibratedWeightMethod):
    name = "awq"
    needs_structure = True
    Config = AWQConfig
    produces = (QLinear,)
    packs = True

    def _group(self, spec: QuantSpec) -> int | None:
        return resolve_group_size(self.name, spec.w_group_size, self.config.group_size, DEFAULT_GROUP)

    def _sym(self) -> bool:
        return self.config.w_symmetric

    def _search_scopes(self, scope: Sequence[str]) -> list[str]:
        return [s for s in self.config.search if s in scope]

    def quantize(self, adapter, calibration, spec: QuantSpec, scope: Sequence[Scope] = ALL_SCOPES) -> QuantizedModel:
        calibration = require_calibration(self, spec, calibration)
        group, sym = self._group(spec), self._sym()
        c = self.config
        n_grid, duo, clip, max_shrink, clip_tokens = c.n_grid, c.duo_scaling, c.clip, c.max_shrink, c.clip_tokens
        model = adapter.model
        report: dict = {"alphas": {}, "group_size": group, "w_symmetric": sym, "duo_scaling": duo,
                        "searched_scopes": self._search_scopes(scope)}

        def lspec(lin: nn.Module) -> QuantSpec:
            return layer_spec(spec, lin.in_features, group, symmetric=sym)

        def process(ctx: BlockContext) -> None:
            in_scope = set(ctx.linears)
            unit = ctx.unit
            groups = [g for g in unit.scale_groups if all(c in in_scope for c in g.consumers)]
            if not ctx.batches:
                self._quantize_block(ctx, lspec, model)
                return
            inspect = sorted({g.inspect for g in groups if g.inspect not in in_scope})
            rec = ctx.run_recording(ctx.linears, inspect)
            ctx.outputs = rec.outputs  # the float unit's outputs feed the next unit (as llm-awq)
            feats, calls = dict(rec.inputs), rec.calls
            found = []
            for g in groups:
                fqns = list(g.consumers)
                lins = [ctx.module(f) for f in fqns]
                ls = lspec(lins[0])
                x = feats[fqns[0]]
                x_mean = x.abs().mean(0)
                quant = lambda w, ls=ls: fake_quantize_weight(w, ls.w_bits, ls.w_symmetric, ls.w_group_size)
                if g.inspect in in_scope:  # the inspected module is the linear itself: its Gram matrix suffices
                    ratio, s, _ = search_scale_linear(ctx.module(g.inspect), x_mean, x.T @ x, x.shape[0], quant,
                                                      n_grid=n_grid, duo=duo, group=ls.w_group_size)
                else:
                    run, org = _inspected_run(ctx.module(g.inspect), calls[g.inspect], x)
                    ratio, s, _ = search_scale(lins, x_mean, run, quant, n_grid=n_grid, duo=duo,
                                               group=ls.w_group_size, org=org)
                found.append((g, fqns, s))
                report["alphas"][g.producer] = ratio
            for g, fqns, s in found:
                adapter.fold_scales(g, s)
                scaled = feats[fqns[0]] / s[None, :]
                for f in fqns:
                    feats[f] = scaled
            # llm-awq clips no q/k projection: their error shows only through the attention scores
            no_clip = {unit.attention.q, unit.attention.k} if unit.attention is not None else set()
            if clip:
                for f in ctx.linears:
                    if f in no_clip:
                        continue
                    lin = ctx.module(f)
                    ls = lspec(lin)
                    if feats[f].shape[0] == 0:
                        continue
                    mx = search_clip(lin.weight.detach(), feats[f], ls.w_bits, ls.w_symmetric, ls.w_group_size,
                                     max_shrink=max_shrink, n_grid=n_grid, n_tokens=clip_tokens)
                    apply_clip(lin, mx, ls.w_group_size)
            self._quantize_block(ctx, lspec, model)

        wanted = adapter.linear_names(scope)
        search = self._search_scopes(scope)
        searched = adapter.linear_names(search) if search else []
        with stage("search"):
            covered = run_sequential(adapter, calibration, search, searched, process, propagate="recorded",
                                     batch_size=c.batch_size) if searched else []
        with stage("rtn_rest"):
            rest = set(wanted) - set(covered)
            quantize_linears(model, spec, include=lambda n, m: n in rest,
                             make=lambda n, m: QLinear.from_linear(m, lspec(m), name=n))
        for m in model.modules():
            if isinstance(m, QLinear):
                m.calibrating = False
        with stage("activation_calibration"):
            calibrate_activations(adapter, calibration, spec, wanted)
        return self.result(adapter, spec, "simulated", wanted, report)

    @staticmethod
    def _quantize_block(ctx: BlockContext, lspec, model: nn.Module) -> None:
        for f in ctx.linears:
            lin = ctx.module(f)
            q = QLinear.from_linear(lin, lspec(lin), name=f)
            q.calibrating = True
            set_submodule(model, f, q)

    def describe(self, spec: QuantSpec) -> str:
        group, c = self._group(spec), self.config
        search = ",".join(c.search)
        duo = " duo-scaling" if c.duo_scaling else ""
        clip = (f", clip search (max shrink {c.max_shrink:g}, {c.n_grid} points, {c.clip_tokens} tokens, not q/k)"
                if c.clip else "")
        return (f"AWQ{duo} W{spec.w_bits} {'symmetric' if self._sym() else 'asymmetric with zero point'}, groups "
                f"of {group} (per-channel where the width is not a multiple); scale search (alpha grid {c.n_grid}, "
                f"block-output MSE){clip} in: {search}; other parts: RTN in the same format; "
                f"{activation_text(spec)}; simulated (fake-quant in float)")

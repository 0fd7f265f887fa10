"""aespa (Kim et al., "Towards Next-Level Post-Training Quantization of Hyper-Scale Transformers", NeurIPS 2024,
arXiv 2402.08958; official code github.com/SamsungLabs/aespa): quantize one layer at a time, but give the query,
key and value projections objectives that measure their effect on the attention output
``SA(Q, K, V) = softmax(Q K^T / sqrt(d)) V`` instead of on their own outputs.

Objectives (row-vector convention: X ``[T, C]`` the q/k/v input of one sequence, ``Q = X W_Q^T``, per head h;
A_h the attention probabilities; the paper writes the transposed forms). Equation numbers are the paper's as its
authors' README cites them: Eq. (17) value, Eqs. (21), (22) query and key.

* Value, Eq. (17). Only V changes, so ``dSA_h = A_h X dW_{V,h}^T`` exactly, and
  ``sum ||dSA||_F^2 = sum_g tr(dW_{V,g} [sum_{h in g} X^T A_h^T A_h X] dW_{V,g}^T)``: the usual ``X^T X`` replaced by
  the attention-weighted ``E[X^T A^T A X]``, computed once per layer from calibration data (GQA: summed over the
  query heads sharing the KV head g; the official code averages them, a constant factor).
* Query, Eq. (21). A first-order expansion of softmax around the FP scores makes the output error a linear map
  of the score error ``dS_h = X dW_{Q,h}^T K_h^T``; the paper drops that map (the softmax Jacobian and V) and
  minimises ``E ||X dW_{Q,h}^T K_h^T||_F^2 = E tr(dW_{Q,h} X^T X dW_{Q,h}^T K_h^T K_h)``, approximated by
  ``tr(E[K_h^T K_h] dW_{Q,h} E[X^T X] dW_{Q,h}^T)`` (the expectations of the two factors taken separately).
* Key, Eq. (22), symmetrically: ``tr(E[Q_h^T Q_h] dW_{K,g} E[X^T X] dW_{K,g}^T)``, with the queries of all heads in
  the KV group summed.
* RoPE (Llama/SmolLM2): the score uses rotated ``q_p = R_p W_Q x_p``, so the Q objective's output-side matrix becomes
  ``mean_p R_p^T E[k_rot k_rot^T] R_p`` (positions decoupled from tokens: the official code's approximation, here
  averaged over the calibration tokens' actual positions instead of 0..seqlen-1), and likewise for K.
* Other approximations kept from the paper: the causal mask is ignored in the Q/K objectives (all query-key pairs
  count), the 1/sqrt(d) factor is dropped, all second moments are normalised as ``2/n sum`` over real tokens.
* Every other linear (o_proj, MLP, projector) has the ordinary layer-wise objective ``tr(dW E[X^T X] dW^T)``.

Solver (`adaround` in this package): Hessian-weighted clipping search for the grid, OPTQ initialisation with the
harness's GPTQ solver, then AdaRound on the objective above. Walk: `qvlm_harness.quant.sequential` block by block with
inputs from the already-quantized prefix; inside a block, groups of layers sharing an input (q/k/v, o, gate/up,
down) in order, each group's statistics taken after the previous groups were quantized.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from qvlm_harness.config import QuantSpec
from qvlm_harness.methods.aespa.adaround import Objective, clip_search, learn_rounding, qparams_for_ratio
from qvlm_harness.methods.aespa.attention import AttentionGeometry, AttentionObserver, attention_capture
from qvlm_harness.quant.gptq import HessianAccumulator, gptq_quantize
from qvlm_harness.quant.quantizer import QParams

QKV = ("q_proj", "k_proj", "v_proj")
COMPILE_MIN_ITERS = 200  # compile = auto: iterations per layer from which compiling the rounding step pays


@dataclass
class AespaOptions:
    attention: bool = True  # aespa's attention-wise objectives for q/k/v (False: layer-wise, an ablation)
    clip_search: bool = True
    clip_steps: int = 100
    clip_min: float = 0.01
    optq_init: bool = True
    act_order: bool = True
    learn_rounding: bool = True
    round_layers: str = "all"  # "all" (the paper) or "qkv": learned rounding only where the attention objectives are
    num_iters: int = 2000
    lr: float = 0.015
    round_weight: float = 1.0
    round_weight_qkv: float = 1.5
    percdamp: float = 0.01
    batch_size: int = 8
    search_dtype: str = "bf16"  # dtype of the rounding search's G E H product ("fp32" or "bf16")
    compile: str = "auto"  # "on" / "off" / "auto": compile the fused rounding step from COMPILE_MIN_ITERS iterations

    def compiles(self) -> bool:
        return self.compile == "on" or (self.compile == "auto" and self.num_iters >= COMPILE_MIN_ITERS)


@dataclass
class LayerReport:
    objective: str  # "value" | "query" | "key" | "layer"
    loss_optq: float
    loss: float


@dataclass
class AespaResult:
    quantized: list[str]
    rtn_fallback: list[str] = field(default_factory=list)
    layers: dict[str, LayerReport] = field(default_factory=dict)
    rope_attention: int = 0
    plain_attention: int = 0


def attention_of(fqns: list[str], model: nn.Module) -> tuple[str, dict[str, str]] | None:
    """(attention module FQN, {"q_proj": fqn, ...}) when `fqns` hold the q/k/v projections of one attention."""
    by_parent: dict[str, dict[str, str]] = {}
    for f in fqns:
        parent, _, leaf = f.rpartition(".")
        if leaf in QKV:
            by_parent.setdefault(parent, {})[leaf] = f
    for parent, members in by_parent.items():
        if len(members) == 3 and hasattr(model.get_submodule(parent), "config"):
            return parent, members
    return None


def _rows(qp: QParams, sl: slice) -> QParams:
    return QParams(qp.scale[sl], qp.zero_point[sl], qp.bits, qp.symmetric, qp.group_size)


def quantize_layer(W: Tensor, obj: Objective, spec: QuantSpec, opts: AespaOptions, *,
                   round_weight: float, learn: bool | None = None) -> tuple[Tensor, QParams, float, float]:
    """Codes, QParams, and the objective after OPTQ and after learned rounding, for one weight ``[out, in]``
    (`learn` overrides ``opts.learn_rounding`` for this layer)."""
    W = W.detach().float()
    bits, sym, group = spec.w_bits, spec.w_symmetric, spec.w_group_size
    raw, obj = obj, obj.damped(opts.percdamp)
    if opts.clip_search:
        qp = clip_search(W, obj, bits, sym, group, steps=opts.clip_steps, min_ratio=opts.clip_min)
    else:
        qp = qparams_for_ratio(W, 1.0, bits, sym, group)
    if opts.optq_init:
        W_init = torch.empty_like(W)
        Hs = raw.H if raw.H.dim() == 3 else raw.H.unsqueeze(0)
        rows = W.shape[0] // Hs.shape[0]
        for h in range(Hs.shape[0]):
            sl = slice(h * rows, (h + 1) * rows)
            res = gptq_quantize(W[sl], Hs[h], bits, sym, group, percdamp=opts.percdamp, act_order=opts.act_order,
                                qparams=_rows(qp, sl))
            W_init[sl] = res.updated
    else:
        W_init = W
    iters = opts.num_iters if (opts.learn_rounding if learn is None else learn) else 0
    r = learn_rounding(W, W_init, obj, qp, iters=iters, lr=opts.lr, round_weight=round_weight,
                       dtype=opts.search_dtype, compiled=opts.compiles())
    return r.codes, qp, r.loss_init, r.loss


def _objectives(group: list[str], H: dict[str, Tensor], obs: AttentionObserver | None,
                names: dict[str, str] | None) -> dict[str, tuple[str, Objective]]:
    out: dict[str, tuple[str, Objective]] = {}
    role = {v: k for k, v in (names or {}).items()}
    for f in group:
        kind = role.get(f)
        if obs is None or kind is None:
            out[f] = ("layer", Objective(H[f]))
        elif kind == "v_proj":
            out[f] = ("value", Objective(obs.value_hessians()))
        elif kind == "q_proj":
            out[f] = ("query", Objective(H[f], obs.query_row_covariance()))
        else:
            out[f] = ("key", Objective(H[f], obs.key_row_covariance()))
    return out


def collect_statistics(ctx, group: list[str], attention: tuple[str, dict[str, str]] | None
                       ) -> tuple[dict[str, HessianAccumulator], AttentionObserver | None]:
    """One run of the block on its calibration inputs: each layer's input Hessian, and the attention statistics
    when the group holds an attention's q/k/v (`attention`: that module's FQN and its q/k/v FQNs)."""
    from qvlm_harness.quant.sequential import valid_rows

    accs = {f: HessianAccumulator(ctx.module(f).in_features) for f in group}
    obs = None
    if attention is not None:
        obs = AttentionObserver(AttentionGeometry.of(ctx.module(attention[0])), accs[attention[1]["q_proj"]].H.shape[0])
        q_name = attention[1]["q_proj"]

    def see(f, x, b) -> None:
        accs[f].add(valid_rows(x.detach(), b.mask))
        if obs is not None and f == q_name:
            obs.mask = b.mask

    if obs is None:
        ctx.run_with_inputs(group, see)
    else:
        with attention_capture(ctx.module(attention[0]), obs):
            ctx.run_with_inputs(group, see)
    return accs, obs


def aespa_pass(adapter, calibration, scope, *, layer_spec: Callable[[str, nn.Module], QuantSpec],
               opts: AespaOptions, meter=None) -> AespaResult:
    """Quantize every in-scope linear of a Llava model with aespa (see the module docstring). Linears outside any
    block or never reached by calibration data get round-to-nearest. Activation quantizers stay off during the
    pass; the caller calibrates static activation ranges afterwards."""
    from contextlib import nullcontext

    from qvlm_harness.quant.apply import _set_submodule
    from qvlm_harness.quant.qlinear import QLinear
    from qvlm_harness.quant.sequential import run_sequential

    model = adapter.model
    wanted = adapter.linear_names(scope)
    result = AespaResult(list(wanted))
    stage = meter.stage if meter is not None else (lambda _n: nullcontext())

    def install(fqn: str, q: QLinear) -> None:
        q.calibrating = True
        _set_submodule(model, fqn, q)

    def process(ctx) -> None:
        for group in ctx.input_groups():
            attn = attention_of(group, model) if opts.attention else None
            with stage("statistics"):
                accs, obs = collect_statistics(ctx, group, attn)
            if obs is not None and obs.n > 0:
                if obs.rope:
                    result.rope_attention += 1
                else:
                    result.plain_attention += 1
            reached = [f for f in group if accs[f].n > 0]
            for f in group:
                if f not in reached:
                    lin = ctx.module(f)
                    result.rtn_fallback.append(f)
                    install(f, QLinear.from_linear(lin, layer_spec(f, lin), name=f))
            objectives = _objectives(reached, {f: accs[f].value() for f in reached}, obs if obs and obs.n else None,
                                     attn[1] if attn else None)
            for f in reached:
                lin = ctx.module(f)
                kind, obj = objectives[f]
                is_qkv = f.rpartition(".")[2] in QKV
                rw = opts.round_weight_qkv if is_qkv else opts.round_weight
                learn = opts.learn_rounding and (opts.round_layers == "all" or is_qkv)
                with stage("rounding"):
                    codes, qp, l0, l1 = quantize_layer(lin.weight, obj, layer_spec(f, lin), opts, round_weight=rw,
                                                       learn=learn)
                result.layers[f] = LayerReport(kind, l0, l1)
                bias = lin.bias.detach() if lin.bias is not None else None
                install(f, QLinear.from_codes(codes, qp, bias, layer_spec(f, lin), dtype=lin.weight.dtype, name=f))

    covered = run_sequential(adapter, calibration, scope, wanted, process, propagate="quantized",
                             batch_size=opts.batch_size)
    modules = dict(model.named_modules())
    for f in wanted:
        if f not in covered:
            result.rtn_fallback.append(f)
            install(f, QLinear.from_linear(modules[f], layer_spec(f, modules[f]), name=f))
    for m in model.modules():
        if hasattr(m, "calibrating"):
            m.calibrating = False
    return result

"""aespa (`aespa`, Kim et al., NeurIPS 2024, arXiv 2402.08958): layer-wise quantization with attention-wise
reconstruction objectives for the query, key and value projections (see `objectives` in this package for the
objectives, with the paper's equations, `attention` for the statistics they need and `adaround` for the solver).

Weights: the run's spec (symmetric per output channel by default; `g<N>` bits suffix or the `group_size` option for
groups, `-wasym` for asymmetric). Options (defaults follow the paper's official code, `python main.py ... --block_v
--optq_init --act_order --learn_rounding`): `attention` (true: the aespa objectives; false: plain layer-wise
objectives everywhere, the ablation), `clip_search` / `clip_steps` (100) / `clip_min` (0.01), `optq_init`,
`act_order`, `learn_rounding`, `round_layers` (all; `qkv` learns the rounding of the q/k/v projections only and
keeps the OPTQ rounding elsewhere, a CPU-time saver: the MLP weights dominate AdaRound's cost), `num_iters`
(2000), `lr` (0.015), `round_weight` (1.0), `round_weight_qkv` (1.5), `percdamp` (0.01), `batch_size` (8),
`group_size`, `search_dtype` (bf16: the rounding search's product in bfloat16), `compile` (auto), `preset` (paper:
the official code's budget, `PAPER`). Activations (a weight-only method originally) get the harness's
shared activation quantizer when A < 16.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from statistics import median
from types import SimpleNamespace
from typing import Literal

import torch

from qvlm_harness.config import ALL_SCOPES, QuantSpec, Scope
from qvlm_harness.cost import stage
from qvlm_harness.method import MethodConfig, QuantizedModel, require_calibration
from qvlm_harness.methodconfig import option, resolve_group_size
from qvlm_harness.methods.aespa.objectives import AespaOptions, aespa_pass
from qvlm_harness.quant.methodkit import (
    CalibratedWeightMethod,
    activation_text,
    calibrate_activations,
    layer_spec,
)
from qvlm_harness.quant.qlinear import QLinear

#: the paper's budget (``preset=paper``): the official code's `python main.py ... --block_v --optq_init --act_order
#: --learn_rounding` with its defaults (lr 0.015, round_weight 1.0, round_weight_qkv 1.5, num_iters 2000 per layer,
#: percdamp 0.01), learned rounding on every layer; the clipping search at 100 ratios down to 0.01.
PAPER = {"attention": True, "clip_search": True, "clip_steps": 100, "clip_min": 0.01, "optq_init": True,
         "act_order": True, "learn_rounding": True, "round_layers": "all", "num_iters": 2000, "lr": 0.015,
         "round_weight": 1.0, "round_weight_qkv": 1.5, "percdamp": 0.01}


@dataclass(frozen=True)
class AespaConfig(MethodConfig):
    METHOD = "aespa"
    PRESETS = {"paper": PAPER}
    preset: Literal["none", "paper"] = option(
        "none", "paper: fill in the paper's budget (the official code's settings: 2000 AdaRound steps on every "
        "layer, lr 0.015, rounding weights 1.0 / 1.5; options given explicitly win)")
    group_size: int | None = option(None, "weights in groups of N input channels (same as a g<N> bits suffix)",
                                    min=1)
    attention: bool = option(True, "aespa's attention-wise objectives for q/k/v (false: layer-wise everywhere, "
                             "the ablation)")
    clip_search: bool = option(True, "Hessian-weighted clipping search of the weight ranges")
    clip_steps: int = option(100, "ratios of the clipping search", min=1)
    clip_min: float = option(0.01, "smallest clipping ratio", gt=0.0, max=1.0)
    optq_init: bool = option(True, "start the rounding from OPTQ (GPTQ)")
    act_order: bool = option(True, "OPTQ with act-order")
    learn_rounding: bool = option(True, "AdaRound on the precomputed objective")
    round_layers: Literal["all", "qkv"] = option("all", "where rounding is learned: all layers (the paper) or q/k/v "
                                                 "only (OPTQ rounding elsewhere; a CPU-time saver)")
    num_iters: int = option(2000, "Adam steps of the learned rounding per layer", min=0)
    lr: float = option(0.015, "Adam learning rate of the learned rounding", gt=0.0)
    round_weight: float = option(1.0, "rounding-regulariser weight outside q/k/v", min=0.0)
    round_weight_qkv: float = option(1.5, "rounding-regulariser weight of q/k/v", min=0.0)
    percdamp: float = option(0.01, "Hessian dampening (fraction of the mean diagonal)", min=0.0)
    batch_size: int = option(8, "calibration sequences per forward batch", min=1)
    search_dtype: Literal["fp32", "bf16"] = option(
        "bf16", "dtype of the learned rounding's G E H product (V, Adam state and reported objectives stay float32)")
    compile: Literal["auto", "on", "off"] = option(
        "auto", "torch.compile the fused rounding step (auto: from 200 iterations per layer, where the one-off "
        "compilation pays)")

    def solver_options(self) -> AespaOptions:
        return AespaOptions(**{f.name: getattr(self, f.name) for f in fields(AespaOptions)})


class Aespa(CalibratedWeightMethod):
    name = "aespa"
    needs_structure = True
    Config = AespaConfig
    produces = (QLinear,)
    packs = True

    def check_structure(self, stacks, spec: QuantSpec) -> str | None:
        """aespa's query/key objectives take q = x W_q^T (up to RoPE): a norm applied to q and k after the
        projections (q/k-norm: Qwen3, Gemma3) breaks that, and the method refuses such attention."""
        for stack in stacks:
            for unit in stack.units:
                if unit.attention is not None and unit.attention.qk_norm:
                    return (f"{unit.name} normalises q and k after the projections (q/k-norm), which aespa's "
                            "attention-wise objectives do not model; use gptq, or aespa.attention=false")
        return None

    def _group(self, spec: QuantSpec) -> int | None:
        return resolve_group_size(self.name, spec.w_group_size, self.config.group_size)

    def _opts(self) -> AespaOptions:
        return self.config.solver_options()

    def quantize(self, adapter, calibration, spec: QuantSpec, scope: Sequence[Scope] = ALL_SCOPES) -> QuantizedModel:
        calibration = require_calibration(self, spec, calibration)
        opts = self._opts()
        group = self._group(spec)
        torch.manual_seed(calibration.seed)
        res = aespa_pass(adapter, calibration, scope, opts=opts, meter=SimpleNamespace(stage=stage),
                         layer_spec=lambda f, lin: layer_spec(spec, lin.in_features, group))
        with stage("activation_calibration"):
            calibrate_activations(adapter, calibration, spec, res.quantized)
        by_kind: dict[str, list[float]] = {}
        for lr in res.layers.values():
            if lr.loss_optq > 0:
                by_kind.setdefault(lr.objective, []).append(lr.loss / lr.loss_optq)
        report = {"rtn_fallback": res.rtn_fallback, "group_size": group,
                  "attention_layers": {"rope": res.rope_attention, "plain": res.plain_attention},
                  "objective_after_rounding_vs_optq_median": {k: round(median(v), 4) for k, v in by_kind.items()},
                  "options": {f.name: getattr(opts, f.name) for f in fields(AespaOptions)}}
        return self.result(adapter, spec, "simulated", res.quantized, report)

    def describe(self, spec: QuantSpec) -> str:
        o = self._opts()
        group = self._group(spec)
        g = f"groups of {group} input channels (per-channel where the width is not a multiple)" if group else \
            "per output channel"
        obj = ("attention-wise objectives for q/k/v (value: tr(dW E[X^T A^T A X] dW^T) exact; query/key: "
               "tr(E[K^T K] dW E[X^T X] dW^T) and its mirror, RoPE-averaged, causal mask ignored) and layer-wise "
               "ones elsewhere" if o.attention else "layer-wise objectives everywhere (ablation: attention=false)")
        steps = [f"Hessian-weighted clipping search ({o.clip_steps} ratios down to {o.clip_min})" if o.clip_search
                 else "min/max ranges"]
        if o.optq_init:
            steps.append(f"OPTQ initialisation{' with act-order' if o.act_order else ''}")
        if o.learn_rounding:
            where = "" if o.round_layers == "all" else " of q/k/v only (OPTQ rounding elsewhere, round_layers=qkv)"
            steps.append(f"AdaRound{where} on the precomputed objective ({o.num_iters} Adam steps with "
                         f"{o.search_dtype} products, lr {o.lr}, rounding "
                         f"weight {o.round_weight_qkv} q/k/v and {o.round_weight} elsewhere; the OPTQ rounding is kept "
                         "where it scores better)")
        preset = f" [preset {self.config.preset}]" if self.config.preset != "none" else ""
        return (f"aespa{preset} W{spec.w_bits} {'symmetric' if spec.w_symmetric else 'asymmetric'} {g}: {obj}; "
                f"{', '.join(steps)}; blocks in forward order with inputs from the quantized prefix. Not implemented: "
                f"Z-FOLD's folded per-input-channel scales (ranges come from the clipping search instead). "
                f"{activation_text(spec)}; simulated (fake-quant in float)")

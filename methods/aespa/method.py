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
`group_size`. Activations (a weight-only method originally) get the harness's
shared activation quantizer when A < 16.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from statistics import median

import torch

from qvlm_harness.config import ALL_SCOPES, QuantSpec, Scope
from qvlm_harness.errors import HarnessError
from qvlm_harness.method import QuantizedModel
from qvlm_harness.methods.aespa.objectives import AespaOptions, aespa_pass
from qvlm_harness.quant.methodkit import (
    HessianSolverMethod,
    activation_text,
    calibrate_activations,
    layer_spec,
    measure_search,
)

_DEFAULTS = AespaOptions()


class Aespa(HessianSolverMethod):
    name = "aespa"
    default_options = {"group_size": None} | {f.name: getattr(_DEFAULTS, f.name) for f in fields(AespaOptions)}

    def _opts(self) -> AespaOptions:
        values = {}
        for f in fields(AespaOptions):
            v = self.options[f.name]
            kind = type(getattr(_DEFAULTS, f.name))
            if kind is bool and not isinstance(v, bool):
                raise HarnessError(f"aespa option {f.name} takes true or false, got {v!r}")
            try:
                values[f.name] = kind(v)
            except (TypeError, ValueError):
                raise HarnessError(f"aespa option {f.name} takes a {kind.__name__}, got {v!r}") from None
        opts = AespaOptions(**values)
        if opts.round_layers not in ("all", "qkv"):
            raise HarnessError(f"aespa option round_layers takes all or qkv, got {opts.round_layers!r}")
        if opts.num_iters < 0 or opts.clip_steps < 1 or not 0 < opts.clip_min <= 1:
            raise HarnessError("aespa: num_iters must be >= 0, clip_steps >= 1 and 0 < clip_min <= 1")
        return opts

    def quantize(self, adapter, calibration, spec: QuantSpec, scope: Sequence[Scope] = ALL_SCOPES) -> QuantizedModel:
        if calibration is None:
            raise HarnessError("aespa needs calibration data; pass --calib-samples N (> 0)")
        opts = self._opts()
        group = self._group(spec)
        torch.manual_seed(calibration.seed)
        with measure_search() as meter:
            res = aespa_pass(adapter, calibration, scope, opts=opts, meter=meter,
                             layer_spec=lambda f, lin: layer_spec(spec, lin.in_features, group))
            with meter.stage("activation_calibration"):
                calibrate_activations(adapter, calibration, spec, res.quantized)
        by_kind: dict[str, list[float]] = {}
        for lr in res.layers.values():
            if lr.loss_optq > 0:
                by_kind.setdefault(lr.objective, []).append(lr.loss / lr.loss_optq)
        report = {"rtn_fallback": res.rtn_fallback, "group_size": group,
                  "attention_layers": {"rope": res.rope_attention, "plain": res.plain_attention},
                  "objective_after_rounding_vs_optq_median": {k: round(median(v), 4) for k, v in by_kind.items()},
                  "options": {f.name: getattr(opts, f.name) for f in fields(AespaOptions)}}
        return QuantizedModel(adapter, self.name, spec, "simulated", res.quantized, meter.cost, report)

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
            steps.append(f"AdaRound{where} on the precomputed objective ({o.num_iters} Adam steps, lr {o.lr}, rounding "
                         f"weight {o.round_weight_qkv} q/k/v and {o.round_weight} elsewhere; the OPTQ rounding is kept "
                         "where it scores better)")
        return (f"aespa W{spec.w_bits} {'symmetric' if spec.w_symmetric else 'asymmetric'} {g}: {obj}; "
                f"{', '.join(steps)}; blocks in forward order with inputs from the quantized prefix. Not implemented: "
                f"Z-FOLD's folded per-input-channel scales (ranges come from the clipping search instead). "
                f"{activation_text(spec)}; simulated (fake-quant in float)")

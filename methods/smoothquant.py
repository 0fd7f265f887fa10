"""SmoothQuant (`smoothquant`, Xiao et al. 2023): migrate activation outliers into the weights.

For every group of linears reading a norm's output (the model seam's scale groups: q/k/v after the attention
norm; gate/up or fc1 after the MLP's input norm, `pre_feedforward_layernorm` in a sandwich block; vision tower
and language model), per input channel j:
``s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha)`` (alpha 0.5 by default, clamped at 1e-5; the weight max is over
all linears of the group), with ``max|X_j|`` from the calibration set. The norm's weight (and bias) is divided by
``s`` (``(1 + w) / s - 1`` for a Gemma norm, through `adapter.fold_scales`, which records the fold in
`adapter.transforms`) and the linears' input columns multiplied by it, which leaves the float model unchanged;
then every in-scope linear is quantized round-to-nearest in the run's spec (symmetric per-channel weights;
per-token dynamic or, with `-tensor-static`, calibrated per-tensor activations). Layers without a preceding norm
(o/down/fc2, the projector) are quantized without smoothing, as in the paper's recipe. Simulated (fake-quant in
float).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qvlm_harness.config import ALL_SCOPES, QuantSpec, Scope
from qvlm_harness.cost import stage
from qvlm_harness.method import Method, MethodConfig, QuantizedModel, require_calibration
from qvlm_harness.methodconfig import option
from qvlm_harness.quant import QLinear, collect_activation_stats, quantize_linears
from qvlm_harness.quant.methodkit import activation_text, calibrate_activations, layer_spec


def smooth_scales(act_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's per-channel factors for linears sharing an input."""
    w_max = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0).clamp(min=1e-5)
    act = act_absmax.float().to(w_max.device)  # the statistics are gathered on the CPU; the weights may be on a GPU
    return (act.clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


@dataclass(frozen=True)
class SmoothQuantConfig(MethodConfig):
    METHOD = "smoothquant"
    alpha: float = option(0.5, "migration strength: s = max|X|^alpha / max|W|^(1-alpha)", min=0.0, max=1.0)


class SmoothQuant(Method):
    name = "smoothquant"
    needs_structure = True
    Config = SmoothQuantConfig
    produces = (QLinear,)
    packs = True

    def needs_calibration(self, spec: QuantSpec) -> bool:
        return True

    def quantize(self, adapter, calibration, spec: QuantSpec, scope: Sequence[Scope] = ALL_SCOPES) -> QuantizedModel:
        calibration = require_calibration(self, spec, calibration)
        alpha = self.config.alpha
        model = adapter.model
        wanted = adapter.linear_names(scope)
        report: dict = {"alpha": alpha, "smoothed_groups": 0}
        keep = set(wanted)
        groups = [g for stack in adapter.stacks([s for s in scope if s != "projector"])
                  for unit in stack.units for g in unit.scale_groups
                  if g.producer_kind == "norm" and all(c in keep for c in g.consumers)]
        with stage("activation_stats"):
            firsts = [g.consumers[0] for g in groups]
            stats = collect_activation_stats(model, firsts, lambda: calibration.run(adapter)) if firsts else {}
        with stage("smooth"):
            for g in groups:
                if g.consumers[0] not in stats:
                    continue
                mods = [model.get_submodule(f) for f in g.consumers]
                s = smooth_scales(stats[g.consumers[0]].absmax, [m.weight for m in mods], alpha)
                adapter.fold_scales(g, s)
                report["smoothed_groups"] += 1
        with stage("quantize"):
            quantize_linears(model, spec, include=lambda n, m: n in keep,
                             make=lambda n, m: QLinear.from_linear(
                                 m, layer_spec(spec, m.in_features, spec.w_group_size), name=n))
        with stage("activation_calibration"):
            calibrate_activations(adapter, calibration, spec, wanted)
        return self.result(adapter, spec, "simulated", wanted, report)

    def describe(self, spec: QuantSpec) -> str:
        alpha = self.config.alpha
        w = (f"W{spec.w_bits} {'symmetric' if spec.w_symmetric else 'asymmetric'} "
             f"{'groups of ' + str(spec.w_group_size) if spec.w_group_size else 'per-channel'} RTN"
             if spec.quantizes_weights else "float weights")
        return (f"SmoothQuant alpha {alpha} (per-channel max|X|^a / max|W|^(1-a), folded into the preceding "
                f"norms: q/k/v and gate/up or fc1, vision tower and LM), then {w}; {activation_text(spec)}; "
                "simulated (fake-quant in float)")

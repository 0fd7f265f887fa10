"""SmoothQuant (`smoothquant`, Xiao et al. 2023): migrate activation outliers into the weights.

For every group of linears reading a norm's output (q/k/v after the attention norm; gate/up or fc1 after the
MLP norm; vision tower and language model), per input channel j:
``s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha)`` (alpha 0.5 by default, clamped at 1e-5; the weight max is over
all linears of the group), with ``max|X_j|`` from the calibration set. The norm's weight (and bias) is divided by
``s`` and the linears' input columns multiplied by it, which leaves the float model unchanged; then every in-scope
linear is quantized round-to-nearest in the run's spec (symmetric per-channel weights; per-token dynamic or,
with `-tensor-static`, calibrated per-tensor activations). Layers without a preceding norm (o/down/fc2, the
projector) are quantized without smoothing, as in the paper's recipe. Simulated (fake-quant in float).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qvlm_harness.config import ALL_SCOPES, QuantSpec, Scope
from qvlm_harness.errors import HarnessError
from qvlm_harness.method import Method, QuantizedModel
from qvlm_harness.quant import QLinear, collect_activation_stats, quantize_linears
from qvlm_harness.quant.methodkit import activation_text, calibrate_activations, measure_search
from qvlm_harness.quant.sequential import find_stages
from qvlm_harness.quant.smoothing import fold_scales, scale_groups


def smooth_scales(act_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's per-channel factors for linears sharing an input."""
    w_max = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0).clamp(min=1e-5)
    return (act_absmax.float().clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


class SmoothQuant(Method):
    name = "smoothquant"
    default_options = {"alpha": 0.5}

    def needs_calibration(self, spec: QuantSpec) -> bool:
        return True

    def quantize(self, adapter, calibration, spec: QuantSpec, scope: Sequence[Scope] = ALL_SCOPES) -> QuantizedModel:
        if calibration is None:
            raise HarnessError("smoothquant needs calibration data; pass --calib-samples N (> 0)")
        alpha = float(self.options.get("alpha", 0.5))
        if not 0.0 <= alpha <= 1.0:
            raise HarnessError(f"smoothquant.alpha must be in [0, 1], got {alpha}")
        model = adapter.model
        wanted = adapter.linear_names(scope)
        report: dict = {"alpha": alpha, "smoothed_groups": 0}
        with measure_search() as meter:
            groups = []
            for stage in find_stages(model, [s for s in scope if s != "projector"]):
                for name, block in stage.blocks:
                    for g in scale_groups(block):
                        if g.prev_kind == "norm" and all(f"{name}.{r}" in wanted for r in g.linears):
                            groups.append((f"{name}.{g.prev}", [f"{name}.{r}" for r in g.linears]))
            with meter.stage("activation_stats"):
                firsts = [lins[0] for _, lins in groups]
                stats = collect_activation_stats(model, firsts, lambda: calibration.run(adapter)) if firsts else {}
            with meter.stage("smooth"):
                for prev, lins in groups:
                    if lins[0] not in stats:
                        continue
                    mods = [model.get_submodule(f) for f in lins]
                    s = smooth_scales(stats[lins[0]].absmax, [m.weight for m in mods], alpha)
                    fold_scales(model.get_submodule(prev), mods, s)
                    report["smoothed_groups"] += 1
            with meter.stage("quantize"):
                keep = set(wanted)
                quantize_linears(model, spec, include=lambda n, m: n in keep,
                                 make=lambda n, m: QLinear.from_linear(m, spec, name=n))
            with meter.stage("activation_calibration"):
                calibrate_activations(adapter, calibration, spec, wanted)
        return QuantizedModel(adapter, self.name, spec, "simulated", wanted, meter.cost, report)

    def describe(self, spec: QuantSpec) -> str:
        alpha = float(self.options.get("alpha", 0.5))
        w = (f"W{spec.w_bits} {'symmetric' if spec.w_symmetric else 'asymmetric'} "
             f"{'groups of ' + str(spec.w_group_size) if spec.w_group_size else 'per-channel'} RTN"
             if spec.quantizes_weights else "float weights")
        return (f"SmoothQuant alpha {alpha} (per-channel max|X|^a / max|W|^(1-a), folded into the preceding "
                f"norms: q/k/v and gate/up or fc1, vision tower and LM), then {w}; {activation_text(spec)}; "
                "simulated (fake-quant in float)")

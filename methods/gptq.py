"""GPTQ (`gptq`, Frantar et al. 2022): second-order weight quantization with error feedback.

Weights: the run's spec (symmetric per output channel by default, `g<N>` bits suffix or the `group_size` option
for groups, `-wasym` for asymmetric) quantized column by column by `qvlm_harness.quant.gptq` with Hessians from
calibration inputs of the already-quantized prefix (block by block, and inside a block q/k/v -> o -> gate/up
-> down). Options: `act_order` (false), `group_size`, `percdamp` (0.01), `block_size` (128), `batch_size` (8).
Activations (a weight-only method originally) get the harness's shared activation quantizer when A < 16.
"""

from __future__ import annotations

from collections.abc import Sequence

from qvlm_harness.config import ALL_SCOPES, QuantSpec, Scope
from qvlm_harness.errors import HarnessError
from qvlm_harness.method import QuantizedModel
from qvlm_harness.quant.gptq import gptq_pass
from qvlm_harness.quant.methodkit import (
    HessianSolverMethod,
    activation_text,
    calibrate_activations,
    layer_spec,
    measure_search,
)


class GPTQ(HessianSolverMethod):
    name = "gptq"
    default_options = {"group_size": None, "act_order": False, "percdamp": 0.01, "block_size": 128, "batch_size": 8}

    def quantize(self, adapter, calibration, spec: QuantSpec, scope: Sequence[Scope] = ALL_SCOPES) -> QuantizedModel:
        if calibration is None:
            raise HarnessError("gptq needs calibration data; pass --calib-samples N (> 0)")
        group = self._group(spec)
        with measure_search() as meter:
            with meter.stage("gptq"):
                info = gptq_pass(adapter, calibration, spec, scope,
                                 layer_spec=lambda f, lin: layer_spec(spec, lin.in_features, group),
                                 act_order=bool(self.options.get("act_order", False)),
                                 percdamp=float(self.options.get("percdamp", 0.01)),
                                 block_size=int(self.options.get("block_size", 128)),
                                 batch_size=int(self.options.get("batch_size", 8)))
            with meter.stage("activation_calibration"):
                calibrate_activations(adapter, calibration, spec, info["quantized"])
        report = {"rtn_fallback": info["rtn_fallback"], "group_size": group,
                  "act_order": bool(self.options.get("act_order", False))}
        return QuantizedModel(adapter, self.name, spec, "simulated", info["quantized"], meter.cost, report)

    def describe(self, spec: QuantSpec) -> str:
        group = self._group(spec)
        g = f"groups of {group} input channels (per-channel where the width is not a multiple)" if group else \
            "per output channel"
        order = "act-order" if self.options.get("act_order") else "natural column order"
        return (f"GPTQ W{spec.w_bits} {'symmetric' if spec.w_symmetric else 'asymmetric'} {g}, {order}, 1% "
                f"dampening, lazy blocks of 128, Hessians from the quantized prefix's calibration inputs; "
                f"{activation_text(spec)}; simulated (fake-quant in float)")

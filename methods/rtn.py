"""Round-to-nearest (`rtn`): the floor every PTQ method must beat.

Weights: symmetric uniform per output channel (or per group with a `g<size>` bits suffix), rounded to nearest.
Activations (the inputs of every quantized linear layer): uniform asymmetric per token, dynamic (default), or
per-tensor static with ranges calibrated on the task's train split (MSE range search; `-tensor` bits suffix).
Execution is simulated (fake quantization in float); `--execution packed` converts the layers to the packed
integer kernels of `qvlm_harness.kernels`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from qvlm_harness.config import ALL_SCOPES, QuantSpec, Scope
from qvlm_harness.cost import stage
from qvlm_harness.method import Method, MethodConfig, QuantizedModel
from qvlm_harness.methodconfig import option
from qvlm_harness.quant import QLinear, calibrate_static_activations, quantize_linears
from qvlm_harness.quant.methodkit import layer_spec


@dataclass(frozen=True)
class RTNConfig(MethodConfig):
    METHOD = "rtn"
    observer: Literal["mse", "minmax"] = option("mse", "static activation ranges: MSE-optimal clipping or min/max")


class RTN(Method):
    name = "rtn"
    Config = RTNConfig
    produces = (QLinear,)
    packs = True

    def needs_calibration(self, spec: QuantSpec) -> bool:
        return spec.quantizes_activations and not spec.a_dynamic

    def quantize(self, adapter, calibration, spec: QuantSpec, scope: Sequence[Scope] = ALL_SCOPES) -> QuantizedModel:
        wanted = set(adapter.linear_names(scope))
        with stage("round"):
            swapped = quantize_linears(adapter.model, spec, include=lambda n, m: n in wanted,
                                       make=lambda n, m: QLinear.from_linear(m, layer_spec(spec, m.in_features,
                                                                                           spec.w_group_size), name=n))
        if self.needs_calibration(spec):
            with stage("activation_calibration"):
                calibrate_static_activations(adapter.model, swapped, lambda: calibration.run(adapter), spec=spec,
                                             observer=self.config.observer)
        return self.result(adapter, spec, "simulated", swapped)

    def describe(self, spec: QuantSpec) -> str:
        w = f"W{spec.w_bits} symmetric per-{'group ' + str(spec.w_group_size) if spec.w_group_size else 'channel'}"
        a = ("A16 (float)" if not spec.quantizes_activations else
             f"A{spec.a_bits} {'asymmetric' if not spec.a_symmetric else 'symmetric'} per-{spec.a_granularity} "
             f"{'dynamic' if spec.a_dynamic else 'static (MSE-calibrated)'}")
        return f"round-to-nearest {w}, {a}; simulated (fake-quant in float)"

"""Round-to-nearest (`rtn`): the floor every PTQ method must beat.

Weights: symmetric uniform per output channel (or per group with a `g<size>` bits suffix), rounded to nearest.
Activations (the inputs of every quantized linear layer): uniform asymmetric per token, dynamic (default), or
per-tensor static with ranges calibrated on the task's train split (MSE range search; `-tensor` bits suffix).
Execution is simulated (fake quantization in float); packed integer kernels are the kernels issue's job.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from qvlm_harness.config import ALL_SCOPES, QuantSpec, Scope
from qvlm_harness.measure import PeakRSS
from qvlm_harness.method import Method, QuantizedModel, SearchCost
from qvlm_harness.quant import QLinear, calibrate_static_activations, quantize_linears


class RTN(Method):
    name = "rtn"
    default_options = {"observer": "mse"}  # static activation ranges: "mse" search or plain "minmax"

    def needs_calibration(self, spec: QuantSpec) -> bool:
        return spec.quantizes_activations and not spec.a_dynamic

    def quantize(self, adapter, calibration, spec: QuantSpec, scope: Sequence[Scope] = ALL_SCOPES) -> QuantizedModel:
        t0 = time.perf_counter()
        with PeakRSS() as rss:
            wanted = set(adapter.linear_names(scope))
            swapped = quantize_linears(adapter.model, spec, include=lambda n, m: n in wanted,
                                       make=lambda n, m: QLinear.from_linear(m, spec, name=n))
            if self.needs_calibration(spec):
                calibrate_static_activations(adapter.model, swapped, lambda: calibration.run(adapter), spec=spec,
                                             observer=self.options["observer"])
        cost = SearchCost(time.perf_counter() - t0, rss.peak_mb)
        return QuantizedModel(adapter, self.name, spec, "simulated", swapped, cost)

    def describe(self, spec: QuantSpec) -> str:
        w = f"W{spec.w_bits} symmetric per-{'group ' + str(spec.w_group_size) if spec.w_group_size else 'channel'}"
        a = ("A16 (float)" if not spec.quantizes_activations else
             f"A{spec.a_bits} {'asymmetric' if not spec.a_symmetric else 'symmetric'} per-{spec.a_granularity} "
             f"{'dynamic' if spec.a_dynamic else 'static (MSE-calibrated)'}")
        return f"round-to-nearest {w}, {a}; simulated (fake-quant in float)"

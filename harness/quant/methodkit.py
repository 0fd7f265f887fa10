"""Small pieces every baseline method needs: the effective group size of a layer, the activation half of a
`describe()` line, static activation calibration at the end, and the search-cost measurement."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn

from qvlm_harness.config import FLOAT_BITS, QuantSpec
from qvlm_harness.errors import HarnessError
from qvlm_harness.measure import PeakRSS
from qvlm_harness.method import Method, SearchCost
from qvlm_harness.quant.apply import act_quant_modules, calibrate_static_activations


class HessianSolverMethod(Method):
    """What GPTQ and aespa share as methods: they quantize weights (any activation bits), always calibrate (their
    objectives are built from calibration inputs), and take the group size from the `group_size` option, else from
    the bits string."""

    def supports(self, spec: QuantSpec) -> bool:
        return spec.quantizes_weights

    def needs_calibration(self, spec: QuantSpec) -> bool:
        return True

    def _group(self, spec: QuantSpec) -> int | None:
        return self.options["group_size"] or spec.w_group_size


def effective_group(in_features: int, group_size: int | None) -> int | None:
    """`group_size` if it divides the layer's input width, else None (per output channel)."""
    if group_size is None or group_size <= 0:
        return None
    return group_size if in_features % group_size == 0 else None


def layer_spec(spec: QuantSpec, in_features: int, group_size: int | None, symmetric: bool | None = None) -> QuantSpec:
    """The spec one layer is quantized with: the run's spec with the method's group size (when the width allows)
    and weight symmetry."""
    sym = spec.w_symmetric if symmetric is None else symmetric
    return spec.with_(w_group_size=effective_group(in_features, group_size), w_symmetric=sym)


def activation_text(spec: QuantSpec) -> str:
    if not spec.quantizes_activations:
        return "activations in float (A16)"
    kind = "dynamic per-token" if spec.a_granularity == "token" else (
        "dynamic per-tensor" if spec.a_dynamic else "static per-tensor (MSE-calibrated on the calibration set)")
    sym = "symmetric" if spec.a_symmetric else "asymmetric"
    return f"A{spec.a_bits} {sym} {kind} activations at every quantized layer's input (the harness's shared quantizer)"


def needs_static_calibration(spec: QuantSpec) -> bool:
    return spec.a_bits < FLOAT_BITS and not spec.a_dynamic


def calibrate_activations(adapter, calibration, spec: QuantSpec, names: Sequence[str], observer: str = "mse") -> None:
    """Calibrate static per-tensor activation ranges of the quantized layers among `names` (no-op if dynamic)."""
    if not needs_static_calibration(spec):
        return
    if calibration is None:
        raise HarnessError(f"{spec.tag} needs calibration data for its static activation ranges")
    mods = act_quant_modules(adapter.model)
    targets = [n for n in names if n in mods]
    calibrate_static_activations(adapter.model, targets, lambda: calibration.run(adapter), observer=observer)


def set_calibrating(model: nn.Module, on: bool) -> None:
    """Switch every activation quantizer off (on=True) or back on: searches observe float activations."""
    for m in act_quant_modules(model).values():
        m.calibrating = on


@dataclass
class CostMeter:
    stages: dict[str, float] = field(default_factory=dict)
    cost: SearchCost | None = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - t0


@contextmanager
def measure_search() -> Iterator[CostMeter]:
    """Wall time and peak RSS of the quantization (the method's search cost)."""
    meter = CostMeter()
    t0 = time.perf_counter()
    with PeakRSS() as rss:
        yield meter
    meter.cost = SearchCost(time.perf_counter() - t0, rss.peak_mb, {k: round(v, 3) for k, v in meter.stages.items()})

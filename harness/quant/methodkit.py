"""Small pieces the weight-quantization methods share: whether a spec quantizes weights, the effective group size
of a layer, the activation half of a `describe()` line, and static activation calibration at the end."""

from __future__ import annotations

from collections.abc import Sequence

from qvlm_harness.config import CHANNEL_ACTIVATIONS_UNPACKABLE, FLOAT_BITS, QuantSpec
from qvlm_harness.errors import HarnessError
from qvlm_harness.method import Method
from qvlm_harness.quant.apply import act_quant_modules, calibrate_static_activations


def weights_reason(method: str, spec: QuantSpec) -> str | None:
    """Why a weight-quantization method cannot run at `spec` (float weights), or None."""
    if spec.quantizes_weights:
        return None
    return f"{method} quantizes weights; give weight bits below 16 (e.g. w4a16, w8a8)"


class CalibratedWeightMethod(Method):
    """The shared half of GPTQ, AWQ and aespa's contract: any spec that quantizes weights, always calibrated."""

    def supports(self, spec: QuantSpec) -> str | None:
        return weights_reason(self.name, spec)

    def needs_calibration(self, spec: QuantSpec) -> bool:
        return True


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
    """The activation half of a method's `describe()`: which shared quantizer, and for per-input-channel ranges
    why they never run on integer kernels."""
    if not spec.quantizes_activations:
        return "activations in float (A16)"
    if spec.a_granularity == "channel":
        kind = ("static per-input-channel (min/max-calibrated on the calibration set; simulated only: "
                f"{CHANNEL_ACTIVATIONS_UNPACKABLE})")
    elif spec.a_granularity == "token":
        kind = "dynamic per-token"
    else:
        kind = "dynamic per-tensor" if spec.a_dynamic else "static per-tensor (MSE-calibrated on the calibration set)"
    sym = "symmetric" if spec.a_symmetric else "asymmetric"
    return f"A{spec.a_bits} {sym} {kind} activations at every quantized layer's input (the harness's shared quantizer)"


def needs_static_calibration(spec: QuantSpec) -> bool:
    return spec.a_bits < FLOAT_BITS and not spec.a_dynamic


def calibrate_activations(adapter, calibration, spec: QuantSpec, names: Sequence[str], observer: str = "mse") -> None:
    """Calibrate static (per-tensor or per-input-channel) activation ranges of the quantized layers among `names`
    (no-op if dynamic)."""
    if not needs_static_calibration(spec):
        return
    if calibration is None:
        raise HarnessError(f"{spec.tag} needs calibration data for its static activation ranges")
    mods = act_quant_modules(adapter.model)
    targets = [n for n in names if n in mods]
    calibrate_static_activations(adapter.model, targets, lambda: calibration.run(adapter), observer=observer)

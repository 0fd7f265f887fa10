"""Simulated (fake-quant) uniform quantization: math, the `QLinear` wrapper, observers, calibration hooks
and module swapping. See `qvlm_harness.quant.quantizer` for the integer-range and layout conventions."""

from qvlm_harness.quant.apply import (
    calibrate_static_activations,
    linear_names,
    qlinear_modules,
    quantize_linears,
)
from qvlm_harness.quant.calibration import (
    ActivationStats,
    capture_linear_inputs,
    collect_activation_stats,
    input_hooks,
)
from qvlm_harness.quant.observers import MinMaxObserver, MSEObserver, make_observer
from qvlm_harness.quant.qlinear import QLinear
from qvlm_harness.quant.quantizer import (
    MIN_SCALE,
    QParams,
    codes_dtype,
    compute_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_per_tensor,
    fake_quantize_per_token,
    fake_quantize_weight,
    mse_search_range,
    per_tensor_qparams,
    per_token_qparams,
    qrange,
    quant_mse,
    quantize,
    quantize_per_token,
    quantize_weight,
    weight_qparams,
)

__all__ = [
    "MIN_SCALE",
    "ActivationStats",
    "MSEObserver",
    "MinMaxObserver",
    "QLinear",
    "QParams",
    "calibrate_static_activations",
    "capture_linear_inputs",
    "codes_dtype",
    "collect_activation_stats",
    "compute_qparams",
    "dequantize",
    "fake_quantize",
    "fake_quantize_per_tensor",
    "fake_quantize_per_token",
    "fake_quantize_weight",
    "input_hooks",
    "linear_names",
    "make_observer",
    "mse_search_range",
    "per_tensor_qparams",
    "per_token_qparams",
    "qlinear_modules",
    "qrange",
    "quant_mse",
    "quantize",
    "quantize_linears",
    "quantize_per_token",
    "quantize_weight",
    "weight_qparams",
]

"""Floating-point baselines: fp32, fp16, bf16 (no quantization).

On CPU, torch runs fp16 and bf16 matmuls natively (bf16 through oneDNN, fp16 more slowly); nothing is upcast
behind the user's back: the model's parameters are converted and every op runs in that dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qvlm_harness.config import ALL_SCOPES, QuantSpec, Scope
from qvlm_harness.method import Method, QuantizedModel


class _FloatBaseline(Method):
    dtype: torch.dtype = torch.float32
    fixed_precision = True

    def quantize(self, adapter, calibration, spec: QuantSpec, scope: Sequence[Scope] = ALL_SCOPES) -> QuantizedModel:
        adapter.model.to(self.dtype)
        return self.result(adapter, QuantSpec(), "float")

    def describe(self, spec: QuantSpec) -> str:
        return (f"unquantized model, parameters stored and computed in {str(self.dtype).replace('torch.', '')} "
                "(native CPU kernels; no simulation)")


class FP32(_FloatBaseline):
    compute_dtype = "fp32"
    name = "fp32"
    dtype = torch.float32


class FP16(_FloatBaseline):
    compute_dtype = "fp16"
    name = "fp16"
    dtype = torch.float16


class BF16(_FloatBaseline):
    compute_dtype = "bf16"
    name = "bf16"
    dtype = torch.bfloat16

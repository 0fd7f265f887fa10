"""The activation fake-quantizer of quantized layers other than `QLinear` (NormalFloat layers, ...).

It reproduces `QLinear.quantize_input` exactly (same spec fields, same primitives, same static-range buffers), so
a weight-only method given an A<16 setting gets "the same activation quantizer as everyone else", and
`calibrate_static_activations` calibrates these layers like QLinear ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qvlm_harness.config import FLOAT_BITS, QuantSpec
from qvlm_harness.errors import HarnessError
from qvlm_harness.quant.qlinear import static_act_shape
from qvlm_harness.quant.quantizer import QParams, fake_quantize, fake_quantize_per_token, per_tensor_qparams


class ActQuantMixin:
    """Mixin for an `nn.Module` whose input is fake-quantized per `spec` (a_bits, granularity, dynamic)."""

    a_scale: Tensor | None
    a_zero: Tensor | None

    def init_act_quant(self, spec: QuantSpec, name: str = "") -> None:
        self.spec = spec
        self.name = name
        self.a_bits = spec.a_bits
        self.a_symmetric = spec.a_symmetric
        self.a_granularity = spec.a_granularity
        self.a_dynamic = spec.a_dynamic
        self.calibrating = False
        self.register_buffer("a_scale", None)  # type: ignore[attr-defined]
        self.register_buffer("a_zero", None)  # type: ignore[attr-defined]

    @property
    def needs_calibration(self) -> bool:
        return self.a_bits < FLOAT_BITS and not self.a_dynamic

    @property
    def act_qparams(self) -> QParams | None:
        if self.a_scale is None or self.a_zero is None:
            return None
        return QParams(self.a_scale, self.a_zero, self.a_bits, self.a_symmetric)

    @act_qparams.setter
    def act_qparams(self, qp: QParams | None) -> None:
        if qp is None:
            self.a_scale = None
            self.a_zero = None
            return
        shape = static_act_shape(self.a_granularity, getattr(self, "in_features", None), qp)
        if qp.bits != self.a_bits or qp.symmetric != self.a_symmetric:
            raise ValueError(f"act_qparams (bits={qp.bits}, symmetric={qp.symmetric}) do not match {self.spec.tag}")
        device = next((t.device for t in self.buffers()), qp.scale.device)  # the layer's, not the observer's
        self.a_scale = qp.scale.detach().float().reshape(shape).to(device)
        self.a_zero = qp.zero_point.detach().to(torch.int32).reshape(shape).to(device)

    def quantize_input(self, x: Tensor) -> Tensor:
        if self.a_bits >= FLOAT_BITS or self.calibrating:
            return x
        what = f"the input activations of layer {self.name}" if self.name else "the input activations"
        if self.a_granularity == "token":
            return fake_quantize_per_token(x, self.a_bits, self.a_symmetric, what=what)
        if self.a_dynamic:
            return fake_quantize(x, per_tensor_qparams(x, self.a_bits, self.a_symmetric, what=what))
        qp = self.act_qparams
        if qp is None:
            raise HarnessError(f"layer {self.name or '?'} uses static per-{self.a_granularity} activation "
                               "quantization but has no calibrated range; run calibrate_static_activations() first")
        return fake_quantize(x, qp.to(x.device))

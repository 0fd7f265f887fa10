"""QLoRA's quantization (`qlora`, Dettmers et al. 2023): NormalFloat weights, block 64, double quantization.

Every in-scope linear becomes an `NFLinear` holding bitsandbytes' NF4 state (absmax per 64 values; the absmax
re-quantized to 8 bits in blocks of 256 around their mean). At W4A16, layers run through bitsandbytes' own
4-bit kernels (real 4-bit storage); with quantized activations (A < 16), or where bitsandbytes does not run
(width not a multiple of 64, not installed), the harness's bit-identical NF4 path runs instead: dequantized
weights after the shared activation fake-quantizer (simulated). Other weight widths use k-bit NormalFloat
(QLoRA's construction; no bitsandbytes kernel: simulated). The LoRA fine-tuning half of QLoRA is training,
not post-training quantization, and is out of scope. Options: `blocksize` (64), `double_quant` (true),
`backend` ("auto" | "harness" | "bnb").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from qvlm_harness.config import ALL_SCOPES, QuantSpec, Scope
from qvlm_harness.cost import stage
from qvlm_harness.errors import HarnessError
from qvlm_harness.method import Method, MethodConfig, QuantizedModel
from qvlm_harness.methodconfig import option
from qvlm_harness.quant.apply import quantize_linears
from qvlm_harness.quant.methodkit import activation_text, calibrate_activations, weights_reason
from qvlm_harness.quant.nf4 import bnb_available, nf_quantize
from qvlm_harness.quant.nflinear import NFLinear


@dataclass(frozen=True)
class QLoRAConfig(MethodConfig):
    METHOD = "qlora"
    backend: Literal["auto", "harness", "bnb"] = option(
        "auto", "who runs the NF4 layers: bitsandbytes where it can (auto), always the harness's NF path, or "
        "bitsandbytes only")
    blocksize: int = option(64, "values per absmax block", min=2)
    double_quant: bool = option(True, "re-quantize the block absmax to 8 bits (blocks of 256)")


class QLoRA(Method):
    name = "qlora"
    Config = QLoRAConfig
    produces = (NFLinear,)
    packs = False  # NormalFloat codebooks have no integer GEMM (bitsandbytes runs W4A16 itself)

    def supports(self, spec: QuantSpec) -> str | None:
        reason = weights_reason(self.name, spec)
        if reason is None and self.config.backend == "bnb" and (spec.w_bits != 4 or spec.quantizes_activations):
            return "qlora.backend=bnb runs bitsandbytes' 4-bit kernels: W4A16 only"
        if reason is None and self.config.backend == "bnb" and not bnb_available():
            return "qlora.backend=bnb needs bitsandbytes: pip install 'qvlm-harness[bnb]'"
        return reason

    def needs_calibration(self, spec: QuantSpec) -> bool:
        return spec.quantizes_activations and not spec.a_dynamic

    def _backend_for(self, spec: QuantSpec, in_features: int) -> str:
        choice = self.config.backend
        runs = spec.w_bits == 4 and not spec.quantizes_activations and in_features % 64 == 0 and bnb_available()
        if choice == "bnb" and not runs:
            raise HarnessError("qlora.backend=bnb needs W4A16, bitsandbytes installed and widths multiple of 64")
        return "bnb" if (choice == "bnb" or (choice == "auto" and runs)) else "harness"

    def quantize(self, adapter, calibration, spec: QuantSpec, scope: Sequence[Scope] = ALL_SCOPES) -> QuantizedModel:
        blocksize, dq = self.config.blocksize, self.config.double_quant
        backends: dict[str, str] = {}

        def make(name, linear):
            backend = self._backend_for(spec, linear.in_features)
            quantizer = "bnb" if spec.w_bits == 4 and bnb_available() else "harness"
            state = nf_quantize(linear.weight, spec.w_bits, blocksize, dq, backend=quantizer)
            backends[name] = backend
            bias = linear.bias.detach() if linear.bias is not None else None
            return NFLinear(state, bias, spec, name=name, backend=backend, dtype=linear.weight.dtype)

        wanted = set(adapter.linear_names(scope))
        with stage("nf_quantize"):
            names = quantize_linears(adapter.model, spec, include=lambda n, m: n in wanted, make=make)
        with stage("activation_calibration"):
            calibrate_activations(adapter, calibration, spec, names)
        real = bool(names) and all(b == "bnb" for b in backends.values())
        report = {"backends": {b: sum(1 for v in backends.values() if v == b) for b in set(backends.values())},
                  "blocksize": blocksize, "double_quant": dq}
        return self.result(adapter, spec, "real" if real else "simulated", names, report)

    def describe(self, spec: QuantSpec) -> str:
        fmt = "NF4" if spec.w_bits == 4 else f"NF{spec.w_bits} (QLoRA's NormalFloat construction at {spec.w_bits} bits)"
        if spec.w_bits == 4 and not spec.quantizes_activations:
            run = ("bitsandbytes 4-bit kernels where they run (real 4-bit storage), the harness's bit-identical "
                   "NF4 path elsewhere")
        else:
            run = "the harness's NF path (bit-identical to bitsandbytes at 4 bits), simulated"
        absmax = ("double quantization of the absmax (8-bit, blocks of 256)" if self.config.double_quant
                  else "float absmax")
        return (f"QLoRA quantization: {fmt} weights, absmax blocks of {self.config.blocksize}, {absmax}; "
                f"{activation_text(spec)}; executed by {run}; LoRA fine-tuning not included (training, not PTQ)")

"""ZeroQuant-V2 (`zeroquant-v2`, Yao et al. 2023, arXiv 2303.08302): fine-grained quantization + LoRC.

* FGQ: weights group-wise (`group_size` option, default 128, per channel where the width is not a multiple;
  a `g<N>` bits suffix overrides), quantized with GPTQ as in the paper's study (`weights=rtn` for RTN);
  activations token-wise (the harness's dynamic per-token quantizer, the default activation spec).
* LoRC: the quantization error of every layer, ``E = W - Q(W)``, is approximated by its rank-`rank` truncated
  SVD (default 8) whose factors are kept in `factor_bits` (default 8) and added back as a side path
  (`qvlm_harness.quant.lorc.LoRCLinear`, wrapping the quantized layer as a child).

Rank 8: the value this project's reference notes recall from the paper's LoRC experiments; the paper text could
not be checked from this machine (the search tool only found abstracts), so treat it as a documented choice.
The factors in 8 bits follow the paper's remark that they can be kept in low precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from qvlm_harness.config import ALL_SCOPES, QuantSpec, Scope
from qvlm_harness.cost import stage
from qvlm_harness.errors import HarnessError
from qvlm_harness.method import Method, MethodConfig, QuantizedModel, require_calibration
from qvlm_harness.methodconfig import option, resolve_group_size
from qvlm_harness.quant.apply import quantize_linears
from qvlm_harness.quant.gptq import gptq_pass
from qvlm_harness.quant.lorc import LoRCLinear, lorc_factors
from qvlm_harness.quant.methodkit import activation_text, calibrate_activations, layer_spec, weights_reason
from qvlm_harness.quant.qlinear import QLinear

DEFAULT_GROUP = 128
DEFAULT_RANK = 8
DEFAULT_FACTOR_BITS = 8


@dataclass(frozen=True)
class ZeroQuantV2Config(MethodConfig):
    METHOD = "zeroquant-v2"
    weights: Literal["gptq", "rtn"] = option("gptq", "how the group-wise weights are rounded")
    group_size: int | None = option(None, f"weight groups of N input channels (default {DEFAULT_GROUP}; same as a "
                                    "g<N> bits suffix)", min=1)
    rank: int = option(DEFAULT_RANK, "LoRC rank of the error approximation (0: no LoRC)", min=0)
    factor_bits: int = option(DEFAULT_FACTOR_BITS, "bits of the LoRC factors (2..8, or 16 for float)")
    batch_size: int = option(8, "calibration sequences per forward batch", min=1)

    def validate(self) -> None:
        if not (2 <= self.factor_bits <= 8 or self.factor_bits == 16):
            raise HarnessError(f"option zeroquant-v2.factor_bits takes 2..8 or 16, got {self.factor_bits}")


class ZeroQuantV2(Method):
    name = "zeroquant-v2"
    needs_structure = True
    Config = ZeroQuantV2Config
    produces = (LoRCLinear, QLinear)  # QLinear alone with rank=0
    packs = True  # the wrapped QLinear packs; the LoRC factors stay float

    def supports(self, spec: QuantSpec) -> str | None:
        return weights_reason(self.name, spec)

    def _weights(self) -> str:
        return self.config.weights

    def needs_calibration(self, spec: QuantSpec) -> bool:
        return self._weights() == "gptq" or (spec.quantizes_activations and not spec.a_dynamic)

    def _group(self, spec: QuantSpec) -> int | None:
        return resolve_group_size(self.name, spec.w_group_size, self.config.group_size, DEFAULT_GROUP)

    def quantize(self, adapter, calibration, spec: QuantSpec, scope: Sequence[Scope] = ALL_SCOPES) -> QuantizedModel:
        rank, fbits = self.config.rank, self.config.factor_bits
        group = self._group(spec)
        weights = self._weights()
        residual: dict[str, float] = {}

        def wrap(fqn: str, linear, q: QLinear):
            if rank == 0:
                return q
            W = linear.weight.detach().float()
            E = W - q.weight.float()
            U, V = lorc_factors(E, rank)
            m = LoRCLinear(q, U, V, fbits, name=fqn)
            residual[fqn] = float((E - m.lowrank_weight()).norm() / E.norm().clamp(min=1e-12))
            return m

        lspec = lambda f, lin: layer_spec(spec, lin.in_features, group)
        if weights == "gptq":
            calibration = require_calibration(self, spec, calibration)
            with stage("gptq+lorc"):
                info = gptq_pass(adapter, calibration, spec, scope, layer_spec=lspec, make_module=wrap,
                                 batch_size=self.config.batch_size)
            names = info["quantized"]
        else:
            with stage("rtn+lorc"):
                wanted = set(adapter.linear_names(scope))
                names = quantize_linears(
                    adapter.model, spec, include=lambda n, m: n in wanted,
                    make=lambda n, m: wrap(n, m, QLinear.from_linear(m, lspec(n, m), name=n)))
        with stage("activation_calibration"):
            calibrate_activations(adapter, calibration, spec, [f"{n}.qlinear" if rank else n for n in names])
        report = {"weights": weights, "group_size": group, "rank": rank, "factor_bits": fbits,
                  "mean_relative_residual": sum(residual.values()) / max(len(residual), 1)}
        return self.result(adapter, spec, "simulated", names, report)

    def describe(self, spec: QuantSpec) -> str:
        group = self._group(spec)
        rank, fbits = self.config.rank, self.config.factor_bits
        lorc = f"LoRC rank {rank} with {fbits if fbits < 16 else 'float'}-bit factors" if rank else "no LoRC"
        return (f"ZeroQuant-V2 FGQ: W{spec.w_bits} {'symmetric' if spec.w_symmetric else 'asymmetric'} groups of "
                f"{group} (per-channel where the width is not a multiple) by {self._weights().upper()}, {lorc}; "
                f"{activation_text(spec)}; simulated (fake-quant in float)")

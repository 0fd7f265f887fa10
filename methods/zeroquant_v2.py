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

from qvlm_harness.config import ALL_SCOPES, QuantSpec, Scope
from qvlm_harness.errors import HarnessError
from qvlm_harness.method import Method, QuantizedModel
from qvlm_harness.quant.apply import quantize_linears
from qvlm_harness.quant.gptq import gptq_pass
from qvlm_harness.quant.lorc import LoRCLinear, lorc_factors
from qvlm_harness.quant.methodkit import activation_text, calibrate_activations, layer_spec, measure_search
from qvlm_harness.quant.qlinear import QLinear

DEFAULT_GROUP = 128
DEFAULT_RANK = 8
DEFAULT_FACTOR_BITS = 8


class ZeroQuantV2(Method):
    name = "zeroquant-v2"
    default_options = {"weights": "gptq", "group_size": None, "rank": DEFAULT_RANK, "factor_bits": DEFAULT_FACTOR_BITS,
                       "batch_size": 8}

    def supports(self, spec: QuantSpec) -> bool:
        return spec.quantizes_weights

    def _weights(self) -> str:
        w = str(self.options.get("weights", "gptq")).lower()
        if w not in ("gptq", "rtn"):
            raise HarnessError(f"zeroquant-v2.weights must be gptq or rtn, got {w!r}")
        return w

    def needs_calibration(self, spec: QuantSpec) -> bool:
        return self._weights() == "gptq" or (spec.quantizes_activations and not spec.a_dynamic)

    def _group(self, spec: QuantSpec) -> int | None:
        return spec.w_group_size or self.options["group_size"] or DEFAULT_GROUP

    def quantize(self, adapter, calibration, spec: QuantSpec, scope: Sequence[Scope] = ALL_SCOPES) -> QuantizedModel:
        rank = int(self.options.get("rank", DEFAULT_RANK))
        fbits = int(self.options.get("factor_bits", DEFAULT_FACTOR_BITS))
        if rank < 0 or not (2 <= fbits <= 8 or fbits == 16):
            raise HarnessError("zeroquant-v2 needs rank >= 0 and factor_bits in 2..8 or 16")
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

        lspec = lambda f, lin: layer_spec(spec, lin.in_features, group)  # noqa: E731
        with measure_search() as meter:
            if weights == "gptq":
                if calibration is None:
                    raise HarnessError("zeroquant-v2 with GPTQ weights needs calibration data (--calib-samples)")
                with meter.stage("gptq+lorc"):
                    info = gptq_pass(adapter, calibration, spec, scope, layer_spec=lspec, make_module=wrap,
                                     batch_size=int(self.options.get("batch_size", 8)))
                names = info["quantized"]
            else:
                with meter.stage("rtn+lorc"):
                    wanted = set(adapter.linear_names(scope))
                    names = quantize_linears(
                        adapter.model, spec, include=lambda n, m: n in wanted,
                        make=lambda n, m: wrap(n, m, QLinear.from_linear(m, lspec(n, m), name=n)))
            with meter.stage("activation_calibration"):
                calibrate_activations(adapter, calibration, spec, [f"{n}.qlinear" if rank else n for n in names])
        report = {"weights": weights, "group_size": group, "rank": rank, "factor_bits": fbits,
                  "mean_relative_residual": sum(residual.values()) / max(len(residual), 1)}
        return QuantizedModel(adapter, self.name, spec, "simulated", names, meter.cost, report)

    def describe(self, spec: QuantSpec) -> str:
        group = self._group(spec)
        rank = int(self.options.get("rank", DEFAULT_RANK))
        fbits = int(self.options.get("factor_bits", DEFAULT_FACTOR_BITS))
        lorc = f"LoRC rank {rank} with {fbits if fbits < 16 else 'float'}-bit factors" if rank else "no LoRC"
        return (f"ZeroQuant-V2 FGQ: W{spec.w_bits} {'symmetric' if spec.w_symmetric else 'asymmetric'} groups of "
                f"{group} (per-channel where the width is not a multiple) by {self._weights().upper()}, {lorc}; "
                f"{activation_text(spec)}; simulated (fake-quant in float)")

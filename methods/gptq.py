"""GPTQ (`gptq`, Frantar et al. 2022): second-order weight quantization with error feedback.

Weights: the run's spec (symmetric per output channel by default, `g<N>` bits suffix or the `group_size` option
for groups, `-wasym` for asymmetric) quantized column by column by `qvlm_harness.quant.gptq` with Hessians from
calibration inputs of the already-quantized prefix (block by block, and inside a block q/k/v -> o -> gate/up
-> down). Options: `act_order` (false), `group_size`, `percdamp` (0.01), `block_size` (128), `batch_size` (8).
Activations (a weight-only method originally) get the harness's shared activation quantizer when A < 16.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qvlm_harness.config import ALL_SCOPES, QuantSpec, Scope
from qvlm_harness.cost import stage
from qvlm_harness.method import MethodConfig, QuantizedModel, require_calibration
from qvlm_harness.methodconfig import option, resolve_group_size
from qvlm_harness.quant.gptq import gptq_pass
from qvlm_harness.quant.methodkit import (
    CalibratedWeightMethod,
    activation_text,
    calibrate_activations,
    layer_spec,
)
from qvlm_harness.quant.qlinear import QLinear


@dataclass(frozen=True)
class GPTQConfig(MethodConfig):
    METHOD = "gptq"
    group_size: int | None = option(None, "weights in groups of N input channels (same as a g<N> bits suffix)",
                                    min=1)
    act_order: bool = option(False, "quantize columns by decreasing Hessian diagonal (static groups)")
    percdamp: float = option(0.01, "dampening added to the Hessian diagonal, as a fraction of its mean", min=0.0)
    block_size: int = option(128, "columns per lazy-update block", min=1)
    batch_size: int = option(8, "calibration sequences per forward batch", min=1)


class GPTQ(CalibratedWeightMethod):
    name = "gptq"
    needs_structure = True
    Config = GPTQConfig
    produces = (QLinear,)
    packs = True

    def group(self, spec: QuantSpec) -> int | None:
        return resolve_group_size(self.name, spec.w_group_size, self.config.group_size)

    def quantize(self, adapter, calibration, spec: QuantSpec, scope: Sequence[Scope] = ALL_SCOPES) -> QuantizedModel:
        calibration = require_calibration(self, spec, calibration)
        c, group = self.config, self.group(spec)
        with stage("gptq"):
            info = gptq_pass(adapter, calibration, spec, scope,
                             layer_spec=lambda f, lin: layer_spec(spec, lin.in_features, group),
                             act_order=c.act_order, percdamp=c.percdamp, block_size=c.block_size,
                             batch_size=c.batch_size)
        with stage("activation_calibration"):
            calibrate_activations(adapter, calibration, spec, info["quantized"])
        report = {"rtn_fallback": info["rtn_fallback"], "group_size": group, "act_order": c.act_order}
        return self.result(adapter, spec, "simulated", info["quantized"], report)

    def describe(self, spec: QuantSpec) -> str:
        c, group = self.config, self.group(spec)
        g = f"groups of {group} input channels (per-channel where the width is not a multiple)" if group else \
            "per output channel"
        order = "act-order" if c.act_order else "natural column order"
        return (f"GPTQ W{spec.w_bits} {'symmetric' if spec.w_symmetric else 'asymmetric'} {g}, {order}, "
                f"{c.percdamp:g} dampening, lazy blocks of {c.block_size}, Hessians from the quantized prefix's "
                f"calibration inputs; {activation_text(spec)}; simulated (fake-quant in float)")

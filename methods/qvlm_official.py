"""`qvlm-official`: what the released Q-VLM repository (github.com/ChangyuanWang17/QVLM) actually does.

Reproduced from its `custom_bitsandbytes` fork (quant_modules.py / quant_utils.py / nn/modules.py) and its
ScienceQA evaluation script (model_vqa_science.py), so users can put the released behaviour next to the
paper-faithful `qvlm`:

* Weights: bitsandbytes NF4 (block 64, double quantization of the absmax: mean offset, 8-bit dynamic code in
  blocks of 256), round to nearest, through the harness's NF4 primitive (`qvlm_harness.quant.nf4`, bitsandbytes'
  own state when it imports).
* Activations of every language-model linear: asymmetric uniform quantization with one range *per input
  channel* (the released code hard-codes 4 bits; here `a_bits` of the spec). Calibration on 8 ScienceQA-train
  prompts (prefill only; the released code's decode steps pass through during calibration): a running min/max
  per channel, widened on a sample only when the gate is open: ``last_layer_entropy >= mean(entropies so far)
  or block % 3 == 1`` (always on the first sample and at the first layer), where the gate value is the
  token-normalised entropy ``-sum a log a`` (a = L2-normalised |Q(x)| over tokens) at the first and last linear
  of a block and the released code's "DED" ``compute_DED`` between consecutive linears elsewhere. Then two
  search samples (the next two with an image): the first records entropies, the second picks per layer the
  range shrink in {1.0, 0.9, ..., 0.4} minimising ``mean(|Q(x) - x|^0.5)``.
* At inference the calibrated ranges are used by q/k/v/gate/up; o_proj and down_proj (``count_layer == 4`` and
  ``dim != 4096`` in the released code, i.e. the non-hidden-width input on LLaMA-7B) recompute per-channel
  ranges from each prompt; generated tokens widen the prompt's range token by token.
* Vision tower and projector: left in floating point, as the released code leaves them (CLIPVisionModel is
  loaded without a quantization config; the projector is rebuilt in fp16). ``quantize_vision=true`` enables
  the released code's otherwise dead per-token-row branch for the vision tower (NF4 + static per-position
  ranges, shrink grid {1.0, 0.999, 0.998}).

Activation granularity (issue 16): the released per-input-channel ranges above are this method's default, what a
bare ``w4a4`` means for it (``Method.default_activations``; the row's activations column says ``channel-static``,
and ``w4a4-channel`` names it). ``w4a4-token`` swaps them for the harness's shared per-token dynamic quantizer (no
calibration: NF4 weights and per-token activations only), so qvlm-official and qvlm can be compared under one
activation quantizer; per-tensor ranges are not part of the released code and are refused.

Deliberate differences: ranges and scales are clamped (the released code divides by ``max - min`` and yields
NaN for a constant channel); no random answer is substituted for unparseable outputs (the harness scores them
wrong); the hidden width, not the literal 4096, decides which layers are dynamic (``literal_4096=true`` gives
the literal rule, under which every layer of a model whose width is not 4096 is dynamic); no learned rounding
and no visual-encoder tuning exist in the released code, so none are done. Execution is simulated
(per-input-channel activation scales cannot run on integer GEMM kernels: they lie along the reduction dim).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qvlm_harness.config import ALL_SCOPES, CHANNEL_ACTIVATIONS_UNPACKABLE, FLOAT_BITS, QuantSpec, Scope
from qvlm_harness.cost import stage
from qvlm_harness.errors import HarnessError
from qvlm_harness.method import Method, MethodConfig, QuantizedModel
from qvlm_harness.methodconfig import option
from qvlm_harness.quant import MIN_SCALE
from qvlm_harness.quant.apply import set_submodule
from qvlm_harness.quant.codec import ModuleCodec, ModuleFacts, StoredModule, attach_codec, dtype_name
from qvlm_harness.quant.nf4 import NFState, nf_quantize
from qvlm_harness.quant.nflinear import nf_stat_names, nf_state_from, nf_state_meta, nf_state_tensors
from qvlm_harness.quant.quantizer import fake_quantize_per_token

# -- the released activation quantizer ------------------------------------------------------------------------------


def official_fake_quant(x: Tensor, lo: Tensor, hi: Tensor, bits: int) -> Tensor:
    """The released `QuantAct.quantization`: ``s = (2^b - 1) / (max - min)``, ``z = round(s * min) + 2^(b-1)``,
    ``q = clamp(round(s * x - z), -2^(b-1), 2^(b-1) - 1)``, ``x^ = (q + z) / s``; ranges broadcast against x.
    The range width is floored so that a constant channel cannot give an infinite scale (the released code
    returns NaN there)."""
    n = 2**bits - 1
    width = torch.clamp(hi - lo, min=n * MIN_SCALE)
    scale = n / width
    zero = torch.round(scale * lo) + 2 ** (bits - 1)
    q = torch.clamp(torch.round(scale * x - zero), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (q + zero) / scale


def token_entropy(a: Tensor) -> float:
    """`cal_entropy`: L2-normalise over tokens (dim 1 of [1, T, d]), ``-sum a log(a + 1e-7)`` over tokens, mean."""
    a = F.normalize(a, dim=1)
    return float((-(a * torch.log(a + 1e-7)).sum(dim=1)).mean())


def official_ded(p_k: Tensor, p_k1: Tensor) -> float:
    """`compute_DED` of the released code, between the |Q(x)| of two consecutive linears ([1, T, d] each)."""
    p_k = F.normalize(p_k, p=1, dim=1)
    p_k1 = F.normalize(p_k1, p=1, dim=1)
    joint = p_k * p_k1
    joint = joint / joint.sum(dim=1, keepdim=True)
    cond = p_k1 / (p_k + 1e-5)
    cond = cond / cond.sum(dim=1, keepdim=True)
    return float((-(joint * torch.log(cond + 1e-5)).sum(dim=1)).mean())


@dataclass
class CalibState:
    """The released code's module-level globals (`last_layer_entropy`, `llama_entropy`, the last |Q(x)|)."""

    last_entropy: float = 0.0
    entropies: list[float] = field(default_factory=list)
    last_distribution: Tensor | None = None
    mask: Tensor | None = None  # [b, T] attention mask of the current prefill (set by a hook on the LM)
    widened: int = 0
    gated: int = 0


class OfficialQLinear(nn.Module):
    """NF4 weights + the activation quantizer of one linear: the released one (LM: per input channel; vision: per
    row), or the harness's shared per-token dynamic one (``kind="token"``, for a comparison under one quantizer)."""

    def __init__(self, linear: nn.Linear, a_bits: int, kind: str, block: int, position: int, dynamic: bool,
                 state: CalibState, name: str, a_symmetric: bool = False):
        super().__init__()
        nf4 = nf_quantize(linear.weight, backend="auto")  # bitsandbytes' own state when it imports
        self._setup(nf4, linear.bias, linear.weight.dtype, a_bits, kind, block, position, dynamic, state, name,
                    a_symmetric)

    @classmethod
    def restore(cls, nf4: NFState, bias: Tensor | None, dtype: torch.dtype, a_bits: int, kind: str, block: int,
                position: int, dynamic: bool, state: CalibState, name: str,
                a_symmetric: bool = False) -> OfficialQLinear:
        """A layer from its stored NF4 state (checkpoint loading: nothing is re-quantized)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(nf4, bias, dtype, a_bits, kind, block, position, dynamic, state, name, a_symmetric)
        return self

    def _setup(self, nf4: NFState, bias: Tensor | None, dtype: torch.dtype, a_bits: int, kind: str, block: int,
               position: int, dynamic: bool, state: CalibState, name: str, a_symmetric: bool = False) -> None:
        self.name = name
        self.out_features, self.in_features = nf4.shape
        self.nf4 = nf4
        self.register_buffer("weight", self.nf4.dequantize(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.a_bits = a_bits
        self.kind = kind  # "channel" (language model) | "row" (vision) | "token" (shared per-token) | "none" (A16)
        self.a_symmetric = a_symmetric  # the shared per-token quantizer only: the released ranges are asymmetric
        self.block, self.position = block, position  # count_block (1-based), count_layer (1-based)
        self.dynamic = dynamic
        self.state = state
        width = self.in_features if kind == "channel" else 0  # rows: sized by the first calibration image
        self.register_buffer("range_min", torch.zeros(width))
        self.register_buffer("range_max", torch.zeros(width))
        self.phase = "off"  # "calibrate" | "first_search" | "search" | "off" (inference)
        self.samples = 0
        self.shrink = 1.0
        self._run_min: Tensor | None = None  # per-row running range while generating
        self._run_max: Tensor | None = None

    # -- released helpers ---------------------------------------------------------------------------------------
    def _q(self, x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        if self.kind == "row":  # ranges per token row: broadcast over the feature dim
            return official_fake_quant(x, lo.unsqueeze(-1), hi.unsqueeze(-1), self.a_bits)
        return official_fake_quant(x, lo, hi, self.a_bits)

    def _gate(self) -> bool:
        s = self.state
        self.samples += 1
        mean = sum(s.entropies) / len(s.entropies) if s.entropies else float("nan")
        flag = s.last_entropy >= mean or self.block % 3 == 1
        if (self.block == 1 and self.position == 1) or self.samples <= 1:
            flag = True
            s.entropies = []
        return flag

    def _calibrate(self, x: Tensor) -> Tensor:
        """One calibration call (batch of one prompt): gated widening of the running per-channel range."""
        s = self.state
        if self.kind == "row":  # one range per token position, over the features (batch of one image)
            x_min, x_max = x.amin(dim=-1)[0], x.amax(dim=-1)[0]
            if self.range_min.numel() != x_min.numel():
                if self.samples:
                    raise HarnessError(f"{self.name}: the number of vision tokens changed during calibration")
                self.range_min = torch.zeros_like(x_min)
                self.range_max = torch.zeros_like(x_max)
            self.samples += 1
            self.range_min = torch.minimum(self.range_min, x_min)
            self.range_max = torch.maximum(self.range_max, x_max)
            return self._q(x, self.range_min, self.range_max)
        flag = self._gate()
        s.gated += 1
        if flag:
            s.widened += 1
            self.range_min = torch.minimum(self.range_min, x.amin(dim=1)[0])
            self.range_max = torch.maximum(self.range_max, x.amax(dim=1)[0])
        qa = self._q(x, self.range_min, self.range_max)
        a = qa.abs().float()
        prev = s.last_distribution
        if self.position in (1, 7) or prev is None or prev.shape != a.shape:
            s.last_entropy = token_entropy(a)
        else:
            s.last_entropy = official_ded(prev, a)
        s.last_distribution = a
        if not math.isnan(s.last_entropy):
            s.entropies.append(s.last_entropy)
        return qa

    def _grid(self, x: Tensor, factors: Sequence[float]) -> None:
        """Pick the range shrink minimising mean(|Q(x) - x|^0.5) on this prompt (strict improvements only)."""
        best, best_f = math.inf, 1.0
        rows = x.shape[1]
        lo = self.range_min[:rows] if self.kind == "row" else self.range_min
        hi = self.range_max[:rows] if self.kind == "row" else self.range_max
        for f in factors:
            score = float((self._q(x, lo * f, hi * f) - x).abs().pow(0.5).mean())
            if score < best:
                best, best_f = score, f
        self.range_min = self.range_min * best_f
        self.range_max = self.range_max * best_f
        self.shrink *= best_f

    # -- forward -------------------------------------------------------------------------------------------------
    def quantize_input(self, x: Tensor) -> Tensor:
        if self.kind == "none":
            return x
        if self.kind == "token":  # the harness's shared quantizer: one dynamic range per token row
            what = f"the input activations of layer {self.name}"
            return fake_quantize_per_token(x, self.a_bits, self.a_symmetric, what=what)
        xf = x.float()
        if self.phase != "off":
            if xf.shape[1] == 1:
                return x
            if self.phase == "calibrate":
                return self._calibrate(xf).to(x.dtype)
            if self.phase == "first_search":
                if self.kind == "channel":
                    qa = self._calibrate(xf)
                    e = token_entropy(qa.abs())
                    if not math.isnan(e):
                        self.state.entropies.append(e)
                else:
                    self._calibrate(xf)
                self.phase = "search"
            elif self.phase == "search":
                factors = ([1.0 - 0.1 * i for i in range(7)] if self.kind == "channel"
                           else [1.0 - 0.001 * i for i in range(3)])
                self._grid(xf, factors)
        return self._infer(xf).to(x.dtype)

    def _infer(self, x: Tensor) -> Tensor:
        if self.kind == "row":
            rows = x.shape[1]
            return self._q(x, self.range_min[:rows], self.range_max[:rows])
        b, t = x.shape[0], x.shape[1]
        if t == 1 and self._run_min is not None and self._run_min.shape[0] == b:
            self._run_min = torch.minimum(self._run_min, x[:, 0])
            self._run_max = torch.maximum(self._run_max, x[:, 0])
            return self._q(x, self._run_min.unsqueeze(1), self._run_max.unsqueeze(1))
        if self.dynamic:
            mask = self.state.mask
            valid = (mask.to(torch.bool) if mask is not None and tuple(mask.shape) == (b, t)
                     else torch.ones(b, t, dtype=torch.bool, device=x.device)).unsqueeze(-1)
            lo = torch.where(valid, x, torch.full_like(x, math.inf)).amin(dim=1)
            hi = torch.where(valid, x, torch.full_like(x, -math.inf)).amax(dim=1)
        else:
            lo = self.range_min.expand(b, -1)
            hi = self.range_max.expand(b, -1)
        self._run_min, self._run_max = lo.clone(), hi.clone()
        return self._q(x, lo.unsqueeze(1), hi.unsqueeze(1))

    def forward(self, x: Tensor) -> Tensor:
        xq = self.quantize_input(x)
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        b = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        return F.linear(xq, w, b)

    def weight_storage_bytes(self, packed: bool) -> int:
        s = self.nf4
        if packed:  # two codes a byte, one byte per block absmax, fp32 second-level scales and offset
            return math.ceil(s.codes.numel() / 2) + s.absmax_q.numel() + 4 * s.absmax2.numel() + 4
        return self.weight.numel() * self.weight.element_size() + s.codes.numel() + s.absmax_q.numel()

    def extra_repr(self) -> str:
        if self.kind == "none":
            act = "a16 float"
        elif self.kind == "token":
            act = f"a{self.a_bits} {'sym' if self.a_symmetric else 'asym'} per-token dynamic (shared quantizer)"
        else:
            act = (f"a{self.a_bits} asym per-{'input-channel' if self.kind == 'channel' else 'token-row'} "
                   f"{'dynamic' if self.dynamic else 'static'}")
        return (f"in_features={self.in_features}, out_features={self.out_features}, nf4 block64 double-quant, "
                f"{act}, block {self.block} layer {self.position}, simulated")


# -- checkpoint codec -------------------------------------------------------------------------------------------------
# Stored: the NF4 state (packed codes, double-quantized block absmax), the bias and the calibrated ranges; metadata:
# the activation scheme (bits, per-channel / per-row / none, dynamic), the layer's place (block, position) and the
# search's outcome (shrink, samples). The dequantized weight is rebuilt from the NF4 state; the per-prompt padding
# mask the dynamic layers read comes from a hook on the language model, re-installed once all layers are loaded.
_KINDS = ("channel", "row", "token", "none")


def _codec_meta(m: OfficialQLinear) -> dict:
    if m.phase != "off":
        raise HarnessError(f"cannot save {m.name}: it is still calibrating (phase {m.phase!r})")
    return {"in": m.in_features, "out": m.out_features, "name": m.name, "dtype": dtype_name(m.weight.dtype),
            "a_bits": m.a_bits, "a_symmetric": m.a_symmetric, "kind": m.kind, "block": m.block,
            "position": m.position, "dynamic": m.dynamic,
            "samples": m.samples, "shrink": m.shrink, **nf_state_meta(m.nf4)}


def _codec_tensors(m: OfficialQLinear) -> dict[str, Tensor]:
    out = nf_state_tensors(m.nf4) | {"range_min": m.range_min, "range_max": m.range_max}
    return out | ({} if m.bias is None else {"bias": m.bias})


def _codec_build(s: StoredModule) -> OfficialQLinear:
    s.need(nf_stat_names(bool(s.meta_field("double_quant"))) | {"range_min", "range_max"}, {"bias"})
    kind, (a_bits, block, position, samples) = s.meta_field("kind"), s.ints("a_bits", "block", "position", "samples")
    if kind not in _KINDS:
        s.fail(f"unknown activation kind {kind!r} (known: {', '.join(_KINDS)})")
    if (kind == "none") != (a_bits >= FLOAT_BITS):
        s.fail(f"activation kind {kind!r} does not fit a_bits {a_bits}")
    out_f, in_f = s.ints("out", "in")
    nf4 = nf_state_from(s, (out_f, in_f))
    lo, hi = s.tensors["range_min"], s.tensors["range_max"]
    width = {"channel": in_f, "token": 0, "none": 0}.get(kind, lo.numel())
    s.shaped("range_min", (width,))
    s.shaped("range_max", (width,))
    bias = s.shaped("bias", (out_f,)) if "bias" in s.tensors else None
    m = OfficialQLinear.restore(nf4, bias, s.dtype(), a_bits, kind, block, position, bool(s.meta_field("dynamic")),
                                CalibState(), s.meta.get("name", ""), bool(s.meta.get("a_symmetric", False)))
    m.range_min, m.range_max = lo.float(), hi.float()
    m.samples, m.shrink = samples, float(s.meta_field("shrink"))
    return m


def _codec_facts(meta: dict) -> ModuleFacts:
    return ModuleFacts({"w_bits": meta.get("bits"), "a_bits": meta.get("a_bits")})


def _codec_on_load(model: nn.Module, modules: list[nn.Module]) -> None:
    """The layers share one calibration state whose padding mask a hook on the language model sets per call."""
    state = CalibState()
    for m in modules:
        m.state = state
    model.model.language_model.register_forward_pre_hook(_mask_hook(state), with_kwargs=True)


attach_codec(ModuleCodec("OfficialQLinear", OfficialQLinear, _codec_meta, _codec_build, _codec_facts,
                         tensors=_codec_tensors, on_load=_codec_on_load))


# -- the method ------------------------------------------------------------------------------------------------------


def _module_order_linears(unit) -> list[tuple[str, nn.Linear]]:
    """(name relative to the unit, linear) in module registration order: the released code numbers a layer's
    linears that way (its `position` 4 is o_proj in a Llama layer)."""
    return [(n, m) for n, m in unit.module.named_modules() if isinstance(m, nn.Linear)]


@dataclass(frozen=True)
class QVLMOfficialConfig(MethodConfig):
    METHOD = "qvlm-official"
    n_calib: int = option(8, "calibration prompts of the gated running min/max (released: 8)", min=1)
    n_search: int = option(2, "search prompts with an image: entropies, then the shrink grid (released: 2)",
                           choices=(0, 1, 2))
    quantize_vision: bool = option(False, "enable the released code's otherwise dead vision-tower branch")
    literal_4096: bool = option(False, "the released rule verbatim: dynamic ranges wherever the input width is not "
                                "4096 (else: not the hidden width)")


class QVLMOfficial(Method):
    name = "qvlm-official"
    needs_structure = True
    Config = QVLMOfficialConfig
    produces = (OfficialQLinear,)
    packs = False  # per-input-channel activation scales lie along the reduction dim: no integer GEMM
    default_activations = ("channel", False)  # the released code's ranges: what a bare w4a4 means here

    @property
    def n_calib(self) -> int:
        return self.config.n_calib

    @property
    def n_search(self) -> int:
        return self.config.n_search

    @property
    def quantize_vision(self) -> bool:
        return self.config.quantize_vision

    @property
    def literal_4096(self) -> bool:
        return self.config.literal_4096

    def supports(self, spec: QuantSpec) -> str | None:
        if spec.w_bits != 4:
            return "the released code has NF4 (4-bit) weights only; use w4a4 or w4a16"
        if spec.w_group_size not in (None, 64):
            return "NF4 uses blocks of 64; drop the group suffix"
        act = self.computed_spec(spec)
        if not act.quantizes_activations or act.a_granularity == "token":
            return None
        if act.a_granularity == "tensor":
            return ("per-tensor ranges are not in the released code; use w4aN (its per-input-channel ranges) or "
                    "w4aN-token (the shared per-token quantizer)")
        if act.a_symmetric:
            return "the released per-input-channel ranges are asymmetric; drop -sym (or use w4aN-token-sym)"
        return None

    def needs_calibration(self, spec: QuantSpec) -> bool:
        return self.computed_spec(spec).a_granularity == "channel" and spec.quantizes_activations

    def describe(self, spec: QuantSpec) -> str:
        act = self.computed_spec(spec)
        if not act.quantizes_activations:
            a = "A16 (float)"
        elif act.a_granularity == "token":
            a = (f"A{spec.a_bits} {'symmetric' if act.a_symmetric else 'asymmetric'} dynamic per-token activations "
                 "(the harness's shared quantizer, not the released one; no calibration)")
        else:
            a = (f"A{spec.a_bits} asymmetric static per-input-channel ranges, the released quantizer (gated running "
                 f"min/max on 8 prompts, shrink grid 1.0..0.4 on a search prompt; o/down_proj dynamic per prompt; "
                 f"simulated only: {CHANNEL_ACTIVATIONS_UNPACKABLE})")
        vis = ("vision tower NF4 + per-token-row ranges (released dead code, enabled)" if self.quantize_vision
               else "vision tower and projector in floating point, as in the released code")
        return (f"Q-VLM released code: NF4 weights (block 64, double quant, round to nearest), {a}; {vis}; "
                "simulated (no packed NF4 kernel here)")

    def quantize(self, adapter, calibration, spec: QuantSpec, scope: Sequence[Scope] = ALL_SCOPES) -> QuantizedModel:
        reason = self.supports(spec)
        if reason:
            raise HarnessError(f"qvlm-official does not support {spec.tag}: {reason}")
        model = adapter.model
        state = CalibState()
        swapped: list[OfficialQLinear] = []
        act = self.computed_spec(spec)
        a_bits = spec.a_bits if spec.quantizes_activations else FLOAT_BITS
        per_token = a_bits < FLOAT_BITS and act.a_granularity == "token"
        lm_kind = "none" if a_bits >= FLOAT_BITS else "token" if per_token else "channel"
        vision_kind = "none" if a_bits >= FLOAT_BITS else "token" if per_token else "row"
        with stage("nf4"):
            quantize_vision = self.quantize_vision and "vision" in scope
            stacks = {s.name: s for s in adapter.stacks(["vision", "lm"] if quantize_vision else ["lm"])}
            hidden = model.config.text_config.hidden_size
            if "lm" in scope:
                for bi, unit in enumerate(stacks["lm"].units):
                    for pos, (name, lin) in enumerate(_module_order_linears(unit), start=1):
                        dyn = (lin.in_features != (4096 if self.literal_4096 else hidden)) or pos == 4
                        mod = OfficialQLinear(lin, a_bits, lm_kind, bi + 1, pos, dyn and not per_token, state,
                                              f"{unit.name}.{name}", act.a_symmetric)
                        set_submodule(unit.module, name, mod)
                        swapped.append(mod)
            if quantize_vision:
                for bi, unit in enumerate(stacks["vision"].units):
                    for pos, (name, lin) in enumerate(_module_order_linears(unit), start=1):
                        mod = OfficialQLinear(lin, a_bits, vision_kind, bi + 1, pos, False, state,
                                              f"{unit.name}.{name}", act.a_symmetric)
                        set_submodule(unit.module, name, mod)
                        swapped.append(mod)
        # the per-prompt (dynamic) ranges must ignore left padding: the LM's 2-D attention mask, per call
        model.model.language_model.register_forward_pre_hook(_mask_hook(state), with_kwargs=True)
        report: dict = {"calibration_ids": [], "search_ids": [], "activations": act.activations}
        if a_bits < FLOAT_BITS and not per_token:
            with stage("calibrate"):
                report |= self._calibrate(adapter, calibration, swapped, state)
        report |= {
            "layers": len(swapped),
            "dynamic_layers": sum(m.dynamic for m in swapped),
            "shrink": {m.name: round(m.shrink, 3) for m in swapped if m.kind in ("channel", "row")},
            "gate": {"calls": state.gated, "widened": state.widened},
            "float_parts": (["vision"] if not (self.quantize_vision and "vision" in scope) else []) + ["projector"],
        }
        return self.result(adapter, spec, "simulated", [m.name for m in swapped], report)

    def _calibrate(self, adapter, calibration, modules: list[OfficialQLinear], state: CalibState) -> dict:
        if calibration is None or len(calibration) == 0:
            raise HarnessError("qvlm-official needs calibration samples (the released code uses 8 + 2)")
        reqs = list(calibration.requests)
        calib = reqs[: self.n_calib]
        search = [r for r in reqs[self.n_calib:] if r.image is not None][: self.n_search]

        def forward(req) -> None:
            batch = adapter.encode([req])
            with torch.no_grad():
                adapter.model.model(**batch, use_cache=False)

        for m in modules:
            m.phase = "calibrate"
        for r in calib:
            forward(r)
        for phase, req in zip(("first_search", "search"), search, strict=False):
            for m in modules:
                m.phase = phase if phase == "first_search" else ("search" if m.phase == "search" else "off")
            forward(req)
        for m in modules:
            m.phase = "off"
        return {"calibration_ids": [r.sample_id for r in calib], "search_ids": [r.sample_id for r in search],
                "entropies_last_sample": [round(e, 4) for e in state.entropies[-64:]]}



def _mask_hook(state: CalibState):
    def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        state.mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None

    return hook

"""`QLinear`: the simulated ("fake-quant") replacement of `nn.Linear`.

The weight is quantized once, at construction: the integer codes and their QParams are kept (a packed-kernel
converter reads them) together with the dequantized float weight that the forward pass multiplies with, so
the per-call cost is only the activation quantizer. The activation quantizer acts on the layer input and is
one of: none (``a_bits == 16``), dynamic per token (one range per row of the flattened ``[..., in]`` input),
dynamic per tensor, or static per tensor / per input channel with a calibrated range (`act_qparams`,
see `qvlm_harness.quant.apply.calibrate_static_activations`). Per input channel is simulated only: its scale runs
along the GEMM's reduction dim, so no integer kernel can apply it after the product.

Buffers (all move with ``.to(device)``): ``codes`` (int8 for symmetric, uint8 for asymmetric weights, values
in the integer range of ``w_bits``; ``None`` for float weights), ``w_scale`` (float32) / ``w_zero`` (int32) in
the `weight_qparams` layout, ``weight`` (dequantized float weight, dtype of the original layer), ``bias``,
and ``a_scale`` / ``a_zero`` (static activation range: scalars, ``[in]`` vectors per input channel, or ``None``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qvlm_harness.config import FLOAT_BITS, QuantSpec
from qvlm_harness.errors import HarnessError
from qvlm_harness.quant.codec import (
    ModuleCodec,
    ModuleFacts,
    StoredModule,
    attach_codec,
    dtype_name,
    spec_facts,
    spec_from_dict,
)
from qvlm_harness.quant.quantizer import (
    QParams,
    codes_dtype,
    dequantize,
    fake_quantize,
    fake_quantize_per_token,
    per_tensor_qparams,
    quantize_weight,
)


def static_act_shape(granularity: str, in_features: int | None, qp: QParams) -> tuple[int, ...]:
    """The buffer shape of a static activation range: ``()`` per tensor, ``(in,)`` per input channel; a `qp` of
    another size raises ValueError (a per-tensor range on a per-channel layer would silently broadcast)."""
    channel = granularity == "channel"
    want = in_features if channel else 1
    ok = qp.group_size is None and (qp.scale.numel() == want if want is not None else qp.scale.dim() == 1)
    if not ok:
        kind = f"per input channel ({in_features} values)" if channel else "per tensor"
        raise ValueError(f"static activation QParams must be {kind}, got {tuple(qp.scale.shape)}")
    return (qp.scale.numel(),) if channel else ()


class QLinear(nn.Module):
    """Fake-quantized linear layer: ``y = x_q @ dequant(codes).T + bias`` computed in the input's dtype."""

    codes: Tensor | None
    w_scale: Tensor | None
    w_zero: Tensor | None
    weight: Tensor
    bias: Tensor | None
    a_scale: Tensor | None
    a_zero: Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: QuantSpec,
        *,
        weight: Tensor,
        bias: Tensor | None = None,
        codes: Tensor | None = None,
        w_qparams: QParams | None = None,
        act_qparams: QParams | None = None,
        name: str = "",
    ):
        """Low-level constructor; use `from_linear` or `from_codes`.

        `weight` is the float weight the forward uses (already dequantized when `codes` is given).
        """
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.spec = spec
        self.name = name
        self.w_bits = spec.w_bits
        self.w_symmetric = spec.w_symmetric
        self.w_group_size = spec.w_group_size
        self.a_bits = spec.a_bits
        self.a_symmetric = spec.a_symmetric
        self.a_granularity = spec.a_granularity
        self.a_dynamic = spec.a_dynamic
        # While True the input passes unquantized: static calibration observes the float-activation inputs.
        self.calibrating = False
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {tuple(weight.shape)} != ({out_features}, {in_features})")
        if spec.quantizes_weights:
            if codes is None or w_qparams is None:
                raise ValueError("a weight-quantized QLinear needs codes and w_qparams")
            if tuple(codes.shape) != tuple(weight.shape):
                raise ValueError(f"codes shape {tuple(codes.shape)} != weight shape {tuple(weight.shape)}")
            if w_qparams.bits != spec.w_bits or w_qparams.symmetric != spec.w_symmetric:
                raise ValueError(
                    f"w_qparams (bits={w_qparams.bits}, symmetric={w_qparams.symmetric}) do not match "
                    f"spec {spec.tag}"
                )
            self.register_buffer("codes", codes.detach().to(codes_dtype(w_qparams.symmetric)).clone())
            self.register_buffer("w_scale", w_qparams.scale.detach().float().clone())
            self.register_buffer("w_zero", w_qparams.zero_point.detach().to(torch.int32).clone())
            self.w_qgroup = w_qparams.group_size
        else:
            self.register_buffer("codes", None)
            self.register_buffer("w_scale", None)
            self.register_buffer("w_zero", None)
            self.w_qgroup = None
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("a_scale", None)
        self.register_buffer("a_zero", None)
        self.act_qparams = act_qparams

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> QLinear:
        """Keep scales in float32 through ``model.to(dtype)`` / ``.half()`` (only their device follows).

        The dequantized `weight` follows the model dtype, as the layer it replaces would; the scales are
        quantization metadata a packed-kernel converter must read exactly, so casting them to bf16 would lose
        bits for nothing.
        """
        keep = {n: getattr(self, n) for n in ("w_scale", "a_scale")}
        out = super()._apply(fn, recurse)
        for n, old in keep.items():
            new = getattr(self, n)
            if old is not None and new is not None and new.dtype != old.dtype:
                setattr(self, n, old.to(new.device))
        return out

    # -- constructors -------------------------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        spec: QuantSpec,
        weight: Tensor | None = None,
        act_qparams: QParams | None = None,
        *,
        name: str = "",
        mse: bool = False,
    ) -> QLinear:
        """Quantize `linear` (round-to-nearest) according to `spec`.

        `weight` replaces ``linear.weight`` as the float weight to round (e.g. AWQ-scaled or
        SmoothQuant-migrated); `mse=True` clips the weight ranges by MSE search. The stored float weight keeps
        ``linear.weight``'s dtype and device.
        """
        w = linear.weight if weight is None else weight
        if tuple(w.shape) != tuple(linear.weight.shape):
            raise ValueError(f"replacement weight shape {tuple(w.shape)} != {tuple(linear.weight.shape)}")
        dtype, device = linear.weight.dtype, linear.weight.device
        w = w.detach().to(device)
        bias = linear.bias.detach() if linear.bias is not None else None
        if not spec.quantizes_weights:
            return cls(
                linear.in_features,
                linear.out_features,
                spec,
                weight=w.to(dtype),
                bias=bias,
                act_qparams=act_qparams,
                name=name,
            )
        codes, qp = quantize_weight(w, spec.w_bits, spec.w_symmetric, spec.w_group_size, mse=mse, name=name)
        return cls(
            linear.in_features,
            linear.out_features,
            spec,
            weight=dequantize(codes, qp, dtype),
            bias=bias,
            codes=codes,
            w_qparams=qp,
            act_qparams=act_qparams,
            name=name,
        )

    @classmethod
    def from_codes(
        cls,
        codes: Tensor,
        qparams: QParams,
        bias: Tensor | None,
        spec: QuantSpec,
        act_qparams: QParams | None = None,
        in_features: int | None = None,
        out_features: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        name: str = "",
    ) -> QLinear:
        """Build from integer codes ``[out, in]`` a method produced itself (e.g. GPTQ) and their QParams."""
        if codes.dim() != 2:
            raise ValueError(f"codes must be 2-D [out, in], got shape {tuple(codes.shape)}")
        out_f, in_f = codes.shape
        if (in_features is not None and in_features != in_f) or (
            out_features is not None and out_features != out_f
        ):
            raise ValueError(f"codes shape {tuple(codes.shape)} != ({out_features}, {in_features})")
        if codes.is_floating_point() and not torch.equal(codes, codes.round()):
            raise ValueError("codes must be integers")
        lo, hi = int(codes.min()), int(codes.max())
        if lo < qparams.qmin or hi > qparams.qmax:
            raise ValueError(f"codes span [{lo}, {hi}], outside [{qparams.qmin}, {qparams.qmax}]")
        return cls(
            in_f,
            out_f,
            spec,
            weight=dequantize(codes, qparams, dtype),
            bias=bias,
            codes=codes,
            w_qparams=qparams,
            act_qparams=act_qparams,
            name=name,
        )

    # -- quantization parameters --------------------------------------------------------------------------
    @property
    def w_qparams(self) -> QParams | None:
        """Weight QParams (``None`` for float weights); views of the buffers."""
        if self.w_scale is None or self.w_zero is None:
            return None
        return QParams(self.w_scale, self.w_zero, self.w_bits, self.w_symmetric, self.w_qgroup)

    @property
    def act_qparams(self) -> QParams | None:
        """Calibrated static per-tensor activation QParams (``None`` if not set)."""
        if self.a_scale is None or self.a_zero is None:
            return None
        return QParams(self.a_scale, self.a_zero, self.a_bits, self.a_symmetric)

    @act_qparams.setter
    def act_qparams(self, qp: QParams | None) -> None:
        if qp is None:
            self.a_scale = None
            self.a_zero = None
            return
        shape = static_act_shape(self.a_granularity, self.in_features, qp)
        if self.a_bits != FLOAT_BITS and (qp.bits != self.a_bits or qp.symmetric != self.a_symmetric):
            raise ValueError(
                f"act_qparams (bits={qp.bits}, symmetric={qp.symmetric}) do not match spec {self.spec.tag}"
            )
        device = self.weight.device
        self.a_scale = qp.scale.detach().float().reshape(shape).to(device)
        self.a_zero = qp.zero_point.detach().to(torch.int32).reshape(shape).to(device)

    @property
    def needs_calibration(self) -> bool:
        """True for static (per-tensor or per-input-channel) activations, which need `act_qparams` before use."""
        return self.a_bits < FLOAT_BITS and not self.a_dynamic

    # -- forward ------------------------------------------------------------------------------------------
    def quantize_input(self, x: Tensor) -> Tensor:
        """The activation fake-quantizer applied to the layer input (same shape and dtype as `x`)."""
        if self.a_bits >= FLOAT_BITS or self.calibrating:
            return x
        what = f"the input activations of layer {self.name}" if self.name else "the input activations"
        if self.a_granularity == "token":
            return fake_quantize_per_token(x, self.a_bits, self.a_symmetric, what=what)
        if self.a_dynamic:
            return fake_quantize(x, per_tensor_qparams(x, self.a_bits, self.a_symmetric, what=what))
        qp = self.act_qparams
        if qp is None:
            layer = f"layer {self.name}" if self.name else "a QLinear layer"
            raise HarnessError(
                f"{layer} uses static per-{self.a_granularity} activation quantization but has no calibrated "
                "range; run calibrate_static_activations() first or use a dynamic activation spec"
            )
        return fake_quantize(x, qp)  # a per-input-channel scale [in] broadcasts along the last dim

    def forward(self, x: Tensor) -> Tensor:
        xq = self.quantize_input(x)
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        b = self.bias
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        return F.linear(xq, w, b)

    # -- reporting ----------------------------------------------------------------------------------------
    @property
    def w_granularity(self) -> str:
        return self.spec.w_granularity

    def weight_storage_bytes(self, packed: bool) -> int:
        """Bytes the weight takes (bias excluded).

        ``packed=True``: what a real low-bit kernel would store: ``ceil(w_bits * numel / 8)`` for the codes,
        plus fp16 scales (2 bytes each) and, for asymmetric weights, zero points packed at ``w_bits`` each.
        Float weights (w16) count 2 bytes per element. ``packed=False``: what this simulated module holds now
        (codes, dequantized float weight, scales and zero points buffers).
        """
        numel = self.out_features * self.in_features
        if packed:
            if self.codes is None:
                return numel * FLOAT_BITS // 8
            assert self.w_scale is not None and self.w_zero is not None
            total = math.ceil(self.w_bits * numel / 8) + 2 * self.w_scale.numel()
            if not self.w_symmetric:
                total += math.ceil(self.w_bits * self.w_zero.numel() / 8)
            return total
        bufs = [self.weight, self.codes, self.w_scale, self.w_zero]
        return sum(t.numel() * t.element_size() for t in bufs if t is not None)

    def extra_repr(self) -> str:
        if self.w_bits < FLOAT_BITS:
            sym = "sym" if self.w_symmetric else "asym"
            gran = f"group{self.w_group_size}" if self.w_group_size else "channel"
            w = f"w{self.w_bits} {sym} per-{gran}"
        else:
            w = "w16 float"
        if self.a_bits < FLOAT_BITS:
            sym = "sym" if self.a_symmetric else "asym"
            kind = "dynamic" if self.a_dynamic else "static" if self.act_qparams is not None else "static-uncalibrated"
            gran = "input-channel" if self.a_granularity == "channel" else self.a_granularity
            a = f"a{self.a_bits} {sym} per-{gran} {kind}"
        else:
            a = "a16 float"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {w}, {a}, simulated"
        )


# -- checkpoint codec -----------------------------------------------------------------------------------------------
# Stored: the integer codes, their scales and zero points, the bias and the static activation range; the dequantized
# float weight is recomputed from the codes on load (bit-identical), so no float copy is written.
def _codec_meta(m: QLinear) -> dict:
    if m.calibrating:  # it would load as a calibrated layer and compute something else
        raise HarnessError(f"cannot save {m.name or 'a QLinear'}: it is still calibrating (calibrating=True)")
    return {"in": m.in_features, "out": m.out_features, "spec": m.spec.to_dict(), "group": m.w_qgroup,
            "name": m.name, "dtype": dtype_name(m.weight.dtype)}


def _codec_tensors(m: QLinear) -> dict[str, Tensor]:
    state = m.state_dict()
    if m.codes is not None:
        state.pop("weight")
    return state


def _codec_build(s: StoredModule) -> QLinear:
    spec = spec_from_dict(s.meta_field("spec"), f"checkpoint module {s.name}")
    dtype = s.dtype()
    optional = {"bias", "a_scale", "a_zero"}
    if spec.quantizes_weights:
        s.need({"codes", "w_scale", "w_zero"}, optional)
        t = s.tensors
        qp = QParams(t["w_scale"].float(), t["w_zero"].to(torch.int32), spec.w_bits, spec.w_symmetric,
                     s.meta_field("group"))
        try:
            in_f, out_f = s.ints("in", "out")
            m = QLinear.from_codes(t["codes"], qp, t.get("bias"), spec, in_features=in_f, out_features=out_f,
                                   dtype=dtype, name=s.meta.get("name", ""))
        except (ValueError, RuntimeError) as exc:
            s.fail(str(exc))
    else:
        s.need({"weight"}, optional)
        try:
            m = QLinear(*s.ints("in", "out"), spec, weight=s.tensors["weight"].to(dtype),
                        bias=s.tensors.get("bias"), name=s.meta.get("name", ""))
        except ValueError as exc:
            s.fail(str(exc))
    if ("a_scale" in s.tensors) != ("a_zero" in s.tensors):
        s.fail("a_scale and a_zero must be stored together")
    if "a_scale" in s.tensors:
        m.a_scale, m.a_zero = s.tensors["a_scale"].float(), s.tensors["a_zero"].to(torch.int32)
    return m


def _codec_build_packed(s: StoredModule, backend: str) -> nn.Module | None:
    """The packed module (`qvlm_harness.kernels.convert.packed_module`) straight from the stored codes and
    scales: the dequantized float weight `_codec_build` recomputes is never made. None where the layer cannot pack
    (float weights, a static activation range that was never calibrated): it then loads as a QLinear, and the
    conversion report lists it as simulated, as converting the loaded QLinear would."""
    from qvlm_harness.kernels.convert import packed_module

    spec = spec_from_dict(s.meta_field("spec"), f"checkpoint module {s.name}")
    static = spec.a_bits < FLOAT_BITS and not spec.a_dynamic and spec.a_granularity != "token"
    if not spec.quantizes_weights or (static and "a_scale" not in s.tensors):
        return None
    s.need({"codes", "w_scale", "w_zero"}, {"bias", "a_scale", "a_zero"})
    if ("a_scale" in s.tensors) != ("a_zero" in s.tensors):
        s.fail("a_scale and a_zero must be stored together")
    in_f, out_f = s.ints("in", "out")
    codes = s.shaped("codes", (out_f, in_f))
    group = s.meta_field("group")
    if group is not None and (not isinstance(group, int) or group <= 0 or in_f % group):
        s.fail(f"group {group!r} does not divide the {in_f} input channels")
    groups = 1 if group is None else in_f // group
    t = s.tensors
    if codes.is_floating_point() or tuple(t["w_scale"].shape) not in ((out_f, groups), (1, groups)) \
            or t["w_zero"].shape != t["w_scale"].shape:
        s.fail(f"codes {codes.dtype} with scales {tuple(t['w_scale'].shape)} / zero points "
               f"{tuple(t['w_zero'].shape)} do not fit [{out_f}, {in_f}] in {groups} group(s)")
    qp = QParams(t["w_scale"].float(), t["w_zero"].to(torch.int32), spec.w_bits, spec.w_symmetric, group)
    if codes.numel() and (int(codes.min()) < qp.qmin or int(codes.max()) > qp.qmax):
        s.fail(f"codes span [{int(codes.min())}, {int(codes.max())}], outside [{qp.qmin}, {qp.qmax}]")
    act = None
    if "a_scale" in t and spec.a_bits < FLOAT_BITS:
        act = QParams(t["a_scale"].float().reshape(()), t["a_zero"].to(torch.int32).reshape(()), spec.a_bits,
                      spec.a_symmetric)
    try:
        return packed_module(codes.to(codes_dtype(spec.w_symmetric)), qp, t.get("bias"), spec.a_bits,
                             spec.a_symmetric, spec.a_granularity, spec.a_dynamic, act,
                             name=s.meta.get("name", ""), backend=backend)
    except (ValueError, RuntimeError) as exc:
        s.fail(str(exc))


def _codec_facts(meta: dict) -> ModuleFacts:
    return ModuleFacts(spec_facts(meta.get("spec") or {}))


attach_codec(ModuleCodec("QLinear", QLinear, _codec_meta, _codec_build, _codec_facts, tensors=_codec_tensors,
                         build_packed=_codec_build_packed))

"""Convert a fake-quant model into packed form: every `QLinear` becomes an `IntLinear` or `WeightOnlyLinear`.

The converter reads only the `QLinear` contract (integer `codes`, `w_qparams`, `bias`, `a_bits`, `a_symmetric`,
`a_granularity`, `a_dynamic`, `act_qparams`), so any method that produces `QLinear` modules converts, and so do
wrappers that hold a `QLinear` as a child (the child is swapped where it sits; the wrapper's own float parts
keep running as they are). A layer that cannot run on integer kernels stays simulated and is listed in the
report with the reason: float weights (activation-only quantization), a `QLinear` subclass with its own forward
(its extra arithmetic is unknown here), per-input-channel activation ranges (no integer GEMM can apply a scale
along its reduction dim), or a static activation range that was never calibrated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from qvlm_harness.config import CHANNEL_ACTIVATIONS_UNPACKABLE, FLOAT_BITS
from qvlm_harness.kernels.linear import IntLinear, PackedLinear, WeightOnlyLinear
from qvlm_harness.kernels.packing import code_centre, pack_codes
from qvlm_harness.quant.apply import set_submodule
from qvlm_harness.quant.qlinear import QLinear
from qvlm_harness.quant.quantizer import QParams


@dataclass
class ConversionReport:
    """What `convert_to_packed` did: converted layer names and, for the rest, why they stay simulated."""

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    kinds: dict[str, int] = field(default_factory=dict)  # packed module class -> count
    wrappers: dict[str, str] = field(default_factory=dict)  # wrapper FQN -> class, whose inner layer was packed
    kernel: str | None = None  # how the kernels were made ready (built, loaded, compiled) and in how long
    # why packed int4 weight-only layers dequantize per call instead of an int4 kernel -> count (e.g. an old GPU)
    kernel_notes: dict[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return bool(self.converted) and not self.skipped

    def to_dict(self) -> dict:
        return {"converted": len(self.converted), "skipped": dict(self.skipped), "kinds": dict(self.kinds),
                "wrappers": dict(self.wrappers), "kernel": self.kernel, "kernel_notes": dict(self.kernel_notes)}

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in self.kinds.items()) or "none"
        s = f"packed {len(self.converted)} layer(s) ({kinds})"
        if self.wrappers:
            names = sorted(set(self.wrappers.values()))
            s += f"; {len(self.wrappers)} wrapper(s) ({', '.join(names)}) keep their own float parts around it"
        if self.skipped:
            reasons: dict[str, int] = {}
            for r in self.skipped.values():
                reasons[r] = reasons.get(r, 0) + 1
            s += f"; {len(self.skipped)} left simulated: " + "; ".join(f"{n} x {r}" for r, n in reasons.items())
        if self.kernel_notes:
            s += "; int4 weights dequantized per call (no int4 kernel): " + "; ".join(
                f"{n} x {r}" for r, n in self.kernel_notes.items())
        if self.kernel:
            s += f"; {self.kernel}"
        return s


def conversion_blocker(q: QLinear) -> str | None:
    """Why `q` cannot be packed, or None if it can."""
    cls = type(q)
    if cls.forward is not QLinear.forward or cls.quantize_input is not QLinear.quantize_input:
        return f"{cls.__name__} overrides the QLinear forward (unknown arithmetic)"
    if q.codes is None or q.w_qparams is None:
        return "float weights (activation-only quantization has no integer GEMM)"
    if q.calibrating:
        return "still calibrating"
    if q.a_bits < FLOAT_BITS and q.a_granularity == "channel":
        return CHANNEL_ACTIVATIONS_UNPACKABLE
    if q.a_bits < FLOAT_BITS and not q.a_dynamic and q.a_granularity != "token" and q.act_qparams is None:
        return "static activation range not calibrated"
    return None


def pack_qlinear(q: QLinear, *, backend: str = "auto") -> PackedLinear:
    """The packed module computing what `q` simulates (raises ValueError if `conversion_blocker(q)`)."""
    reason = conversion_blocker(q)
    if reason is not None:
        raise ValueError(f"cannot pack {q.name or 'layer'}: {reason}")
    assert q.codes is not None and q.w_qparams is not None
    return packed_module(q.codes, q.w_qparams, q.bias, q.a_bits, q.a_symmetric, q.a_granularity, q.a_dynamic,
                         q.act_qparams, name=q.name, backend=backend)


def packed_module(codes: Tensor, qp: QParams, bias: Tensor | None, a_bits: int, a_symmetric: bool,
                  a_granularity: str, a_dynamic: bool, act_qparams: QParams | None, *, name: str = "",
                  backend: str = "auto") -> PackedLinear:
    """The packed module of `QLinear`-style integer codes ``[out, in]`` and their QParams: what `pack_qlinear`
    builds from a live layer and what a checkpoint loads straight from its stored codes (no float weight)."""
    packed = pack_codes(codes, qp.bits, qp.symmetric)
    zero = None if qp.symmetric else (qp.zero_point - code_centre(qp.bits, False))
    group = qp.group_size
    if a_bits >= FLOAT_BITS:
        return WeightOnlyLinear(packed, qp.scale, zero, bias, group_size=group, name=name, device=codes.device)
    static = act_qparams if a_granularity != "token" and not a_dynamic else None
    return IntLinear(packed, qp.scale, zero, bias, group_size=group, a_bits=a_bits, a_symmetric=a_symmetric,
                     a_per_token=a_granularity == "token", a_scale=None if static is None else static.scale,
                     a_zero=None if static is None else static.zero_point, name=name, backend=backend)


def convert_to_packed(model: nn.Module, *, backend: str = "auto") -> ConversionReport:
    """Swap every convertible `QLinear` in `model` (in place) for its packed module; see the module docstring."""
    report = ConversionReport()
    built: dict[int, nn.Module] = {}
    # layers already packed (a checkpoint loaded straight into packed modules) count as converted, so the report
    # of such a model equals that of the same checkpoint loaded fake-quant and converted here
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, PackedLinear) and name:
            if id(m) not in built:
                built[id(m)] = m
                report.kinds[type(m).__name__] = report.kinds.get(type(m).__name__, 0) + 1
            report.converted.append(name)
            parent_name = name.rpartition(".")[0]
            if parent_name and _is_quantized(model.get_submodule(parent_name)):
                report.wrappers[parent_name] = type(model.get_submodule(parent_name)).__name__
    targets = [(name, m) for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, QLinear)]
    for name, q in targets:
        reason = "the model itself is a QLinear (wrap it in a container)" if name == "" else conversion_blocker(q)
        if reason is not None:
            report.skipped[name] = reason
            continue
        if id(q) not in built:
            built[id(q)] = pack_qlinear(q, backend=backend)
            kind = type(built[id(q)]).__name__
            report.kinds[kind] = report.kinds.get(kind, 0) + 1
            note = getattr(built[id(q)], "kernel_note", None)
            if note:
                report.kernel_notes[note] = report.kernel_notes.get(note, 0) + 1
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        set_submodule(model, name, built[id(q)])  # carries an online Hadamard over (run as the FWHT)
        report.converted.append(name)
        if parent_name and _is_quantized(parent):
            report.wrappers[parent_name] = type(parent).__name__
    # other quantized module types (a `weight_storage_bytes` method marks them) that hold no QLinear
    for name, m in model.named_modules():
        if not _is_quantized(m) or isinstance(m, PackedLinear | QLinear) or name in report.wrappers:
            continue
        if getattr(m, "runs_packed", False):  # a packed format of its own (quantized embeddings, LM head)
            continue
        if not any(isinstance(c, PackedLinear | QLinear) for c in m.modules()):
            report.skipped[name] = f"{type(m).__name__} has no packed kernel here (runs as its method built it)"
    report.kernel = prepare_kernels(model, backend)
    return report


def prepare_kernels(model: nn.Module, backend: str) -> str | None:
    """Build or load the fused CPU kernel, or compile the `torch.compile` layers, now (see the module
    docstring); returns one line saying what was done and how long it took (None when nothing needed it).
    A `cpp` backend the machine cannot run is refused here, before any evaluation."""
    from qvlm_harness.errors import HarnessError
    from qvlm_harness.kernels import cpu

    layers = [m for m in model.modules() if isinstance(m, IntLinear)]
    if not layers:
        return None
    t0 = time.perf_counter()
    if backend == "compile":
        with torch.no_grad():
            for m in layers:  # two row counts: the compiled graph is dynamic in the number of tokens
                for rows in (2, 1):
                    m(torch.zeros(rows, m.in_features, device=m.qweight.device))
        return (f"torch.compile of {len(layers)} integer layer(s) done in {time.perf_counter() - t0:.1f}s at "
                "conversion, outside timed regions")
    if backend not in ("auto", "cpp") or not any(m.qweight.device.type == "cpu" for m in layers):
        return None
    was_built = cpu.is_built()
    usable = cpu.auto_uses_cpp() if backend == "auto" else cpu.available()
    if backend == "cpp" and not usable:
        raise HarnessError(f"the fused CPU kernel cannot run here ({cpu.unavailable_reason()}); use the 'torch' "
                           "kernel backend")
    if not usable:
        why = cpu.unavailable_reason() or "compiled without AVX512-VNNI"
        return f"fused CPU kernel off ({why}): integer layers use torch._int_mm"
    return (f"fused CPU kernel {'loaded' if was_built else 'built'} in {time.perf_counter() - t0:.1f}s at "
            "conversion, outside timed regions")


def _is_quantized(m: nn.Module) -> bool:
    return callable(getattr(m, "weight_storage_bytes", None))


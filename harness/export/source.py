"""What an export reads: a model (a quantized checkpoint or a float Llava folder) and, per linear layer, the
integer grid the harness stored for it.

Exports never re-quantize: every quantized linear is written from its stored codes, scales and zero points
(`IntegerGrid`), so the exported model computes what the harness evaluated. A module whose arithmetic is not a
plain integer grid on a linear layer (a low-rank side path, a NormalFloat codebook, a `QLinear` subclass with its
own forward, a module type that needs wiring on load such as an online transform) is listed in
`ExportSource.blocked` with the reason, and each format refuses the export when such a module lies in what it
writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from qvlm_harness.config import FLOAT_BITS
from qvlm_harness.errors import HarnessError
from qvlm_harness.quant.codec import codec_of
from qvlm_harness.quant.qlinear import QLinear
from qvlm_harness.quant.quantizer import QParams, dequantize

# Module types of the shared quantization package with arithmetic beyond an integer grid (codec name -> what).
NOT_A_GRID = {
    "LoRCLinear": "a low-rank side path beside its quantized weight",
    "NFLinear": "a NormalFloat codebook, not a uniform integer grid",
}


@dataclass(frozen=True)
class IntegerGrid:
    """A linear layer's weight as stored: ``weight = (codes - zero) * scale`` per group of input channels.

    `scale` float32 and `zero` int32 are ``[out or 1, groups]`` (per channel: one group, per tensor: ``[1, 1]``);
    `group_size` is None unless the scales are per group."""

    codes: Tensor  # [out, in]: int8 (symmetric) or uint8 (asymmetric)
    scale: Tensor
    zero: Tensor
    bits: int
    symmetric: bool
    group_size: int | None

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.codes.shape[1])

    @property
    def strategy(self) -> str:
        """'group', 'channel' or 'tensor': how many scales the weight has."""
        if self.group_size is not None:
            return "group"
        return "tensor" if self.scale.numel() == 1 and self.out_features > 1 else "channel"

    def row_scales(self) -> Tensor:
        """float32 ``[out, groups]``: the scales broadcast to every output row."""
        return self.scale.float().expand(self.out_features, self.scale.shape[1])

    def row_zeros(self) -> Tensor:
        """int32 ``[out, groups]``: the zero points broadcast to every output row."""
        return self.zero.to(torch.int32).expand(self.out_features, self.zero.shape[1])

    def dequantized(self) -> Tensor:
        """float32 ``[out, in]``: the weight the harness computes with (`quantizer.dequantize` of the codes)."""
        qp = QParams(self.row_scales(), self.row_zeros(), self.bits, self.symmetric, self.group_size)
        if self.group_size is None:
            qp = QParams(self.row_scales()[:, :1], self.row_zeros()[:, :1], self.bits, self.symmetric)
        return dequantize(self.codes, qp)


@dataclass(frozen=True)
class ActivationScheme:
    """How a layer quantizes its input (`QLinear`'s activation quantizer); `scale`/`zero` for a static range."""

    bits: int
    symmetric: bool
    granularity: str  # "token" or "tensor"
    dynamic: bool
    scale: Tensor | None = None
    zero: Tensor | None = None


@dataclass(frozen=True)
class LayerFacts:
    """What decides whether a format can hold a linear layer, known from the manifest before any tensor loads."""

    w_bits: int  # 16: float weights
    w_symmetric: bool
    group_size: int | None
    in_features: int
    a_bits: int  # 16: float input
    a_granularity: str


@dataclass
class ExportLinear:
    """One linear layer of the model as an exporter needs it."""

    name: str
    weight: Tensor  # the float weight the model computes with (dequantized for a quantized layer)
    bias: Tensor | None  # in the model's dtype
    grid: IntegerGrid | None  # None: the weight is float
    activations: ActivationScheme | None  # None: the input stays float

    @property
    def facts(self) -> LayerFacts:
        g, a = self.grid, self.activations
        return LayerFacts(FLOAT_BITS if g is None else g.bits, True if g is None else g.symmetric,
                          None if g is None else g.group_size, int(self.weight.shape[1]),
                          FLOAT_BITS if a is None else a.bits, "token" if a is None else a.granularity)


@dataclass
class ExportSource:
    """A loaded model ready to export: its linears (`linears`, by module path), the modules no format can take
    (`blocked`: path -> reason) and where it came from."""

    model: nn.Module
    processor: object
    folder: Path
    manifest: dict | None
    linears: dict[str, ExportLinear] = field(default_factory=dict)
    blocked: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return source_label(self.folder, self.manifest)

    def blocked_under(self, prefixes: tuple[str, ...]) -> dict[str, str]:
        """The blocked modules inside any of the module paths `prefixes` (all of them for an empty tuple)."""
        return {n: r for n, r in self.blocked.items() if not prefixes or n.startswith(prefixes)}

    def state_dict(self) -> dict[str, Tensor]:
        """The model's state without the quantized layers' own buffers (exporters write those their own way)."""
        quantized = tuple(f"{n}." for n in self.linears if self.linears[n].grid is not None
                          or self.linears[n].activations is not None)
        quantized += tuple(f"{n}." for n in self.blocked)
        return {k: v for k, v in self.model.state_dict().items() if not k.startswith(quantized)}


def source_label(folder: Path, manifest: dict | None) -> str:
    """How messages name the exported model: 'rtn w4a16g32 checkpoint NAME' or 'float model NAME'."""
    if manifest is None:
        return f"float model {folder.name}"
    return f"{manifest['method']} {manifest['spec']['tag']} checkpoint {folder.name}"


def grid_of(q: QLinear) -> IntegerGrid | None:
    """The integer grid of a `QLinear`'s weight (None for a float weight)."""
    qp = q.w_qparams
    if q.codes is None or qp is None:
        return None
    return IntegerGrid(q.codes.detach().cpu(), qp.scale.detach().float().cpu(),
                       qp.zero_point.detach().to(torch.int32).cpu(), int(q.w_bits), bool(q.w_symmetric),
                       qp.group_size)


def activations_of(q: QLinear) -> ActivationScheme | None:
    if q.a_bits >= FLOAT_BITS:
        return None
    static = q.act_qparams if (q.a_granularity != "token" and not q.a_dynamic) else None
    return ActivationScheme(int(q.a_bits), bool(q.a_symmetric), q.a_granularity, bool(q.a_dynamic),
                            None if static is None else static.scale.detach().float().cpu(),
                            None if static is None else static.zero_point.detach().to(torch.int32).cpu())


def blocked_reason(module: nn.Module | type) -> str:
    """Why a quantized module (or module type) other than a plain `QLinear` cannot be written as an integer-grid
    linear."""
    cls = module if isinstance(module, type) else type(module)
    codec = codec_of(cls)
    kind = cls.__name__
    if codec is not None and codec.name in NOT_A_GRID:
        return f"{kind} ({NOT_A_GRID[codec.name]})"
    if issubclass(cls, QLinear):
        return f"{kind} (a QLinear with arithmetic of its own: it overrides the forward)"
    if codec is not None and codec.on_load is not None:
        return f"{kind} (needs model-level wiring when loaded, e.g. an online transform)"
    if codec is not None and codec.children:
        return f"{kind} (a wrapper with arithmetic of its own around {', '.join(codec.children)})"
    return f"{kind} (not an integer-grid linear layer)"


def _bias(m: nn.Module) -> Tensor | None:
    return None if m.bias is None else m.bias.detach().cpu()


def describe_model(model: nn.Module, processor, folder: Path, manifest: dict | None) -> ExportSource:
    """Sort every linear-like module of `model` into exportable linears and blocked modules."""
    source = ExportSource(model, processor, folder, manifest)
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in (*source.blocked, *source.linears)):
            continue
        if type(m) is QLinear:
            if m.calibrating:
                raise HarnessError(f"cannot export {name}: it is still calibrating")
            source.linears[name] = ExportLinear(name, m.weight.detach().float().cpu(), _bias(m), grid_of(m),
                                                activations_of(m))
        elif codec_of(m) is not None:
            source.blocked[name] = blocked_reason(m)
        elif isinstance(m, nn.Linear):
            source.linears[name] = ExportLinear(name, m.weight.detach().float().cpu(), _bias(m), None, None)
    return source


def manifest_facts(manifest: dict) -> tuple[dict[str, LayerFacts], dict[str, str]]:
    """(facts of every stored QLinear, blocked module -> reason) from a verified manifest alone, so an export a
    format must refuse is refused before the model loads."""
    from qvlm_harness.manifest import codecs_for, method_class

    codecs = codecs_for(method_class(manifest["method"], "checkpoint"))
    facts: dict[str, LayerFacts] = {}
    blocked: dict[str, str] = {}
    for name, entry in manifest["modules"].items():
        codec = codecs.get(entry["type"])
        if codec is None or codec.cls is not QLinear or entry["children"]:
            blocked[name] = blocked_reason(codec.cls) if codec is not None else entry["type"]
            continue
        meta, spec = entry["meta"], entry["meta"]["spec"]
        facts[name] = LayerFacts(int(spec["w_bits"]), bool(spec["w_symmetric"]), meta.get("group"), int(meta["in"]),
                                 int(spec["a_bits"]), str(spec["a_granularity"]))
    return facts, blocked


def load_source(path: str | Path) -> ExportSource:
    """The model at `path` (a quantized checkpoint folder, verified as `harness eval` verifies it, or a float Llava
    folder) on the CPU in float32, sorted for export."""
    from qvlm_harness.checkpoint import load_float, load_quantized, read_manifest

    manifest = read_manifest(path)
    if manifest is not None:
        adapter, manifest = load_quantized(path)
    else:
        adapter = load_float(path)
    return describe_model(adapter.model, adapter.processor, Path(str(path)).expanduser(), manifest)

"""Quantized token embedding and LM head: the 49152 x 576 matrix that stays float when only linears are quantized.

Formats (`EMBEDDING_FORMATS`, the ``--quantize-embeddings`` option): ``int8`` (symmetric, one scale per row) and
``int4g32`` / ``int4g64`` / ``int4g128`` (symmetric 4-bit codes, one scale per group of that many hidden
channels, two codes per byte in the `qvlm_harness.kernels.packing` nibble layout). Codes and float32 scales are
computed by the shared weight quantizer (`quantize_weight`, round-to-nearest on the max-abs range), so the
dequantized matrix is exactly ``scale * code``.

* `PackedEmbedding`: the lookup gathers only the rows of the given token ids (codes and scales) and
  dequantizes those: a decode step reads H/2 (int4) or H (int8) bytes per token, never the whole table.
* `PackedHead`: the LM head as a weight-only GEMM on the same codes: ``aten._weight_int8pack_mm`` (int8 codes,
  per-row scales; float32 compute) or the CPU int4pack kernel ``aten._weight_int4pack_mm_for_cpu`` (bfloat16
  compute, as `WeightOnlyLinear`), whose tiled layout is made from the codes when the head is built.

Tied weights (SmolLM2 ties its head to the embedding): the head holds the embedding's very code and scale
tensors, so a checkpoint stores them once (a tensor alias) and, for int8, memory holds them once; int4 adds the
kernel's tiled copy of the codes next to the gather layout (the gather cannot read the tiled layout), which
`weight_storage_bytes` counts. An untied head is quantized from its own weight.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qvlm_harness.errors import HarnessError
from qvlm_harness.kernels.packing import pack_codes, padded_width, unpack_int4
from qvlm_harness.quant.codec import ModuleCodec, StoredModule, attach_codec, dtype_name

EMBEDDING_FORMATS = ("none", "int8", "int4g32", "int4g64", "int4g128")
_FORMAT_RE = re.compile(r"^int(?P<bits>[48])(?:g(?P<group>\d+))?$")


def parse_embedding_format(text: str) -> tuple[int, int | None] | None:
    """(bits, group size or None for per row) of a ``--quantize-embeddings`` value; None for ``none``."""
    if text == "none":
        return None
    m = _FORMAT_RE.match(text)
    if text not in EMBEDDING_FORMATS or m is None:
        raise HarnessError(f"--quantize-embeddings takes one of {', '.join(EMBEDDING_FORMATS)}, got {text!r}")
    return int(m["bits"]), int(m["group"]) if m["group"] else None


def embedding_format_arg(text: str) -> str:
    """argparse type of ``--quantize-embeddings``: the format, or a one-line HarnessError (exit 2)."""
    parse_embedding_format(text)
    return text


def _dequantize_rows(codes: Tensor, scale: Tensor, bits: int, width: int) -> Tensor:
    """float32 ``[n, width]`` from n rows of stored codes and their ``[n, G]`` scales."""
    v = codes if bits == 8 else unpack_int4(codes, width)
    groups = scale.shape[-1]
    return (v.float().reshape(-1, groups, width // groups) * scale.unsqueeze(-1)).reshape(-1, width)


class _KeepScales(nn.Module):
    """Keeps the float32 `scale` buffer float32 through ``model.to(dtype)`` (only its device follows): the scales
    are quantization metadata, as in `QLinear`. `runs_packed`: already in its packed form, so `convert_to_packed`
    neither converts it nor lists it as left simulated."""

    scale: Tensor
    runs_packed = True

    def _apply(self, fn, recurse: bool = True):
        old = self.scale
        out = super()._apply(fn, recurse)
        if self.scale.dtype != old.dtype:
            self.scale = old.to(self.scale.device)
        return out


class PackedEmbedding(_KeepScales):
    """Token embedding over packed codes; see the module docstring."""

    codes: Tensor

    def __init__(self, codes: Tensor, scale: Tensor, *, bits: int, group_size: int | None, num_embeddings: int,
                 embedding_dim: int, padding_idx: int | None = None, dtype: torch.dtype = torch.float32):
        """`codes`: the stored form (int8 ``[V, H]`` or uint8 nibbles); `scale`: float32 ``[V, G]``."""
        super().__init__()
        self.bits, self.group_size = bits, group_size
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.out_dtype = padding_idx, dtype
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale.float().contiguous())

    @classmethod
    def quantize(cls, emb: nn.Embedding, bits: int, group_size: int | None) -> PackedEmbedding:
        codes, scale = quantize_matrix(emb.weight, bits, group_size)
        return cls(codes, scale, bits=bits, group_size=group_size, num_embeddings=emb.num_embeddings,
                   embedding_dim=emb.embedding_dim, padding_idx=emb.padding_idx, dtype=emb.weight.dtype)

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        rows = _dequantize_rows(self.codes.index_select(0, flat), self.scale.index_select(0, flat), self.bits,
                                self.embedding_dim)
        return rows.reshape(*ids.shape, self.embedding_dim).to(self.out_dtype)

    def dequantized_weight(self) -> Tensor:
        """The whole float32 table ``scale * code`` (for references and tests; the forward never builds it)."""
        return _dequantize_rows(self.codes, self.scale, self.bits, self.embedding_dim)

    def weight_storage_bytes(self, packed: bool) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scale.numel() * self.scale.element_size()

    def extra_repr(self) -> str:
        gran = f"group{self.group_size}" if self.group_size else "row"
        return f"{self.num_embeddings}, {self.embedding_dim}, int{self.bits} sym per-{gran}, gather-dequant, packed"


def quantize_matrix(weight: Tensor, bits: int, group_size: int | None) -> tuple[Tensor, Tensor]:
    """(stored codes, float32 scales ``[rows, G]``) of a ``[rows, width]`` matrix: symmetric round-to-nearest
    through the shared quantizer, 4-bit codes packed two per byte."""
    from qvlm_harness.quant.quantizer import quantize_weight

    w = weight.detach().float()
    if group_size is not None and w.shape[1] % group_size:
        raise HarnessError(f"--quantize-embeddings int{bits}g{group_size}: the embedding width {w.shape[1]} is not a "
                           f"multiple of {group_size}; use a group size that divides it (or int8)")
    codes, qp = quantize_weight(w, bits, True, group_size)
    scale = qp.scale.float().expand(w.shape[0], qp.scale.shape[1]).contiguous()
    return pack_codes(codes, bits, True).data, scale


def int4pack_tiles(codes: Tensor, scale: Tensor, width: int, group: int, chunk: int = 4096
                   ) -> tuple[Tensor, Tensor, int, int]:
    """(tiled codes, bf16 scales-and-zeros, padded rows, padded width) for ``aten._weight_int4pack_mm_for_cpu``
    from symmetric nibble-packed codes, the layout `WeightOnlyLinear` builds. Converted `chunk` rows at a time
    (the tiled layout is row-blocked, so chunks of a multiple of 64 rows concatenate to the whole): a 49152-row
    head never makes its int32 nibble matrix (4 bytes per weight) at once."""
    rows = codes.shape[0]
    n_pad, k_pad = -(-rows // 16) * 16, -(-width // group) * group
    parts = []
    for start in range(0, n_pad, chunk):
        stop = min(start + chunk, n_pad)
        nib = torch.full((stop - start, k_pad), 8, dtype=torch.int32)
        have = max(0, min(stop, rows) - start)
        if have:
            nib[:have, :width] = unpack_int4(codes[start:start + have], width).to(torch.int32) + 8
        parts.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(nib, 1))
    groups = k_pad // group
    sz = torch.zeros(groups, n_pad, 2, dtype=torch.bfloat16)
    sz[:, :rows, 0] = scale.expand(rows, groups).t().to(torch.bfloat16)
    return torch.cat(parts), sz, n_pad, k_pad


class PackedHead(_KeepScales):
    """LM head as a weight-only GEMM over packed codes (tied: the embedding's own code and scale tensors)."""

    codes: Tensor
    bias: Tensor | None

    def __init__(self, codes: Tensor, scale: Tensor, *, bits: int, group_size: int | None, in_features: int,
                 out_features: int, bias: Tensor | None = None, tied: bool = False):
        super().__init__()
        self.bits, self.group_size, self.tied = bits, group_size, tied
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale if scale.dtype == torch.float32 else scale.float())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.kernel = "int8pack" if bits == 8 else "dequant"
        self.register_buffer("qweight", None, persistent=False)
        self.register_buffer("scales_and_zeros", None, persistent=False)
        if bits == 4 and codes.device.type == "cpu" and group_size in (32, 64, 128, 256):
            self.kernel = "int4pack"
            self.qweight, self.scales_and_zeros, self.n_pad, self.k_pad = int4pack_tiles(
                codes, self.scale, in_features, group_size)

    @classmethod
    def over(cls, emb: PackedEmbedding) -> PackedHead:
        """The head tied to `emb`: its code and scale tensors, not a copy."""
        return cls(emb.codes, emb.scale, bits=emb.bits, group_size=emb.group_size, in_features=emb.embedding_dim,
                   out_features=emb.num_embeddings, tied=True)

    @classmethod
    def quantize(cls, head: nn.Linear, bits: int, group_size: int | None) -> PackedHead:
        codes, scale = quantize_matrix(head.weight, bits, group_size)
        return cls(codes, scale, bits=bits, group_size=group_size, in_features=head.in_features,
                   out_features=head.out_features, bias=head.bias)

    def dequantized_weight(self) -> Tensor:
        return _dequantize_rows(self.codes, self.scale, self.bits, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.kernel == "int8pack":
            y = torch.ops.aten._weight_int8pack_mm(x2.float().contiguous(), self.codes, self.scale.view(-1))
        elif self.kernel == "int4pack":
            xb = x2.to(torch.bfloat16)
            if self.k_pad != self.in_features:
                xb = F.pad(xb, (0, self.k_pad - self.in_features))
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.qweight, self.group_size, self.scales_and_zeros)
            y = y[:, : self.out_features].float()
        else:  # another device or group size: dequantize per call (correct, not fast)
            y = F.linear(x2.float(), self.dequantized_weight())
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def weight_storage_bytes(self, packed: bool) -> int:
        """Bytes this head adds: the kernel's tiled codes, plus its own codes and scales unless they are the tied
        embedding's (counted there)."""
        own = [] if self.tied else [self.codes, self.scale]
        return sum(t.numel() * t.element_size() for t in own + [self.qweight, self.scales_and_zeros]
                   if t is not None)

    def extra_repr(self) -> str:
        gran = f"group{self.group_size}" if self.group_size else "row"
        return (f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits} sym per-{gran}"
                f"{', tied to the embedding' if self.tied else ''}, kernel={self.kernel}, packed")


def check_embeddings(model: nn.Module, fmt: str) -> None:
    """Refuse, in one line and before any quantization work, a format the model's embedding cannot take: an
    embedding or head that is not a plain lookup / linear, or a group size that does not divide its width."""
    parsed = parse_embedding_format(fmt)
    if parsed is None:
        return
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(emb) is not nn.Embedding:
        raise HarnessError(f"--quantize-embeddings: the input embedding is a {type(emb).__name__}, not a plain "
                           "nn.Embedding (its forward may do more than a lookup); use --quantize-embeddings none")
    if head is not None and type(head) is not nn.Linear:
        raise HarnessError(f"--quantize-embeddings: the LM head is a {type(head).__name__}, not an nn.Linear; use "
                           "--quantize-embeddings none")
    bits, group = parsed
    if group is not None and emb.embedding_dim % group:
        raise HarnessError(f"--quantize-embeddings {fmt}: the embedding width {emb.embedding_dim} is not a multiple "
                           f"of {group}; use a group size that divides it, or int8")


def quantize_embeddings(model: nn.Module, fmt: str) -> dict | None:
    """Replace `model`'s token embedding and LM head (in place) with their quantized packed modules in format
    `fmt`; a tied pair stays tied (one copy of the codes). Returns what was done (for the result's report), or
    None for ``none``. Refuses, in one line, an embedding or head of another type (e.g. Gemma's scaled
    embedding, whose forward multiplies by a constant this module would drop)."""
    from qvlm_harness.quant.apply import set_submodule

    parsed = parse_embedding_format(fmt)
    if parsed is None:
        return None
    check_embeddings(model, fmt)
    bits, group = parsed
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    tied = head is not None and head.weight is emb.weight
    new_emb = PackedEmbedding.quantize(emb, bits, group)
    set_submodule(model, names[id(emb)], new_emb)
    out = {"format": fmt, "embedding": names[id(emb)], "head": None, "tied": tied}
    if head is not None:
        new_head = PackedHead.over(new_emb) if tied else PackedHead.quantize(head, bits, group)
        set_submodule(model, names[id(head)], new_head)
        out["head"] = names[id(head)]
        out["head_kernel"] = new_head.kernel
    return out


def embedding_format(model: nn.Module) -> str:
    """The ``--quantize-embeddings`` format `model`'s embedding is in ("none" when it is float)."""
    emb = model.get_input_embeddings()
    if not isinstance(emb, PackedEmbedding):
        return "none"
    return f"int{emb.bits}" + (f"g{emb.group_size}" if emb.group_size else "")


# -- checkpoint codecs -------------------------------------------------------------------------------------------------
# Stored: the packed codes and float32 scales as they are held (a tied head's are the embedding's tensors, so the
# checkpoint stores them once as an alias); the int4 kernel's tiled layout is rebuilt from the codes on load.
def _fmt_meta(m: PackedEmbedding | PackedHead) -> dict:
    return {"bits": m.bits, "group": m.group_size}


def _check(s: StoredModule, rows: int, width: int) -> tuple[int, int | None]:
    bits = s.ints("bits")[0]
    group = s.meta_field("group")
    if bits not in (4, 8) or (group is not None and (not isinstance(group, int) or group <= 0 or width % group)):
        s.fail(f"format int{bits}g{group} does not fit width {width}")
    groups = 1 if group is None else width // group
    s.shaped("codes", (rows, width if bits == 8 else padded_width(width) // 2))
    s.shaped("scale", (rows, groups))
    return bits, group


def _build_embedding(s: StoredModule) -> PackedEmbedding:
    s.need({"codes", "scale"})
    rows, width = s.ints("num_embeddings", "embedding_dim")
    bits, group = _check(s, rows, width)
    return PackedEmbedding(s.tensors["codes"], s.tensors["scale"], bits=bits, group_size=group, num_embeddings=rows,
                           embedding_dim=width, padding_idx=s.meta.get("padding_idx"), dtype=s.dtype())


def _build_head(s: StoredModule) -> PackedHead:
    s.need({"codes", "scale"}, {"bias"})
    width, rows = s.ints("in", "out")
    bits, group = _check(s, rows, width)
    return PackedHead(s.tensors["codes"], s.tensors["scale"], bits=bits, group_size=group, in_features=width,
                      out_features=rows, bias=s.tensors.get("bias"), tied=bool(s.meta.get("tied")))


attach_codec(ModuleCodec(
    "PackedEmbedding", PackedEmbedding,
    lambda m: _fmt_meta(m) | {"num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim,
                              "padding_idx": m.padding_idx, "dtype": dtype_name(m.out_dtype)},
    _build_embedding, facts=lambda meta: None, tensors=lambda m: {"codes": m.codes, "scale": m.scale}))
attach_codec(ModuleCodec(
    "PackedHead", PackedHead, lambda m: _fmt_meta(m) | {"in": m.in_features, "out": m.out_features, "tied": m.tied},
    _build_head, facts=lambda meta: None,
    tensors=lambda m: {"codes": m.codes, "scale": m.scale} | ({} if m.bias is None else {"bias": m.bias})))


def engine_codecs() -> dict[str, ModuleCodec]:
    """Codecs of the module types the engine itself installs whatever the method (quantized embeddings)."""
    return {c.name: c for c in (PackedEmbedding.CODEC, PackedHead.CODEC)}  # type: ignore[attr-defined]


__all__ = ["EMBEDDING_FORMATS", "PackedEmbedding", "PackedHead", "check_embeddings", "embedding_format",
           "embedding_format_arg", "engine_codecs",
           "parse_embedding_format", "quantize_embeddings"]

"""compressed-tensors export: the whole Llava as a Hugging Face folder in the layout llm-compressor saves.

Every quantized linear is written from the codes and scales the harness stored, in one of compressed-tensors'
integer formats, chosen per layer as llm-compressor does:

* ``pack-quantized`` for weight-only layers (WxA16): ``weight_packed`` (int32, a dense bit stream per row: code
  ``i`` in stream bits ``[i * bits, (i + 1) * bits)``, stored unsigned with ``2^(bits-1)`` added),
  ``weight_shape``, ``weight_scale`` and, for an asymmetric grid, ``weight_zero_point`` packed the same way along
  the output dimension;
* ``int-quantized`` for layers whose input is quantized too (W8A8, W4A8...): ``weight`` as int8 codes,
  ``weight_scale`` (+ ``weight_zero_point``), and for a static activation range ``input_scale`` (+
  ``input_zero_point``).

Codes are signed the compressed-tensors way: a symmetric grid keeps its codes, an asymmetric one (codes and zero
point ``0..2^b - 1``) is shifted by ``-2^(b-1)`` on both, so ``code - zero`` and the dequantized weight are
unchanged. Scales stay float32, so decompression gives the harness's weights exactly.

``config.json`` gets the ``quantization_config`` (``quant_method: compressed-tensors``, status ``compressed``): one
config group per distinct scheme, targeting its layers by name (a regular expression matching both the model's
module path and the checkpoint key layout, which differ for Llava), and ``ignore`` listing the linears left in
float. The tensors are keyed as `save_pretrained` keys them (transformers' own reverse key mapping).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from qvlm_harness.config import FLOAT_BITS
from qvlm_harness.errors import HarnessError
from qvlm_harness.export.source import ActivationScheme, ExportLinear, ExportSource, IntegerGrid, LayerFacts

PACKED = "pack-quantized"
INT = "int-quantized"
TENSORS = "model.safetensors"


@dataclass
class CompressedExport:
    """What was written, for the command's summary and export.json."""

    path: Path
    quantization_config: dict
    types: dict[str, int] = field(default_factory=dict)  # format (or "float") -> linears
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"format": "compressed-tensors", "file": self.path.name, "types": self.types, "notes": self.notes,
                "quantization_config": self.quantization_config}


# -- codes ------------------------------------------------------------------------------------------------------------
def centre(bits: int, symmetric: bool) -> int:
    """What compressed-tensors' signed range subtracts from a harness code (0 for symmetric grids)."""
    return 0 if symmetric else 1 << (bits - 1)


def signed_codes(g: IntegerGrid) -> Tensor:
    """int8 ``[out, in]`` codes in compressed-tensors' signed range ``[-2^(b-1), 2^(b-1) - 1]``."""
    return (g.codes.to(torch.int16) - centre(g.bits, g.symmetric)).to(torch.int8)


def signed_zero(g: IntegerGrid) -> Tensor:
    """int8 ``[out, groups]`` zero points in the same signed range."""
    return (g.row_zeros().to(torch.int16) - centre(g.bits, g.symmetric)).to(torch.int8)


def pack_int32(values: Tensor, bits: int, dim: int = 1) -> Tensor:
    """int32 words holding signed `bits`-bit values along `dim` as one dense little-endian bit stream (value ``i``
    in stream bits ``[i * bits, (i + 1) * bits)``, word ``w`` holding bits ``[32 w, 32 w + 32)``), each value stored
    unsigned with ``2^(bits-1)`` added; ``ceil(n * bits / 32)`` words for ``n`` values."""
    v = (values.to(torch.int64) + (1 << (bits - 1))).numpy().astype(np.uint8)
    if dim == 0:
        v = v.T
    rows, cols = v.shape
    stream = ((v[:, :, None] >> np.arange(bits, dtype=np.uint8)) & 1).reshape(rows, cols * bits)
    words = -(-cols * bits // 32)
    stream = np.pad(stream, ((0, 0), (0, words * 32 - cols * bits))).reshape(rows, words, 32).astype(np.uint64)
    packed = (stream << np.arange(32, dtype=np.uint64)).sum(axis=-1).astype(np.uint32)
    packed = np.ascontiguousarray(packed.T if dim == 0 else packed).view(np.int32)
    return torch.from_numpy(packed.copy())


# -- schemes ----------------------------------------------------------------------------------------------------------
def weight_args(g: IntegerGrid) -> dict:
    return {"num_bits": g.bits, "type": "int", "symmetric": g.symmetric, "strategy": g.strategy,
            "group_size": g.group_size, "dynamic": False}


def input_args(a: ActivationScheme) -> dict:
    return {"num_bits": a.bits, "type": "int", "symmetric": a.symmetric, "strategy": a.granularity,
            "dynamic": a.dynamic}


def scheme_of(lin: ExportLinear) -> tuple[str, dict, dict | None]:
    """(format, weights args, input-activation args) of one quantized linear."""
    assert lin.grid is not None
    act = None if lin.activations is None else input_args(lin.activations)
    return (PACKED if act is None else INT), weight_args(lin.grid), act


def compressed_tensors_of(lin: ExportLinear, fmt: str, dtype: torch.dtype) -> dict[str, Tensor]:
    """The tensors of one quantized linear, keyed relative to the module."""
    g = lin.grid
    assert g is not None
    per_tensor = g.strategy == "tensor"  # compressed-tensors keeps one scale (and zero point) of shape [1]
    scale = g.scale.reshape(1) if per_tensor else g.row_scales()
    out: dict[str, Tensor] = {"weight_scale": scale.contiguous().clone()}
    if fmt == PACKED:
        out["weight_packed"] = pack_int32(signed_codes(g), g.bits)
        out["weight_shape"] = torch.tensor([g.out_features, g.in_features], dtype=torch.int64)
        if not g.symmetric:
            out["weight_zero_point"] = pack_int32(signed_zero(g), g.bits, dim=0)
    else:
        out["weight"] = signed_codes(g).contiguous()
        if not g.symmetric:
            zero = signed_zero(g)
            out["weight_zero_point"] = (zero[:1, 0] if per_tensor else zero).contiguous()
    a = lin.activations
    if a is not None and a.scale is not None:
        out["input_scale"] = a.scale.reshape(1).float().clone()
        if not a.symmetric:
            zero = (a.zero.to(torch.int16) - centre(a.bits, False)).to(torch.int8)
            out["input_zero_point"] = zero.reshape(1).clone()
    if lin.bias is not None:
        out["bias"] = lin.bias.to(dtype).contiguous().clone()
    return out


def file_names(model, names: list[str]) -> dict[str, str]:
    """Module path -> the prefix `save_pretrained` gives its tensors (transformers' reverse key mapping)."""
    from transformers.core_model_loading import revert_weight_conversion

    out = {}
    for n in names:
        (key,) = revert_weight_conversion(model, {f"{n}.weight": torch.zeros(1)}).keys()
        out[n] = key.removesuffix(".weight")
    return out


def name_pattern(runtime: str, stored: str) -> str:
    """A compressed-tensors target matching the module under both names (model path, checkpoint key)."""
    alternatives = sorted({re.escape(runtime), re.escape(stored)})
    return "re:^(?:" + "|".join(alternatives) + ")$" if len(alternatives) > 1 else f"re:^{alternatives[0]}$"


def problems(facts: dict[str, LayerFacts], blocked: dict[str, str]) -> list[str]:
    """Every reason the model cannot be written, one per module (from the loaded model or the manifest)."""
    found = [f"{n} is {r}" for n, r in blocked.items()]
    found += [f"{n}: only its input is quantized (float weights); export the float model instead"
              for n, f in facts.items() if f.w_bits >= FLOAT_BITS and f.a_bits < FLOAT_BITS]
    return found


def refuse(label: str, found: list[str]) -> None:
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise HarnessError(f"cannot export {label} to compressed-tensors: {found[0]}{more}; the format holds plain "
                           "integer-grid linears (any bits, symmetric or not, per channel or group)")


def quantization_config(groups: dict[tuple, list[str]], ignore: list[str], names: dict[str, str]) -> dict:
    """The ``quantization_config`` of config.json (llm-compressor's layout)."""
    config_groups = {}
    formats = set()
    for i, ((fmt, weights, inputs), layers) in enumerate(groups.items()):
        formats.add(fmt)
        config_groups[f"group_{i}"] = {
            "targets": [name_pattern(n, names[n]) for n in layers], "weights": json.loads(weights),
            "input_activations": None if inputs is None else json.loads(inputs), "output_activations": None,
            "format": fmt}
    try:
        version = metadata.version("compressed-tensors")
    except metadata.PackageNotFoundError:
        version = None
    qc = {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
          "quantization_status": "compressed", "config_groups": config_groups,
          "ignore": [name_pattern(n, names[n]) for n in ignore], "kv_cache_scheme": None,
          "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {}}
    if version:
        qc["version"] = version
    return qc


def export_compressed(source: ExportSource, output: Path) -> CompressedExport:
    """Write `source` as a compressed-tensors folder into `output` (refusals come before any file is written)."""
    from safetensors.torch import save_file
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    refuse(source.label, problems({n: lin.facts for n, lin in source.linears.items()}, source.blocked))
    quantized = [n for n, lin in source.linears.items() if lin.grid is not None]
    if not quantized:
        raise HarnessError(f"{source.label} has no quantized linear layer; a float model needs no "
                           "compressed-tensors export (use it as it is)")
    model = source.model
    dtype = next(model.parameters()).dtype
    names = file_names(model, list(source.linears))
    state = dict(source.state_dict())
    groups: dict[tuple, list[str]] = {}
    result = CompressedExport(output / TENSORS, {})
    for name in quantized:
        lin = source.linears[name]
        fmt, weights, inputs = scheme_of(lin)
        key = (fmt, json.dumps(weights, sort_keys=True), None if inputs is None else json.dumps(inputs, sort_keys=True))
        groups.setdefault(key, []).append(name)
        state |= {f"{name}.{k}": v for k, v in compressed_tensors_of(lin, fmt, dtype).items()}
        result.types[fmt] = result.types.get(fmt, 0) + 1
    ignore = [n for n, lin in source.linears.items() if lin.grid is None]
    result.types["float"] = len(ignore)
    state = remove_tied_weights_from_state_dict(state, model)
    from transformers.core_model_loading import revert_weight_conversion

    state = revert_weight_conversion(model, state)
    result.quantization_config = quantization_config(groups, ignore, names)
    output.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(output / TENSORS), metadata={"format": "pt"})
    model.config.save_pretrained(output)
    cfg = json.loads((output / "config.json").read_text())
    cfg["quantization_config"] = result.quantization_config
    (output / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(output)
    source.processor.save_pretrained(output)
    if any(lin.activations is not None and lin.activations.dynamic and lin.activations.symmetric
           for lin in source.linears.values()):
        result.notes.append("dynamic symmetric activation ranges are recomputed by the runtime with "
                            "compressed-tensors' rule (absmax / 127.5 over [-128, 127]; the harness uses absmax / "
                            "127 over [-127, 127])")
    return result

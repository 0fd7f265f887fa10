"""GGUF export of a Llava checkpoint's language model, in llama.cpp's ``llama`` architecture.

What is written: the language model only (llama.cpp runs the vision side from a separate projector file; the
vision tower and projector are left out and the summary says so), with the tensor names and metadata keys of
llama.cpp's ``convert_hf_to_gguf.py`` for Llama: ``token_embd``, ``blk.N.{attn_norm, attn_q, attn_k, attn_v,
attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}``, ``output_norm`` and ``output`` (left out when tied to the
embedding, as llama.cpp then reuses ``token_embd``). ``attn_q`` / ``attn_k`` rows are permuted from Hugging
Face's rotate-half rotary layout to llama.cpp's adjacent-pair layout (a permutation of output rows, so the
quantization blocks along the input dimension move unchanged).

Quantized linears are written from their stored codes (`qvlm_harness.export.ggml_blocks`): a symmetric grid of
<= 4 bits as Q4_0, 5..8 bits as Q8_0, when every 32-wide block shares one scale (groups of a multiple of 32, or
per output channel, on widths divisible by 32). Refused with the reason, before anything is written: asymmetric
grids (zero points: Q4_0/Q8_0 have none), other group sizes, activation quantization (llama.cpp quantizes
activations its own way), modules that are not integer grids (see `ExportSource.blocked`), and language models
llama.cpp's llama architecture does not compute the same way (other norms, rotary scaling, biases).
Float tensors: norms in F32 (as the converter writes 1-D tensors), the rest in the chosen float type.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qvlm_harness.config import FLOAT_BITS
from qvlm_harness.errors import HarnessError
from qvlm_harness.export.ggml_blocks import BLOCK, block_scales, exported_weight, pack_q4_0, pack_q8_0
from qvlm_harness.export.gguf_vocab import read_vocab, write_vocab
from qvlm_harness.export.source import ExportLinear, ExportSource, LayerFacts

LM = "model.language_model"
HEAD = "lm_head"
FLOAT_TYPES = ("f32", "f16")
LAYER_TENSORS = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
FIX = "export a weight-only symmetric checkpoint with groups of 32 (e.g. harness quantize --bits w4a16g32)"


@dataclass
class GgufTensor:
    """One tensor to write: float data, or packed blocks (`raw` uint8 rows) of a GGML quantization type."""

    name: str
    data: np.ndarray
    ggml_type: str  # "F32", "F16", "Q8_0", "Q4_0"
    source: str  # the model's module or tensor it comes from


@dataclass
class GgufExport:
    """What was written, for the command's summary and export.json."""

    path: Path
    file_type: str
    tensors: dict[str, str] = field(default_factory=dict)  # gguf name -> type
    types: dict[str, int] = field(default_factory=dict)  # type -> count
    max_scale_rounding: float = 0.0  # largest relative change of a quantized weight from fp16 block scales
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"format": "gguf", "file": self.path.name, "file_type": self.file_type, "types": self.types,
                "max_scale_rounding": self.max_scale_rounding, "tensors": self.tensors, "notes": self.notes}


# -- the architecture -------------------------------------------------------------------------------------------------
def check_llama(text) -> None:
    """Refuse a language model that llama.cpp's llama architecture would compute differently."""
    kind = getattr(text, "model_type", None)
    if kind != "llama":
        raise HarnessError(f"GGUF export writes llama.cpp's llama architecture; this language model is {kind!r} "
                           "(export it to compressed-tensors instead)")
    rope = getattr(text, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise HarnessError(f"the language model uses {rope.get('rope_type')!r} rotary scaling, which this GGUF "
                           "exporter does not write; export it to compressed-tensors instead")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(text, flag, False):
            raise HarnessError(f"the language model has {flag}=True, which this GGUF exporter does not write")
    if getattr(text, "hidden_act", "silu") != "silu":
        raise HarnessError(f"the language model's activation is {text.hidden_act!r}; llama.cpp's llama uses SiLU")


def head_dim(text) -> int:
    return int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)


def permute_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotate-half q/k rows -> llama.cpp's adjacent-pair rows (convert_hf_to_gguf's permute):
    within each head, rows ``[0, d/2)`` and ``[d/2, d)`` interleave."""
    return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


# -- tensors ----------------------------------------------------------------------------------------------------------
def layer_problem(f: LayerFacts) -> str | None:
    """Why a linear layer has no Q4_0/Q8_0/float form in GGUF (None when it has one)."""
    if f.a_bits < FLOAT_BITS:
        return (f"its input is quantized (a{f.a_bits} per-{f.a_granularity}); GGUF holds weights only and llama.cpp "
                "quantizes activations its own way")
    if f.w_bits >= FLOAT_BITS:
        return None
    if not f.w_symmetric:
        return f"its w{f.w_bits} grid is asymmetric (zero points); Q4_0/Q8_0 blocks have a scale and no zero point"
    if f.in_features % BLOCK:
        return f"its input width {f.in_features} is not a multiple of {BLOCK} (GGML's block)"
    if f.group_size is not None and f.group_size % BLOCK:
        return (f"its groups of {f.group_size} do not cover whole {BLOCK}-wide blocks (Q4_0/Q8_0 have one scale "
                f"per {BLOCK} weights)")
    return None


def float_tensor(name: str, t: torch.Tensor, float_type: str, source: str) -> GgufTensor:
    arr = t.detach().float().cpu().numpy()
    if arr.ndim == 1 or float_type == "f32":
        return GgufTensor(name, np.ascontiguousarray(arr, dtype=np.float32), "F32", source)
    return GgufTensor(name, arr.astype(np.float16), "F16", source)


def linear_tensor(name: str, lin: ExportLinear, float_type: str, n_head: int | None) -> tuple[GgufTensor, float]:
    """(the GGUF tensor of one linear, its worst relative weight change from the fp16 scales); `n_head`: permute
    the rows for rotary q/k."""
    g = lin.grid
    if g is None:
        w = lin.weight.numpy()
        t = float_tensor(name, torch.from_numpy(permute_rows(w, n_head) if n_head else w), float_type, lin.name)
        return t, 0.0
    codes = g.codes.to(torch.int16).numpy()
    scales = block_scales(g.row_scales().numpy(), g.out_features, g.in_features)
    if n_head:
        codes, scales = permute_rows(codes, n_head), permute_rows(scales, n_head)
    packed, kind = (pack_q4_0(codes, scales), "Q4_0") if g.bits <= 4 else (pack_q8_0(codes, scales), "Q8_0")
    harness = g.dequantized().numpy()
    exact = exported_weight(codes, scales)
    ref = permute_rows(harness, n_head) if n_head else harness
    nonzero = ref != 0
    rounding = float(np.max(np.abs(exact - ref)[nonzero] / np.abs(ref)[nonzero])) if nonzero.any() else 0.0
    return GgufTensor(name, packed, kind, lin.name), rounding


def lm_tensors(source: ExportSource, float_type: str) -> tuple[list[GgufTensor], float]:
    """Every tensor of the language model in GGUF naming and types; the worst scale rounding."""
    text = source.model.config.text_config
    state = source.state_dict()
    linears = source.linears
    out: list[GgufTensor] = []
    worst = 0.0

    def tensor_of(key: str) -> torch.Tensor:
        if key not in state:
            raise HarnessError(f"the model has no tensor {key}; GGUF export expects a Llama language model")
        return state[key]

    embed = tensor_of(f"{LM}.embed_tokens.weight")
    out.append(float_tensor("token_embd.weight", embed, float_type, f"{LM}.embed_tokens"))
    for i in range(text.num_hidden_layers):
        for hf, short in LAYER_TENSORS.items():
            key = f"{LM}.layers.{i}.{hf}"
            name = f"blk.{i}.{short}.weight"
            if key in linears:
                heads = {"attn_q": text.num_attention_heads, "attn_k": text.num_key_value_heads}.get(short)
                t, rounding = linear_tensor(name, linears[key], float_type, heads)
                worst = max(worst, rounding)
                out.append(t)
            else:
                out.append(float_tensor(name, tensor_of(f"{key}.weight"), float_type, key))
    out.append(float_tensor("output_norm.weight", tensor_of(f"{LM}.norm.weight"), float_type, f"{LM}.norm"))
    head = linears.get(HEAD)
    if head is None:
        raise HarnessError("the model has no lm_head linear; GGUF export expects a Llava language model head")
    if head.grid is not None or not torch.equal(head.weight, embed.float()):
        t, rounding = linear_tensor("output.weight", head, float_type, None)
        worst = max(worst, rounding)
        out.append(t)
    return out, worst


def problems(facts: dict[str, LayerFacts], blocked: dict[str, str]) -> list[str]:
    """Every reason the language model cannot be written, one per module (from the loaded model or, before it
    loads, from the manifest: `manifest_facts`)."""
    in_lm = lambda n: n.startswith(f"{LM}.") or n == HEAD
    found = [f"{n} is {r}" for n, r in blocked.items() if in_lm(n)]
    found += [f"{n}: {why}" for n, f in facts.items() if in_lm(n) and (why := layer_problem(f))]
    return found


def refuse(label: str, found: list[str]) -> None:
    """Raise the one-line refusal naming the first problem (and how many more there are)."""
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise HarnessError(f"cannot export {label} to GGUF: {found[0]}{more}; {FIX}")


def file_type_of(types: dict[str, int], float_type: str) -> str:
    """The file's `general.file_type` name: its quantized type with the most tensors, else the float type."""
    quant = {k: v for k, v in types.items() if k.startswith("Q")}
    if quant:
        return f"MOSTLY_{max(quant, key=quant.get)}"
    return "ALL_F32" if float_type == "f32" else "MOSTLY_F16"


# -- writing ----------------------------------------------------------------------------------------------------------
def export_gguf(source: ExportSource, output: Path, *, float_type: str = "f32") -> GgufExport:
    """Write the language model of `source` into ``output/model-<type>.gguf`` (checks first, then writes to a
    temporary name and renames, so a refused or failed export leaves no partial file)."""
    import gguf

    if float_type not in FLOAT_TYPES:
        raise HarnessError(f"--gguf-float takes {' or '.join(FLOAT_TYPES)}, got {float_type!r}")
    text = source.model.config.text_config
    check_llama(text)
    refuse(source.label, problems({n: lin.facts for n, lin in source.linears.items()}, source.blocked))
    tensors, worst = lm_tensors(source, float_type)
    vocab = read_vocab(source.folder, getattr(source.processor, "tokenizer", source.processor),
                       int(tensors[0].data.shape[0]))
    types: dict[str, int] = {}
    for t in tensors:
        types[t.ggml_type] = types.get(t.ggml_type, 0) + 1
    file_type = file_type_of(types, float_type)
    kind = file_type.removeprefix("MOSTLY_").removeprefix("ALL_")
    output.mkdir(parents=True, exist_ok=True)
    path = output / f"model-{kind}.gguf"
    tmp = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(source.folder.name)
    writer.add_context_length(int(text.max_position_embeddings))
    writer.add_embedding_length(int(text.hidden_size))
    writer.add_block_count(int(text.num_hidden_layers))
    writer.add_feed_forward_length(int(text.intermediate_size))
    writer.add_head_count(int(text.num_attention_heads))
    writer.add_head_count_kv(int(text.num_key_value_heads))
    writer.add_rope_dimension_count(head_dim(text))
    if head_dim(text) != text.hidden_size // text.num_attention_heads:
        writer.add_key_length(head_dim(text))
        writer.add_value_length(head_dim(text))
    writer.add_layer_norm_rms_eps(float(text.rms_norm_eps))
    writer.add_rope_freq_base(float((getattr(text, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_vocab_size(len(vocab.tokens))
    writer.add_file_type(int(gguf.LlamaFileType[file_type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if source.manifest is not None:
        writer.add_string("qvlm_harness.source", json.dumps(
            {"method": source.manifest["method"], "spec": source.manifest["spec"]["tag"],
             "manifest_sha256": source.manifest.get("manifest_sha256")}))
    write_vocab(writer, vocab)
    result = GgufExport(path, file_type, types=types, max_scale_rounding=worst)
    for t in tensors:
        if t.ggml_type in ("Q8_0", "Q4_0"):
            writer.add_tensor(t.name, t.data, raw_dtype=gguf.GGMLQuantizationType[t.ggml_type])
        else:
            writer.add_tensor(t.name, t.data)
        result.tensors[t.name] = t.ggml_type
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    if any(n.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for n in source.linears):
        result.notes.append("language model only: the vision tower and projector are not in the GGUF file")
    if worst:
        result.notes.append(f"block scales stored in float16 (GGML's d): weights change by at most "
                            f"{worst:.2e} relative to the harness's float32 scales")
    return result

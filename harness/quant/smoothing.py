"""Per-input-channel scaling that leaves a block's float function unchanged (AWQ, SmoothQuant).

A `ScaleGroup` is a set of linear layers reading the same input, and the operation producing that input: a
norm (LayerNorm / RMSNorm: its weight, and bias, are divided by the scales) or a linear layer whose output
rows are divided by them (v_proj -> o_proj, up_proj -> down_proj). Multiplying the linears' input columns by
the same scales keeps the float output identical: ``W diag(s) (x / s) = W x``.

Groups are found by module names, for the three block families the harness runs:
* Llama decoder layer: input_layernorm -> self_attn.{q,k,v}_proj; self_attn.v_proj -> self_attn.o_proj (only
  when their shapes match: with grouped-query attention they do not, and the pair is skipped, as llm-awq does);
  post_attention_layernorm -> mlp.{gate,up}_proj; mlp.up_proj -> mlp.down_proj.
* CLIP encoder layer: layer_norm1 -> self_attn.{q,k,v}_proj; v_proj -> out_proj; layer_norm2 -> mlp.fc1.
* DINOv2 layer: norm1 -> attention.{q,k,v}_proj; v_proj -> o_proj; norm2 -> mlp.fc1 (or SwiGLU gate/up, down).
fc2 after a GELU has no scale-equivariant producer and is not scaled (llm-awq would insert a scaled activation
module; the harness does not change the graph).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

ATTN = ("self_attn", "attention")
NORM1 = ("input_layernorm", "layer_norm1", "norm1")
NORM2 = ("post_attention_layernorm", "layer_norm2", "norm2")
OUT = ("o_proj", "out_proj")


@dataclass
class ScaleGroup:
    prev: str  # relative name of the producing op
    prev_kind: str  # "norm" or "linear"
    linears: list[str]  # relative names of the consumers
    inspect: str  # relative name of the module whose output measures the group's error (AWQ)


def _first(names: dict[str, nn.Module], prefix: str, options: tuple[str, ...]) -> str | None:
    for o in options:
        full = f"{prefix}.{o}" if prefix else o
        if full in names:
            return full
    return None


def _weight(m: nn.Module) -> Tensor:
    return m.weight


def scale_groups(block: nn.Module) -> list[ScaleGroup]:
    """The scale groups of one transformer block (relative module names); see the module docstring."""
    names = dict(block.named_modules())
    groups: list[ScaleGroup] = []
    attn = _first(names, "", ATTN)
    norm1 = _first(names, "", NORM1)
    norm2 = _first(names, "", NORM2)
    if attn:
        qkv = [f"{attn}.{p}" for p in ("q_proj", "k_proj", "v_proj") if f"{attn}.{p}" in names]
        if norm1 and qkv:
            groups.append(ScaleGroup(norm1, "norm", qkv, attn))
        v, o = f"{attn}.v_proj", _first(names, attn, OUT)
        if v in names and o and _weight(names[v]).shape == _weight(names[o]).shape:
            groups.append(ScaleGroup(v, "linear", [o], o))
    if "mlp" in names:
        gate, up, down = "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"
        if up in names:
            ins = [n for n in (gate, up) if n in names]
            if norm2:
                groups.append(ScaleGroup(norm2, "norm", ins, "mlp"))
            if down in names:
                groups.append(ScaleGroup(up, "linear", [down], down))
        elif "mlp.fc1" in names and norm2:
            groups.append(ScaleGroup(norm2, "norm", ["mlp.fc1"], "mlp"))
    return groups


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: list[nn.Module], scales: Tensor) -> None:
    """Divide the producer's output channels by `scales` and multiply the consumers' input columns by them."""
    s = scales.detach().float()
    w = prev.weight
    if w.dim() == 1:  # norm
        prev.weight.copy_((w.float() / s).to(w.dtype))
    else:  # linear producer: its output rows
        prev.weight.copy_((w.float() / s[:, None]).to(w.dtype))
    bias = getattr(prev, "bias", None)
    if bias is not None:
        bias.copy_((bias.float() / s).to(bias.dtype))
    for lin in linears:
        lin.weight.copy_((lin.weight.float() * s[None, :]).to(lin.weight.dtype))

"""The one architecture table: which layer, attention, MLP, norm and projector classes the seam knows, and what
each is made of. `describe_model` turns a Llava model (loaded, or a meta-device skeleton) into `Stack`s of
`Unit`s from it.

Classes are matched exactly (module and class name), never by attribute names or by subclassing: a class the
table does not list is refused by name with the list of known ones, so a new family (a norm computing
``x * (1 + w)``, a block with norms on both sides of its branches) is described once here instead of being
guessed wrong by every method. To add a family: list its norm class with its `NormKind`, its attention and MLP
classes with their projection names, and its layer class with the names of the norms that feed the attention
and the MLP; then add a tiny builder to `qvlm_harness.models.tiny` and the conformance tests run on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from qvlm_harness.errors import HarnessError
from qvlm_harness.models.structure import (
    STACK_NAMES,
    STACK_ROOTS,
    Attention,
    NormKind,
    ScaleGroup,
    Stack,
    Unit,
)
from qvlm_harness.quant.online import online_transform

_TF = "transformers.models."
_TORCH_NORM = "torch.nn.modules.normalization:"


def class_key(module: nn.Module | type) -> str:
    """``module:ClassName`` of a module's class: the key of every table below."""
    cls = module if isinstance(module, type) else type(module)
    return f"{cls.__module__}:{cls.__qualname__}"


def _short(key: str) -> str:
    return key.rpartition(":")[2]


def _known(table: dict) -> str:
    return ", ".join(sorted(_short(k) for k in table))


# -- norms ----------------------------------------------------------------------------------------------------------

NORMS: dict[str, NormKind] = {
    _TORCH_NORM + "LayerNorm": NormKind.LAYERNORM,
    _TORCH_NORM + "RMSNorm": NormKind.RMSNORM,
    _TF + "llama.modeling_llama:LlamaRMSNorm": NormKind.RMSNORM,
    _TF + "mistral.modeling_mistral:MistralRMSNorm": NormKind.RMSNORM,
    _TF + "qwen2.modeling_qwen2:Qwen2RMSNorm": NormKind.RMSNORM,
    _TF + "qwen3.modeling_qwen3:Qwen3RMSNorm": NormKind.RMSNORM,
    _TF + "gemma.modeling_gemma:GemmaRMSNorm": NormKind.RMSNORM_OFFSET,
    _TF + "gemma2.modeling_gemma2:Gemma2RMSNorm": NormKind.RMSNORM_OFFSET,
    _TF + "gemma3.modeling_gemma3:Gemma3RMSNorm": NormKind.RMSNORM_OFFSET,
}


def norm_kind(module: nn.Module, fqn: str = "") -> NormKind:
    """The `NormKind` of a norm module; an unknown norm class is refused (a fold through it would be a guess)."""
    kind = NORMS.get(class_key(module))
    if kind is None:
        where = f" at {fqn}" if fqn else ""
        raise HarnessError(f"the model seam does not know the norm class {type(module).__name__}{where}; "
                           f"known: {_known(NORMS)} (describe it in qvlm_harness.models.architectures)")
    return kind


# -- attention, MLP, layers, projector ---------------------------------------------------------------------------------


def _own_window(attn: nn.Module) -> int | None:
    return getattr(attn, "sliding_window", None)


def _config_window(attn: nn.Module) -> int | None:
    return getattr(getattr(attn, "config", None), "sliding_window", None)


@dataclass(frozen=True)
class AttentionLayout:
    q: str
    k: str
    v: str
    o: str
    rope: bool
    q_norm: str | None = None
    k_norm: str | None = None
    window: Callable[[nn.Module], int | None] = _own_window


@dataclass(frozen=True)
class MLPLayout:
    inputs: tuple[str, ...]  # linears reading the MLP's input, forward order: (gate, up) or (fc1,)
    output: str  # the linear writing the MLP's output
    # (up, down) when the output is linear in `up`'s output channels (gated MLP: down(act(gate x) * up x)), so a
    # scale folds from up's rows into down's columns; None when an activation sits between (fc1 -> GELU -> fc2)
    pair: tuple[str, str] | None


@dataclass(frozen=True)
class LayerLayout:
    attention: str  # attribute of the attention module
    mlp: str  # attribute of the MLP module
    attn_norm: str  # the norm whose output the attention's q/k/v read
    mlp_norm: str  # the norm whose output the MLP's input linears read
    branch_norms: tuple[str, ...] = ()  # norms on the branch outputs before the residual add (Gemma2/3 sandwich)


_LLAMA_ATTN = AttentionLayout("q_proj", "k_proj", "v_proj", "o_proj", rope=True)
_QK_NORM_ATTN = AttentionLayout("q_proj", "k_proj", "v_proj", "o_proj", rope=True, q_norm="q_norm", k_norm="k_norm")
_VIT_ATTN = AttentionLayout("q_proj", "k_proj", "v_proj", "out_proj", rope=False)
_GATED = MLPLayout(("gate_proj", "up_proj"), "down_proj", ("up_proj", "down_proj"))
_FC = MLPLayout(("fc1",), "fc2", None)
_PRE_NORM = LayerLayout("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
_SANDWICH = LayerLayout("self_attn", "mlp", "input_layernorm", "pre_feedforward_layernorm",
                        ("post_attention_layernorm", "post_feedforward_layernorm"))
_VIT = LayerLayout("self_attn", "mlp", "layer_norm1", "layer_norm2")

ATTENTIONS: dict[str, AttentionLayout] = {
    _TF + "llama.modeling_llama:LlamaAttention": _LLAMA_ATTN,
    _TF + "mistral.modeling_mistral:MistralAttention": AttentionLayout("q_proj", "k_proj", "v_proj", "o_proj",
                                                                       rope=True, window=_config_window),
    _TF + "qwen2.modeling_qwen2:Qwen2Attention": _LLAMA_ATTN,
    _TF + "qwen3.modeling_qwen3:Qwen3Attention": _QK_NORM_ATTN,
    _TF + "gemma.modeling_gemma:GemmaAttention": _LLAMA_ATTN,
    _TF + "gemma2.modeling_gemma2:Gemma2Attention": _LLAMA_ATTN,
    _TF + "gemma3.modeling_gemma3:Gemma3Attention": _QK_NORM_ATTN,
    _TF + "clip.modeling_clip:CLIPAttention": _VIT_ATTN,
    _TF + "siglip.modeling_siglip:SiglipAttention": _VIT_ATTN,
    _TF + "dinov2.modeling_dinov2:Dinov2Attention": AttentionLayout("q_proj", "k_proj", "v_proj", "o_proj",
                                                                    rope=False),
}
MLPS: dict[str, MLPLayout] = {
    _TF + "llama.modeling_llama:LlamaMLP": _GATED,
    _TF + "mistral.modeling_mistral:MistralMLP": _GATED,
    _TF + "qwen2.modeling_qwen2:Qwen2MLP": _GATED,
    _TF + "qwen3.modeling_qwen3:Qwen3MLP": _GATED,
    _TF + "gemma.modeling_gemma:GemmaMLP": _GATED,
    _TF + "gemma2.modeling_gemma2:Gemma2MLP": _GATED,
    _TF + "gemma3.modeling_gemma3:Gemma3MLP": _GATED,
    _TF + "clip.modeling_clip:CLIPMLP": _FC,
    _TF + "siglip.modeling_siglip:SiglipMLP": _FC,
    _TF + "dinov2.modeling_dinov2:Dinov2MLP": _FC,
    _TF + "dinov2.modeling_dinov2:Dinov2SwiGLUFFN": _GATED,
}
LAYERS: dict[str, LayerLayout] = {
    _TF + "llama.modeling_llama:LlamaDecoderLayer": _PRE_NORM,
    _TF + "mistral.modeling_mistral:MistralDecoderLayer": _PRE_NORM,
    _TF + "qwen2.modeling_qwen2:Qwen2DecoderLayer": _PRE_NORM,
    _TF + "qwen3.modeling_qwen3:Qwen3DecoderLayer": _PRE_NORM,
    _TF + "gemma.modeling_gemma:GemmaDecoderLayer": _PRE_NORM,
    _TF + "gemma2.modeling_gemma2:Gemma2DecoderLayer": _SANDWICH,
    _TF + "gemma3.modeling_gemma3:Gemma3DecoderLayer": _SANDWICH,
    _TF + "clip.modeling_clip:CLIPEncoderLayer": _VIT,
    _TF + "siglip.modeling_siglip:SiglipEncoderLayer": _VIT,
    # LayerScale (layer_scale1/2) multiplies each branch's output after o_proj / the MLP: nothing folds through it
    _TF + "dinov2.modeling_dinov2:Dinov2Layer": LayerLayout("attention", "mlp", "norm1", "norm2"),
}
PROJECTORS: dict[str, tuple[str, ...]] = {
    _TF + "llava.modeling_llava:LlavaMultiModalProjector": ("linear_1", "linear_2"),  # linear -> GELU -> linear
}


def _lookup(table: dict, module: nn.Module, what: str, fqn: str):
    layout = table.get(class_key(module))
    if layout is None:
        raise HarnessError(f"the model seam does not know the {what} {type(module).__name__} ({fqn}); "
                           f"known: {_known(table)}")
    return layout


def _width(module: nn.Module, attr: str) -> int:
    value = getattr(module, attr, None)
    if value is None:  # a swapped-in quantized module keeps the linear's shape
        value = module.weight.shape[0 if attr == "out_features" else 1]
    return int(value)


# -- describing a model ---------------------------------------------------------------------------------------------


def describe_unit(layer: nn.Module, name: str, stack: str, index: int, used: bool = True) -> Unit:
    """The seam's description of one transformer layer (`name`: its FQN, '' for a standalone layer)."""
    layout: LayerLayout = _lookup(LAYERS, layer, "layer architecture", name or type(layer).__name__)
    prefix = f"{name}." if name else ""
    attn_mod = layer.get_submodule(layout.attention)
    mlp_mod = layer.get_submodule(layout.mlp)
    attn: AttentionLayout = _lookup(ATTENTIONS, attn_mod, "attention class", prefix + layout.attention)
    mlp: MLPLayout = _lookup(MLPS, mlp_mod, "MLP class", prefix + layout.mlp)
    a = f"{prefix}{layout.attention}."
    m = f"{prefix}{layout.mlp}."
    q, k, v, o = (a + attn.q, a + attn.k, a + attn.v, a + attn.o)
    mlp_in = tuple(m + n for n in mlp.inputs)
    linears = [q, k, v, o, *mlp_in, m + mlp.output]

    norm_names = [layout.attn_norm, layout.mlp_norm, *layout.branch_norms]
    norm_names += [f"{layout.attention}.{n}" for n in (attn.q_norm, attn.k_norm) if n]
    norms = {prefix + n: norm_kind(layer.get_submodule(n), prefix + n) for n in norm_names}

    modules = dict(layer.named_modules())
    rel = {f: f[len(prefix):] for f in linears}
    missing = [f for f in linears if rel[f] not in modules]
    if missing:
        raise HarnessError(f"{name or type(layer).__name__}: the {type(layer).__name__} layout names linears the "
                           f"module does not have: {', '.join(missing)}")
    listed = set(rel.values())
    # (a linear inside a listed one is a quantized wrapper's float original, not another layer)
    extra = [n for n, mod in modules.items() if isinstance(mod, nn.Linear) and n not in listed
             and not any(n.startswith(f + ".") for f in listed)]
    if extra:
        raise HarnessError(f"{name or type(layer).__name__}: linears the seam's {type(layer).__name__} layout does "
                           f"not list: {', '.join(prefix + n for n in extra)}")

    head_dim = int(attn_mod.head_dim)
    q_mod, k_mod, v_mod, o_mod = (modules[rel[f]] for f in (q, k, v, o))
    attention = Attention(
        module=prefix + layout.attention, q=q, k=k, v=v, o=o,
        heads=_width(q_mod, "out_features") // head_dim, kv_heads=_width(k_mod, "out_features") // head_dim,
        head_dim=head_dim, rope=attn.rope, qk_norm=attn.q_norm is not None,
        sliding_window=attn.window(attn_mod), layer_type=getattr(attn_mod, "layer_type", None))

    attn_norm, mlp_norm = prefix + layout.attn_norm, prefix + layout.mlp_norm
    groups = [ScaleGroup(attn_norm, "norm", norms[attn_norm], (q, k, v), attention.module)]
    # v -> o only when o reads v's channels one to one (with grouped-query attention it does not; llm-awq skips it),
    # and no linear -> linear pair whose consumer transforms its input online (a rotation's Hadamard): a scale on
    # the producer's channels does not pass through it
    if (_width(v_mod, "out_features") == _width(o_mod, "in_features") and attention.kv_heads == attention.heads
            and online_transform(o_mod) is None):
        groups.append(ScaleGroup(v, "linear", None, (o,), o))
    groups.append(ScaleGroup(mlp_norm, "norm", norms[mlp_norm], mlp_in, prefix + layout.mlp))
    if mlp.pair is not None and online_transform(modules[rel[m + mlp.pair[1]]]) is None:
        up, down = m + mlp.pair[0], m + mlp.pair[1]
        groups.append(ScaleGroup(up, "linear", None, (down,), down))
    return Unit(name, stack, index, layer, _short(class_key(layer)), linears, attention, groups, norms, used)


def _projector_unit(module: nn.Module, name: str) -> Unit:
    names = _lookup(PROJECTORS, module, "projector class", name)
    return Unit(name, "projector", 0, module, _short(class_key(module)), [f"{name}.{n}" for n in names])


def _layer_list(root: nn.Module, root_name: str) -> tuple[str, nn.ModuleList]:
    """The ModuleList of known layers under a stack's root. Found by the layer classes in the table, not by size
    or names; a list of layers the table does not know is refused naming their class."""
    found, unknown = [], set()
    for name, m in root.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0:
            keys = {class_key(c) for c in m}
            if len(keys) == 1 and next(iter(keys)) in LAYERS:
                found.append((f"{root_name}.{name}" if name else root_name, m))
            elif any(isinstance(c, nn.Module) and any(isinstance(x, nn.Linear) for x in c.modules()) for c in m):
                unknown |= {_short(k) for k in keys}
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise HarnessError(f"{root_name} holds several layer lists ({', '.join(n for n, _ in found)}); "
                           "the model seam expects one per stack")
    what = f"the layer architecture {', '.join(sorted(unknown))}" if unknown else "any layer list"
    raise HarnessError(f"the model seam does not know {what} ({root_name}); known: {_known(LAYERS)}")


def _used_vision_layers(config, n_layers: int) -> int:
    """How many vision layers feed the projector: hidden_states[k] is the output of k layers (0 = embeddings)."""
    idx = getattr(config, "vision_feature_layer", -1)
    idxs = idx if isinstance(idx, list | tuple) else [idx]
    return max(int(i) % (n_layers + 1) for i in idxs)


def _check_stacks(stacks: Sequence[str]) -> list[str]:
    unknown = sorted(set(stacks) - set(STACK_NAMES))
    if unknown:
        raise HarnessError(f"unknown part(s) {unknown}; choose from {', '.join(STACK_NAMES)}")
    return [s for s in STACK_NAMES if s in stacks]


def describe_model(model: nn.Module, stacks: Sequence[str] = STACK_NAMES) -> list[Stack]:
    """The stacks of a Llava model in forward order (restricted to `stacks`), each with its units in forward order.
    Works on a meta-device skeleton: only module classes and shapes are read."""
    out: list[Stack] = []
    for stack in _check_stacks(stacks):
        root_name = STACK_ROOTS[stack]
        try:
            root = model.get_submodule(root_name)
        except AttributeError:
            raise HarnessError(f"the model has no {root_name} (not a transformers>=4.52 Llava layout)") from None
        if stack == "projector":
            out.append(Stack(stack, root_name, [_projector_unit(root, root_name)]))
            continue
        list_name, layers = _layer_list(root, root_name)
        n_used = _used_vision_layers(model.config, len(layers)) if stack == "vision" else len(layers)
        units = [describe_unit(layer, f"{list_name}.{i}", stack, i, used=i < n_used) for i, layer in enumerate(layers)]
        final = None
        if stack == "lm" and isinstance(getattr(root, "norm", None), nn.Module):
            norm_kind(root.norm, f"{root_name}.norm")
            final = f"{root_name}.norm"
        out.append(Stack(stack, root_name, units, final))
    return out


def describe_config(config, stacks: Sequence[str] = STACK_NAMES) -> list[Stack]:
    """`describe_model` on a meta-device skeleton built from a Llava config: the structure (and every structural
    refusal) before any weight is loaded. The units' modules are meta modules: read them, never run them."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        skeleton = LlavaForConditionalGeneration(config)
    return describe_model(skeleton, stacks)

"""FLOPs one evaluation sample needs on a LLaVA model, from the model's layer shapes and the sample's token counts.

Why count instead of measure: `harness bench --throughput` compares the evaluation's speed with the machine's
limit, `limit = GEMM rate / FLOPs per sample`. That needs the work the *answer* requires, independent of how the
current code happens to execute it (padding, logits for every prompt position, decode steps of sequences that
have already stopped are waste the instrument must expose, not hide). `executed_flops` measures what really runs
(torch's FlopCounterMode), so the two side by side say how much of the executed work was needed.

What is counted, per sample:
- every GEMM as 2*M*N*K: each `nn.Linear` of the vision tower at the image's sequence length (patch tokens plus
  the CLS token the "default" feature strategy drops afterwards; Hugging Face runs every tower layer, so all are
  counted), the patch-embedding convolution at its output positions, the projector per image feature token, the
  language model's linears per prompt token in prefill and per generated token in decode, the LM head once per
  distribution the answer needs (the last prompt position, and each generated token but the last);
- attention's two matmuls (scores Q K^T and the weighted sum P V): 2 * T_q * T_k * d each per layer, with d the
  query width (heads * head_dim; key/value heads shared by grouped-query attention do not reduce it). The vision
  tower is bidirectional: full T^2. The language model is causal: with `causal=True` (the default, what a
  causal kernel needs) query i of a prefill attends only i + 1 keys, so the pairs are T(T+1)/2, about half the
  dense 4 T^2 d; `causal=False` gives the dense count that torch's SDPA kernel executes and FlopCounterMode sees.
Not counted: norms, activations, softmax, rotary embeddings, residual adds (O(T*d) elementwise work, under 1% of
the GEMMs at these widths), embedding lookups.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

PARTS = ("vision", "projector", "prefill", "head", "decode")  # where the work happens, for rates and reports
KINDS = ("linear", "attention")
# where each part of a Llava model lives (transformers >= 4.52 layout), for FlopCounterMode's module names
MODULE_PARTS = {"model.vision_tower": "vision", "model.multi_modal_projector": "projector",
                "model.language_model": "lm", "lm_head": "head"}


@dataclass(frozen=True)
class LinearShape:
    """One GEMM-shaped layer: `in_features` (K) x `out_features` (N), run once per token of its part."""

    name: str
    in_features: int
    out_features: int

    def flops(self, tokens: int) -> int:
        return 2 * tokens * self.in_features * self.out_features


@dataclass(frozen=True)
class ConvShape:
    """A vision-tower convolution (the patch embedding): a GEMM of K = C_in/groups * kh * kw, N = C_out per output
    position."""

    name: str
    in_per_group: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @property
    def gemm_k(self) -> int:
        return self.in_per_group * self.kernel[0] * self.kernel[1]

    def positions(self, hw: tuple[int, int]) -> int:
        out = [(hw[i] + 2 * self.padding[i] - self.dilation[i] * (self.kernel[i] - 1) - 1) // self.stride[i] + 1
               for i in range(2)]
        return out[0] * out[1]

    def flops(self, hw: tuple[int, int]) -> int:
        return 2 * self.positions(hw) * self.gemm_k * self.out_channels


@dataclass(frozen=True)
class Attention:
    """The attention geometry of a stack: `layers` layers, query/key width and value width (heads * head_dim)."""

    layers: int
    qk_width: int
    v_width: int

    def flops(self, pairs: int) -> int:
        """Q K^T (2 * pairs * qk_width) plus P V (2 * pairs * v_width), summed over the layers."""
        return 2 * pairs * (self.qk_width + self.v_width) * self.layers


@dataclass(frozen=True)
class ModelShapes:
    """Everything the count needs, read once from the float model (before quantization replaces its linears)."""

    vision: tuple[LinearShape, ...]
    patch_convs: tuple[ConvShape, ...]
    projector: tuple[LinearShape, ...]
    lm: tuple[LinearShape, ...]
    head: LinearShape | None
    vision_attention: Attention
    lm_attention: Attention
    image_token_id: int
    dropped_vision_tokens: int  # tokens the tower computes but the projector does not see (CLS: "default")

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelShapes:
        """Read the shapes of a `LlavaForConditionalGeneration` (its `nn.Linear`/`nn.Conv2d` modules and config)."""
        cfg = model.config
        linears: dict[str, list[LinearShape]] = {"vision": [], "projector": [], "lm": []}
        convs: list[ConvShape] = []
        head = None
        for name, mod in model.named_modules():
            part = _part_of(name)
            if isinstance(mod, nn.Linear) and part in linears:
                linears[part].append(LinearShape(name, mod.in_features, mod.out_features))
            elif isinstance(mod, nn.Linear) and part == "head":
                head = LinearShape(name, mod.in_features, mod.out_features)
            elif isinstance(mod, nn.Conv2d) and part == "vision":
                convs.append(ConvShape(name, mod.in_channels // mod.groups, mod.out_channels, _pair(mod.kernel_size),
                                       _pair(mod.stride), _pair(mod.padding), _pair(mod.dilation)))
        v, t = cfg.vision_config, cfg.text_config
        v_width = v.hidden_size
        heads = t.num_attention_heads
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // heads
        strategy = getattr(cfg, "vision_feature_select_strategy", "default")
        return cls(tuple(linears["vision"]), tuple(convs), tuple(linears["projector"]), tuple(linears["lm"]), head,
                   Attention(v.num_hidden_layers, v_width, v_width),
                   Attention(t.num_hidden_layers, heads * head_dim, heads * head_dim),
                   int(cfg.image_token_id if hasattr(cfg, "image_token_id") else cfg.image_token_index),
                   1 if strategy == "default" else 0)

    def linears(self, part: str) -> tuple[LinearShape, ...]:
        """The GEMM-shaped layers a part runs (prefill and decode both run the LM trunk)."""
        if part in ("prefill", "decode"):
            return self.lm
        if part == "head":
            return (self.head,) if self.head is not None else ()
        return {"vision": self.vision, "projector": self.projector}[part]


@dataclass(frozen=True)
class SampleTokens:
    """The real token counts of one sample, unpadded: what it costs on its own."""

    prompt_tokens: int  # language-model positions of the prompt, image tokens included
    image_sizes: tuple[tuple[int, int], ...] = ()  # pixel (height, width) of each image fed to the tower
    image_tokens: int = 0  # image tokens in the prompt, all images together
    generated: int = 0  # distributions the generated answer needed: answer tokens + the stop token, capped
    continuations: tuple[int, ...] = ()  # loglik with multi-token options: the token count of each option


@dataclass
class FlopCount:
    """FLOPs by part (`PARTS`) and kind (`KINDS`)."""

    parts: dict[str, dict[str, int]] = field(default_factory=lambda: {p: dict.fromkeys(KINDS, 0) for p in PARTS})

    def add(self, part: str, kind: str, flops: int) -> None:
        self.parts[part][kind] += int(flops)

    def part(self, part: str) -> int:
        return sum(self.parts[part].values())

    def kind(self, kind: str) -> int:
        return sum(p[kind] for p in self.parts.values())

    @property
    def total(self) -> int:
        return sum(self.part(p) for p in PARTS)

    def __add__(self, other: FlopCount) -> FlopCount:
        out = FlopCount()
        for p in PARTS:
            for k in KINDS:
                out.parts[p][k] = self.parts[p][k] + other.parts[p][k]
        return out

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {p: dict(k) for p, k in self.parts.items()}


def generated_distributions(new_tokens: int, max_new_tokens: int) -> int:
    """LM-head applications a greedy answer of `new_tokens` kept tokens needed: one per kept token plus the stop
    token, unless generation hit the cap (then no stop token was produced)."""
    return min(new_tokens + 1, max_new_tokens)


def causal_pairs(new: int, past: int) -> int:
    """Query-key pairs of `new` causal queries after `past` cached positions: query i sees past + i + 1 keys."""
    return new * past + new * (new + 1) // 2


def vision_flops(shapes: ModelShapes, hw: tuple[int, int], feature_tokens: int, count: FlopCount) -> None:
    """One image through the tower (bidirectional attention over all its tokens) and the projector."""
    seq = feature_tokens + shapes.dropped_vision_tokens
    count.add("vision", "linear", sum(c.flops(hw) for c in shapes.patch_convs))
    count.add("vision", "linear", sum(s.flops(seq) for s in shapes.vision))
    count.add("vision", "attention", shapes.vision_attention.flops(seq * seq))
    count.add("projector", "linear", sum(s.flops(feature_tokens) for s in shapes.projector))


def lm_pass_flops(shapes: ModelShapes, part: str, new: int, past: int, count: FlopCount, *, causal: bool) -> None:
    """One language-model pass over `new` tokens after `past` cached ones (trunk only; the head is separate)."""
    count.add(part, "linear", sum(s.flops(new) for s in shapes.lm))
    pairs = causal_pairs(new, past) if causal else new * (past + new)
    count.add(part, "attention", shapes.lm_attention.flops(pairs))


def head_flops(shapes: ModelShapes, positions: int, count: FlopCount) -> None:
    if shapes.head is not None:
        count.add("head", "linear", shapes.head.flops(positions))


def sample_flops(shapes: ModelShapes, tokens: SampleTokens, *, causal: bool = True) -> FlopCount:
    """The FLOPs the answer to one sample requires (see the module docstring for what is counted)."""
    count = FlopCount()
    per_image = tokens.image_tokens // max(1, len(tokens.image_sizes))
    for hw in tokens.image_sizes:
        vision_flops(shapes, hw, per_image, count)
    t = tokens.prompt_tokens
    lm_pass_flops(shapes, "prefill", t, 0, count, causal=causal)
    head_flops(shapes, 1, count)  # the first answer distribution (or the one that scores single-token options)
    if tokens.continuations:  # each option teacher-forced after the cached prompt: its tokens but the last go in
        for n in tokens.continuations:
            lm_pass_flops(shapes, "decode", n - 1, t, count, causal=causal)
            head_flops(shapes, n - 1, count)
        return count
    for step in range(1, tokens.generated):  # decode step `step` feeds answer token step-1 after t+step-1 positions
        lm_pass_flops(shapes, "decode", 1, t + step - 1, count, causal=causal)
        head_flops(shapes, 1, count)
    return count


# -- what really runs -------------------------------------------------------------------------------------------------


def _shape_flops_mm(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _int_linear_flops(x_shape, qweight_shape, bits, w_scale_shape, w_zero_shape, w_rowsum_shape, *args,
                      out_shape=None, **kwargs) -> int:
    return 2 * x_shape[0] * x_shape[1] * w_rowsum_shape[0]  # w_rowsum is [N, groups]


def _onednn_linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    rows = 1
    for d in x_shape[:-1]:
        rows *= d
    return 2 * rows * x_shape[-1] * w_shape[0]  # weight is [N, K] as nn.Linear stores it


def _int4pack_flops(x_shape, w_shape, group, sz_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * x_shape[0] * x_shape[1] * sz_shape[1]  # scales_and_zeros is [groups, N (padded), 2]


def cpu_flop_formulas() -> dict:
    """FlopCounterMode formulas for the CPU ops its registry lacks: the fused SDPA kernel torch uses on CPU, the
    integer GEMMs, the packed kernels (`qvlm_harness.kernels`), the oneDNN linear the row-invariant evaluation
    path runs fp32 layers through (`qvlm_harness.models.invariance`); each from its argument shapes."""
    aten = torch.ops.aten
    formulas = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops, aten._int_mm: _shape_flops_mm,
                aten._weight_int4pack_mm_for_cpu: _int4pack_flops,
                torch.ops.mkldnn._linear_pointwise: _onednn_linear_flops}
    if hasattr(torch.ops, "harness_kernels") and hasattr(torch.ops.harness_kernels, "int_linear"):
        formulas[torch.ops.harness_kernels.int_linear] = _int_linear_flops
    return formulas


@dataclass
class ExecutedFlops:
    """What FlopCounterMode saw while the block ran, by part of the Llava model (`MODULE_PARTS`)."""

    total: int = 0
    parts: dict[str, int] = field(default_factory=dict)


@contextmanager
def executed_flops(model: nn.Module) -> Iterator[ExecutedFlops]:
    """Count the FLOPs every matmul, convolution and attention kernel really executes inside the block."""
    from torch.utils.flop_counter import FlopCounterMode

    result = ExecutedFlops()
    counter = FlopCounterMode(display=False, custom_mapping=cpu_flop_formulas())
    with counter:
        yield result
    counts = counter.get_flop_counts()
    root = type(model).__name__
    result.total = int(sum(counts.get("Global", {}).values()))
    for prefix, part in MODULE_PARTS.items():
        # a part called inside the model's forward is named by its path; one that generate() runs on its own
        # (transformers 5 encodes the images before the decoding loop) is named by its class
        names = {f"{root}.{prefix}", type(model.get_submodule(prefix)).__name__}
        result.parts[part] = int(sum(sum(counts.get(n, {}).values()) for n in names))


def _part_of(name: str) -> str | None:
    for prefix, part in MODULE_PARTS.items():
        if name == prefix or name.startswith(prefix + "."):
            return part
    return None


def _pair(v: int | str | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, str):  # "valid" (no padding); "same" keeps the input size, which stride-1 only allows
        return (0, 0)
    if isinstance(v, int):
        return v, v
    return int(v[0]), int(v[1])

"""The model seam's vocabulary: what a model is made of, in the terms every method and transform uses.

A Llava model is three *stacks* in forward order (`vision`, `projector`, `lm`), each a list of *units* (one
transformer layer, or the projector as a whole). A unit knows its linears in forward order, its attention
geometry, the norms it contains and their `NormKind`, and its *scale groups*: the sets of linears reading one
producer's output, through which per-channel scales can be folded without changing the float function.

These are plain descriptions; `qvlm_harness.models.architectures` is the one table that fills them in for the
layer classes the harness knows, and refuses the others by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

from torch import nn

STACK_NAMES = ("vision", "projector", "lm")
# Where each stack lives in a Llava model (transformers >= 4.52 layout). `scope` (the user's `--quantize` word)
# names the same three parts.
STACK_ROOTS = {"vision": "model.vision_tower", "projector": "model.multi_modal_projector",
               "lm": "model.language_model"}


class NormKind(str, Enum):
    """What a normalisation layer computes from the normalised input ``n`` (a fold must know which):

    * ``layernorm``: ``n = (x - mean) / std``, output ``n * w + b``;
    * ``rmsnorm``: ``n = x / rms(x)``, output ``n * w``;
    * ``rmsnorm_offset``: ``n = x / rms(x)``, output ``n * (1 + w)`` (the Gemma family).
    """

    LAYERNORM = "layernorm"
    RMSNORM = "rmsnorm"
    RMSNORM_OFFSET = "rmsnorm_offset"


ProducerKind = Literal["norm", "linear"]


@dataclass(frozen=True)
class ScaleGroup:
    """Linears reading one producer's output: ``W diag(s)`` on the consumers and ``/ s`` on the producer's output
    channels leave the float function unchanged. `inspect` is the module whose output measures the group's
    quantization error (AWQ's block-output loss): the attention for q/k/v, the MLP for its input linears, the
    consumer itself for a linear -> linear pair."""

    producer: str  # FQN of the norm or linear producing the consumers' input
    producer_kind: ProducerKind
    norm_kind: NormKind | None  # the producer's NormKind (None for a linear producer)
    consumers: tuple[str, ...]  # FQNs, forward order
    inspect: str  # FQN


@dataclass(frozen=True)
class Attention:
    """One attention module's geometry (FQNs of its projections; heads from their widths)."""

    module: str  # FQN of the attention module
    q: str
    k: str
    v: str
    o: str
    heads: int
    kv_heads: int
    head_dim: int
    rope: bool  # rotary position embeddings applied to q and k
    qk_norm: bool  # a norm on q and k after the projections (Qwen3, Gemma3)
    sliding_window: int | None = None  # window size of a sliding-window layer, None for full attention
    layer_type: str | None = None  # the config's name for it ("sliding_attention", "full_attention"), if any


@dataclass(eq=False)
class Unit:
    """One unit of a stack: a transformer layer, or the projector. Compared by identity."""

    name: str  # FQN of the module
    stack: str  # "vision" | "projector" | "lm"
    index: int  # position within its stack
    module: nn.Module
    arch: str = ""  # the layer class the description came from
    linears: list[str] = field(default_factory=list)  # FQNs, forward order
    attention: Attention | None = None
    scale_groups: list[ScaleGroup] = field(default_factory=list)
    norms: dict[str, NormKind] = field(default_factory=dict)  # FQN -> kind, every norm inside the unit
    used: bool = True  # False for vision layers after the feature layer (their output feeds nothing)

    @property
    def label(self) -> str:
        return f"{self.stack}.{self.index}" if self.stack != "projector" else "projector"

    def rel(self, fqn: str) -> str:
        """`fqn` relative to the unit's module (for `get_submodule` on the unit)."""
        if not fqn.startswith(self.name + "."):
            raise ValueError(f"{fqn} is not inside {self.name}")
        return fqn[len(self.name) + 1:]


@dataclass(eq=False)
class Stack:
    """One part of the model: its units in forward order."""

    name: str  # "vision" | "projector" | "lm"
    root: str  # FQN of the part (the vision tower, the projector, the language model)
    units: list[Unit]
    final_norm: str | None = None  # FQN of the norm after the last unit whose output the model reads (LM)

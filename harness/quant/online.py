"""Online input transforms: a Hadamard a layer applies to its input at run time, whatever module the layer is.

QuaRot's rotation folds most of its orthogonal matrices into weights, but two cannot be folded: the Hadamard on
the input of `down_proj` (after the SiLU gate) and the one across heads before `o_proj`. They run online, and a
quantized replacement of the linear must keep them and apply them *before* it quantizes its input (a per-token
4-bit quantizer must see the rotated activations: that is the point of rotating).

An `OnlineHadamard` is attached to a module as a forward pre-hook (registered first, so every observer hook a
method adds later, e.g. a calibration recorder or GPTQ's Hessian, sees the transformed input) and remembered on
the module. `carry_online_transform(old, new)` moves it to the module that replaces a layer: `set_submodule` and
the packed-kernel converter call it, so QLinear, LoRC, NF4, GPTQ's, Q-VLM's and aespa's modules and the packed
kernels all keep it without knowing about it. A wrapper that holds the old module as a child gets the transform
itself and the child loses it (applied once, at the outermost module of the layer's name). A checkpoint records
the transforms by module name (`online_transforms`) and re-attaches them when it loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from qvlm_harness.errors import HarnessError
from qvlm_harness.quant.hadamard import hadamard_matrix, hadamard_transform

_ATTR = "_qvlm_online_transform"


@dataclass(frozen=True)
class OnlineHadamard:
    """``x -> x T`` on the last dimension with ``T = H_order (x) I_stride``: a normalised Hadamard across `order`
    blocks of `stride` channels (stride 1: over every channel; stride = head_dim: across attention heads).
    Computed by the fast Walsh-Hadamard transform in float32, returned in the input's dtype."""

    order: int
    stride: int = 1

    @property
    def width(self) -> int:
        return self.order * self.stride

    def apply(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.width:
            raise HarnessError(f"an online Hadamard of width {self.width} got an input of width {x.shape[-1]}")
        if self.stride == 1:
            return hadamard_transform(x, self.order)
        lead = x.shape[:-1]
        y = x.reshape(*lead, self.order, self.stride).transpose(-1, -2)
        return hadamard_transform(y, self.order).transpose(-1, -2).reshape(*lead, self.width)

    def matrix(self) -> Tensor:
        """The dense T (float64), for folding its inverse into the layer's weight offline."""
        return torch.kron(hadamard_matrix(self.order), torch.eye(self.stride, dtype=torch.float64))

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if not args:
            raise HarnessError(f"{type(module).__name__} with an online Hadamard was called without a positional "
                               "input")
        return (self.apply(args[0]), *args[1:]), kwargs

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "hadamard", "order": self.order, "stride": self.stride}

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> OnlineHadamard:
        if not isinstance(data, dict) or data.get("kind") != "hadamard":
            raise HarnessError(f"{where}: unknown online transform {data!r}; re-run harness quantize")
        try:
            return cls(int(data["order"]), int(data.get("stride", 1)))
        except (KeyError, TypeError, ValueError):
            raise HarnessError(f"{where}: malformed online transform {data!r}; re-run harness quantize") from None


def online_transform(module: nn.Module | None) -> OnlineHadamard | None:
    """The online transform attached to `module` (None when it has none)."""
    return None if module is None else module.__dict__.get(_ATTR)


def detach_online_transform(module: nn.Module) -> OnlineHadamard | None:
    """Remove `module`'s online transform (hook and record); returns it."""
    t = module.__dict__.pop(_ATTR, None)
    if t is None:
        return None
    for key, hook in list(module._forward_pre_hooks.items()):
        if hook is t:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
    return t


def attach_online_transform(module: nn.Module, transform: OnlineHadamard) -> None:
    """Make `module` apply `transform` to its input before anything else (replacing a transform it had)."""
    detach_online_transform(module)
    module.register_forward_pre_hook(transform, prepend=True, with_kwargs=True)
    module.__dict__[_ATTR] = transform


def carry_online_transform(old: nn.Module | None, new: nn.Module) -> None:
    """`new` replaces `old` at one name: it takes over `old`'s online transform, which no module inside `new`
    keeps (a wrapper of the old module applies it once, before its whole computation)."""
    t = online_transform(old)
    if t is None or old is new:
        return
    for m in new.modules():
        detach_online_transform(m)
    attach_online_transform(new, t)


def online_transforms(model: nn.Module) -> dict[str, OnlineHadamard]:
    """FQN -> online transform of every module of `model` that has one."""
    return {name: t for name, m in model.named_modules() if (t := online_transform(m)) is not None}

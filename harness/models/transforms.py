"""Function-preserving transforms through the seam: per-channel scale folding, recorded so it can be replayed.

`fold_scales` divides a producer's output channels by ``s`` and multiplies its consumers' input columns by ``s``
(``W diag(s) (y / s) = W y``), which leaves the float model unchanged provided the producer's output really is
divided by ``s``. For a norm that depends on what it computes (`NormKind`):

* layernorm ``n * w + b``: ``w / s`` and ``b / s``;
* rmsnorm ``n * w``: ``w / s``;
* rmsnorm_offset ``n * (1 + w)``: ``(1 + w) / s - 1`` (dividing ``w`` alone would be wrong: Gemma);
* a linear producer: its output rows and bias ``/ s``.

A norm class the seam does not know is refused. Every fold a method makes on an adapter is appended to the
adapter's transform log (`Transform`: op, targets, scales); `replay_transforms(log, adapter)` applies a log to
another model, so a check can run a method's transforms alone on a fresh float model and compare outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from qvlm_harness.errors import HarnessError
from qvlm_harness.models.architectures import norm_kind
from qvlm_harness.models.structure import NormKind, ScaleGroup

if TYPE_CHECKING:
    from qvlm_harness.models.llava import LlavaAdapter

SCALE = "scale"


def producer_kind(module: nn.Module, fqn: str = "") -> NormKind | None:
    """None for a linear producer, else the norm's kind (an unknown norm class is refused)."""
    if isinstance(module, nn.Linear):
        return None
    return norm_kind(module, fqn)


@torch.no_grad()
def fold_scales(producer: nn.Module, consumers: Sequence[nn.Module], scales: Tensor, *,
                kind: NormKind | None = None, fqn: str = "") -> None:
    """Fold ``1 / scales`` into the producer's output channels and ``scales`` into the consumers' input columns.
    `kind` (when given) must be what the producer's class computes; linear producers have kind None."""
    actual = producer_kind(producer, fqn)
    if kind is not None and actual is not kind:
        raise HarnessError(f"{fqn or type(producer).__name__} computes {actual.value if actual else 'a linear map'}, "
                           f"not {kind.value}: the model changed since it was described")
    w = getattr(producer, "weight", None)
    if w is None:
        raise HarnessError(f"{fqn or type(producer).__name__} has no affine weight to fold scales into")
    s = scales.detach().float().to(w.device)
    if actual is None:
        w.copy_((w.float() / s[:, None]).to(w.dtype))
    elif actual is NormKind.RMSNORM_OFFSET:
        w.copy_(((1.0 + w.float()) / s - 1.0).to(w.dtype))
    else:
        w.copy_((w.float() / s).to(w.dtype))
    bias = getattr(producer, "bias", None)
    if bias is not None:
        bias.copy_((bias.float() / s).to(bias.dtype))
    for lin in consumers:
        if not isinstance(lin, nn.Linear):
            raise HarnessError(f"scales fold into float nn.Linear consumers only, not a {type(lin).__name__}")
        lin.weight.copy_((lin.weight.float() * s[None, :]).to(lin.weight.dtype))


@dataclass(frozen=True)
class Transform:
    """One recorded function-preserving transform: `op` on `targets` (FQNs) with `scales` (float32, CPU)."""

    op: str  # "scale": targets[0] is the producer, targets[1:] its consumers
    targets: tuple[str, ...]
    scales: Tensor
    norm_kind: NormKind | None = None  # the producer's kind when it is a norm

    def apply(self, model: nn.Module) -> None:
        if self.op != SCALE:
            raise HarnessError(f"unknown transform {self.op!r} in a transform log")
        producer, *consumers = self.targets
        fold_scales(model.get_submodule(producer), [model.get_submodule(c) for c in consumers], self.scales,
                    kind=self.norm_kind, fqn=producer)


def fold_group(adapter: LlavaAdapter, group: ScaleGroup, scales: Tensor) -> Transform:
    """Fold `scales` through one scale group of the adapter's model and record it in `adapter.transforms`."""
    t = Transform(SCALE, (group.producer, *group.consumers), scales.detach().float().cpu().clone(), group.norm_kind)
    t.apply(adapter.model)
    adapter.transforms.append(t)
    return t


def replay_transforms(log: Sequence[Transform], adapter: LlavaAdapter) -> None:
    """Apply a recorded transform log (e.g. another adapter's `transforms`) to `adapter`'s model, in order, and
    append it to `adapter.transforms`."""
    for t in log:
        t.apply(adapter.model)
        adapter.transforms.append(t)

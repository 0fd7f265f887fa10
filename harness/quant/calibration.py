"""Calibration capture: record what the inputs of chosen layers look like while a calibration run executes.

Methods need either the raw inputs of a layer (GPTQ's Hessian, AWQ's search, static ranges) or only
streaming statistics (SmoothQuant's per-channel absmax, AWQ's per-channel mean magnitude). Both are done with
forward pre-hooks that are always removed, even if the run raises, so a failed calibration never leaves a
model that silently keeps copying activations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qvlm_harness.errors import HarnessError


def _resolve(model: nn.Module, module_names: Sequence[str]) -> dict[str, nn.Module]:
    if isinstance(module_names, str):
        module_names = [module_names]
    modules = dict(model.named_modules())
    out: dict[str, nn.Module] = {}
    for name in module_names:
        if name not in modules:
            raise HarnessError(f"no module named {name!r} in the model; list names with linear_names(model)")
        out[name] = modules[name]
    return out


def _input_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    """The layer input: first positional tensor, else the `input`/first tensor keyword argument."""
    if args and isinstance(args[0], Tensor):
        return args[0]
    if isinstance(kwargs.get("input"), Tensor):
        return kwargs["input"]
    for value in kwargs.values():
        if isinstance(value, Tensor):
            return value
    return None


@contextmanager
def input_hooks(
    model: nn.Module, module_names: Sequence[str], fn: Callable[[str, Tensor], None]
) -> Iterator[dict[str, nn.Module]]:
    """Call ``fn(name, input)`` before every forward of the named modules while the context is open."""
    modules = _resolve(model, module_names)
    handles = []
    try:
        for name, module in modules.items():

            def hook(_mod: nn.Module, args: tuple, kwargs: dict, _name: str = name) -> None:
                x = _input_tensor(args, kwargs)
                if x is not None:
                    fn(_name, x)

            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield modules
    finally:
        for h in handles:
            h.remove()


def capture_linear_inputs(
    model: nn.Module,
    module_names: Sequence[str],
    run: Callable[[], None],
    max_tokens: int | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Inputs of the named modules during ``run()``, as float32 CPU tensors ``[tokens, in_features]``.

    Every call of a module contributes its input flattened over the leading dims, in call order. With
    `max_tokens`, layers that saw more rows are subsampled to `max_tokens` rows chosen by a generator seeded
    with `seed` (kept in original order), so results are reproducible. Modules never called during the run
    are absent from the result. Hooks are removed even if `run` raises.
    """
    chunks: dict[str, list[Tensor]] = {}

    def record(name: str, x: Tensor) -> None:
        chunks.setdefault(name, []).append(x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float32))

    with torch.no_grad(), input_hooks(model, module_names, record):
        run()
    out: dict[str, Tensor] = {}
    for name, parts in chunks.items():
        rows = torch.cat(parts) if len(parts) > 1 else parts[0]
        if max_tokens is not None and rows.shape[0] > max_tokens:
            gen = torch.Generator().manual_seed(seed)
            idx = torch.randperm(rows.shape[0], generator=gen)[:max_tokens].sort().values
            rows = rows[idx]
        out[name] = rows.contiguous()
    return out


@dataclass
class ActivationStats:
    """Streaming statistics of one layer's input over the calibration tokens (channels = last dim)."""

    abs_sum: Tensor | None = None  # float64 [K]: sum over tokens of |x|
    absmax: Tensor | None = None  # float32 [K]: max over tokens of |x|
    min: float = float("inf")
    max: float = float("-inf")
    tokens: int = 0

    def update(self, x: Tensor) -> None:
        xf = x.detach().reshape(-1, x.shape[-1]).float()
        if xf.shape[0] == 0:
            return
        a = xf.abs()
        s = a.sum(dim=0, dtype=torch.float64).cpu()
        m = a.amax(dim=0).cpu()
        if self.abs_sum is None or self.absmax is None:
            self.abs_sum, self.absmax = s, m
        else:
            if s.shape != self.abs_sum.shape:
                raise ValueError(f"input width changed from {self.abs_sum.shape[0]} to {s.shape[0]}")
            self.abs_sum = self.abs_sum + s
            self.absmax = torch.maximum(self.absmax, m)
        self.min = min(self.min, float(xf.amin()))
        self.max = max(self.max, float(xf.amax()))
        self.tokens += xf.shape[0]

    @property
    def abs_mean(self) -> Tensor:
        """Per-channel mean of |x| (float32 [K])."""
        if self.abs_sum is None:
            raise ValueError("no activations were recorded")
        return (self.abs_sum / max(self.tokens, 1)).float()


def collect_activation_stats(
    model: nn.Module, module_names: Sequence[str], run: Callable[[], None]
) -> dict[str, ActivationStats]:
    """Per-channel abs-mean/absmax, global min/max and token count of each named module's input during
    ``run()``, without keeping the tokens. Modules never called are absent. Hooks are always removed."""
    stats: dict[str, ActivationStats] = {}

    def record(name: str, x: Tensor) -> None:
        stats.setdefault(name, ActivationStats()).update(x)

    with torch.no_grad(), input_hooks(model, module_names, record):
        run()
    return stats

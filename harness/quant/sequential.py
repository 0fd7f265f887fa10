"""Unit-by-unit calibration passes, the way GPTQ and AWQ walk a transformer.

A Llava model is three stacks in forward order (`adapter.stacks()`: the vision tower's layers, the projector as
one unit, the language model's layers). For each stack the calibration set is run through the model once to
capture the stack's entry activations and every unit's own call arguments (`qvlm_harness.models.capture`: the
attention mask and rotary embeddings of a sliding-window layer are not those of a full-attention layer). Then
every unit of the stack is handed to the method (`process(ctx)`) and run on its inputs, and its outputs become
the next unit's inputs: either the outputs of the unit *after* the method processed it
(`propagate="quantized"`: GPTQ, "inputs from the already-quantized prefix") or the float unit's outputs
(`propagate="float"`: AWQ, whose scaling leaves the float function unchanged). A stack is captured when it is
reached, so it sees the already-processed stacks before it.

Token masks: in the language-model stack each batch carries the attention mask of its (left-padded) prompts, so
statistics and Hessians use real tokens only; vision and projector inputs have no padding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from qvlm_harness.models.capture import StackInput, capture_stack_inputs, first_output
from qvlm_harness.models.structure import Unit

if TYPE_CHECKING:
    from qvlm_harness.calibration import CalibrationSet
    from qvlm_harness.models.llava import LlavaAdapter

__all__ = ["Batch", "BlockContext", "first_output", "run_sequential", "valid_rows"]


@dataclass
class Batch:
    """The inputs of one unit call: positional args (hidden states first), keyword args, and the token mask."""

    args: tuple
    kwargs: dict
    mask: Tensor | None = None  # bool [B, T] for LM batches, None when every row is a real token

    @property
    def hidden(self) -> Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, h: Tensor) -> Batch:
        if self.args:
            return Batch((h,) + tuple(self.args[1:]), self.kwargs, self.mask)
        return Batch(self.args, self.kwargs | {"hidden_states": h}, self.mask)

    @classmethod
    def of(cls, si: StackInput, unit: Unit) -> Batch:
        """The call of `unit` on the batch's current activations, with the unit's own recorded arguments."""
        call = si.calls[unit.index]
        return cls((si.hidden, *call.args), call.kwargs, si.mask)


def valid_rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """Rows ``[n, C]`` of a ``[..., C]`` tensor, keeping only real tokens when `mask` matches its leading dims."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(x.device)]
    return x.reshape(-1, x.shape[-1])


@contextmanager
def _hooks(modules: dict[str, nn.Module], fn: Callable[[str, tuple, dict], None]):
    handles = []
    try:
        for name, m in modules.items():
            handles.append(m.register_forward_pre_hook(
                lambda _m, a, k, _n=name: fn(_n, a, k), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class BlockContext:
    """What a method sees of one unit ("block"): its module, its calibration inputs, the linears to quantize and
    the seam's description of it (scale groups, attention, norms)."""

    stack: str
    name: str
    block: nn.Module
    batches: list[Batch]
    linears: list[str]  # FQNs in the model, in module order, restricted to the requested stacks
    model: nn.Module
    unit: Unit | None = None
    report: dict = field(default_factory=dict)

    @property
    def scope(self) -> str:
        """The former name of `stack` (kept so that methods written against it keep working)."""
        return self.stack

    def rel(self, fqn: str) -> str:
        return fqn[len(self.name) + 1:]

    def module(self, fqn: str) -> nn.Module:
        return self.model.get_submodule(fqn)

    def run(self) -> list[Tensor]:
        """The block's hidden-state output for every batch (as the block is now)."""
        with torch.no_grad():
            return [first_output(self.block(*b.args, **b.kwargs)) for b in self.batches]

    def run_with_inputs(self, fqns: Sequence[str], fn: Callable[[str, Tensor, Batch], None]) -> None:
        """Run the block on every batch, calling ``fn(fqn, input, batch)`` before each named sub-module runs."""
        mods = {f: self.module(f) for f in fqns}
        current: dict[str, Batch] = {}

        def record(name: str, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))
            fn(name, x, current["b"])

        with torch.no_grad(), _hooks(mods, record):
            for b in self.batches:
                current["b"] = b
                self.block(*b.args, **b.kwargs)

    def capture_calls(self, fqns: Sequence[str]) -> dict[str, list[tuple[tuple, dict, Batch]]]:
        """Full (args, kwargs) of every call of the named sub-modules while the block runs, with its batch."""
        mods = {f: self.module(f) for f in fqns}
        calls: dict[str, list[tuple[tuple, dict, Batch]]] = {f: [] for f in fqns}
        current: dict[str, Batch] = {}
        with torch.no_grad(), _hooks(mods, lambda n, a, k: calls[n].append((tuple(a), dict(k), current["b"]))):
            for b in self.batches:
                current["b"] = b
                self.block(*b.args, **b.kwargs)
        return calls

    def linear_inputs(self, fqns: Sequence[str]) -> dict[str, Tensor]:
        """Float32 rows ``[tokens, in]`` fed to each named linear (real tokens only) over all batches."""
        chunks: dict[str, list[Tensor]] = {f: [] for f in fqns}
        self.run_with_inputs(fqns, lambda f, x, b: chunks[f].append(valid_rows(x.detach(), b.mask).float()))
        return {f: torch.cat(c) if c else torch.empty(0) for f, c in chunks.items()}

    def input_groups(self) -> list[list[str]]:
        """The block's linears (in scope) grouped by shared input tensor, in call order: e.g. [q, k, v], [o],
        [gate, up], [down]. Layers never called on the first batch come last, one per group."""
        if not self.batches:
            return [[f] for f in self.linears]
        seen: dict[tuple, list[str]] = {}
        order: list[tuple] = []
        alive: list[Tensor] = []  # keeps each input alive: a freed tensor's address can be reused by a later input
        mods = {f: self.module(f) for f in self.linears}
        b = self.batches[0]

        def record(name: str, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))
            alive.append(x)
            key = (x.data_ptr(), tuple(x.shape))
            if key not in seen:
                seen[key] = []
                order.append(key)
            if name not in seen[key]:
                seen[key].append(name)

        with torch.no_grad(), _hooks(mods, record):
            self.block(*b.args, **b.kwargs)
        groups = [seen[k] for k in order]
        called = {n for g in groups for n in g}
        return groups + [[f] for f in self.linears if f not in called]


def run_sequential(adapter: LlavaAdapter, calibration: CalibrationSet, stacks: Sequence[str],
                   linears: Sequence[str], process: Callable[[BlockContext], None], *,
                   propagate: Literal["quantized", "float"] = "quantized", with_targets: bool = True,
                   batch_size: int = 8, log: Callable[[str], None] | None = None) -> list[str]:
    """Walk the requested stacks unit by unit calling `process`; returns the FQNs of `linears` that lay in a unit
    (the others, if any, are the caller's to handle)."""
    model = adapter.model
    encoded = list(adapter.calibration_batches(calibration, with_targets=with_targets, batch_size=batch_size))
    covered: list[str] = []
    for stack in adapter.stacks(stacks):
        entries = capture_stack_inputs(model, [stack], encoded)[stack.name]
        for unit in stack.units:
            mine = [f for f in linears if f.startswith(unit.name + ".")]
            ctx = BlockContext(stack.name, unit.name, unit.module, [Batch.of(si, unit) for si in entries], mine,
                               model, unit)
            outputs = ctx.run() if propagate == "float" and entries else None
            if mine:
                process(ctx)
                covered += mine
            if entries:
                outputs = outputs if outputs is not None else ctx.run()
                entries = [si.with_hidden(o) for si, o in zip(entries, outputs, strict=True)]
            if log:
                log(f"{unit.name}: {len(mine)} linear layers")
    return covered

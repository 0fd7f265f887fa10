"""Stack-input capture: each stack's entry activations and *every unit's own* call arguments, per batch.

Layer-by-layer calibration runs each unit standalone, so it needs what the model passes to that unit: the
attention mask and rotary embeddings. Those are not the same for every layer (Gemma2/3 alternate
sliding-window and full attention with different rotary bases), so they are recorded per unit, never replayed
from the first one.

One forward per batch records them all without paying for the stacks that are only being described: the units
of every requested stack except the last record their arguments with forward pre-hooks and run for real (the
next stack needs their real output); the units of the last requested stack are replaced by pass-throughs that
record their arguments and return their input unchanged, and the forward stops after that stack's last unit.
This is exact because the per-unit arguments (masks, position embeddings) depend only on shapes and positions,
not on the hidden values: `tests/test_seam.py` checks that unit-by-unit propagation from the captured inputs
reproduces the real forward's hidden states on every tiny architecture.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
from torch import Tensor, nn

from qvlm_harness.errors import HarnessError
from qvlm_harness.models.structure import Stack, Unit

# Keyword arguments that carry state across calls (KV caches): a standalone run must not append to one.
_CACHE_KEYS = ("cache", "past_key_values", "past_key_value")


class _Stop(Exception):
    """Raised by the last pass-through to end a capture forward."""


class EncodedBatch(Protocol):
    inputs: dict[str, Tensor]
    n_images: int

    @property
    def token_mask(self) -> Tensor: ...


@dataclass
class UnitCall:
    """The arguments a unit was called with, apart from its hidden-state input."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


@dataclass
class StackInput:
    """One batch at the entry of a stack: the entry activations and the call arguments of each unit."""

    hidden: Tensor
    calls: list  # UnitCall per unit, indexed by `Unit.index`
    mask: Tensor | None = None  # bool [b, T] real tokens (LM); None when every position is real
    batch: int = 0  # index of the calibration batch

    def with_hidden(self, hidden: Tensor) -> StackInput:
        """The same batch with other activations (the output of units run so far)."""
        return replace(self, hidden=hidden)


def first_output(out) -> Tensor:
    """The hidden-state output of a unit or sub-module (HF modules may return tuples or output objects)."""
    if isinstance(out, tuple | list):
        return out[0]
    if isinstance(out, Tensor):
        return out
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        raise HarnessError(f"cannot find the hidden states in a {type(out).__name__} output")
    return hidden


def split_call(args: tuple, kwargs: dict) -> tuple[Tensor, UnitCall]:
    """(hidden-state input, the remaining arguments) of one unit call, with KV caches dropped."""
    kw = dict(kwargs)
    if args and isinstance(args[0], Tensor):
        hidden, rest = args[0], tuple(args[1:])
    else:
        key = next((k for k in ("hidden_states", "input", "x") if isinstance(kw.get(k), Tensor)), None)
        if key is None:
            raise HarnessError("cannot find the hidden-state input of a unit call")
        hidden, rest = kw.pop(key), tuple(args)
    for k in _CACHE_KEYS:
        if k in kw:
            kw[k] = None
    if "use_cache" in kw:
        kw["use_cache"] = False
    return hidden, UnitCall(rest, kw)


def run_unit(unit: Unit, x: Tensor, si: StackInput) -> Tensor:
    """Run one unit standalone on `x` with its own recorded call arguments."""
    call = si.calls[unit.index]
    return first_output(unit.module(x, *call.args, **call.kwargs))


def run_units(units: Sequence[Unit], x: Tensor, si: StackInput) -> Tensor:
    """Run consecutive units of one stack standalone, each with its own call arguments."""
    for u in units:
        x = run_unit(u, x, si)
    return x


def unit_outputs(units: Sequence[Unit], x: Tensor, si: StackInput) -> list[Tensor]:
    """Each of consecutive units' outputs, run standalone from `x` without autograd: the float targets a block
    search reconstructs."""
    outs = []
    with torch.no_grad():
        for u in units:
            x = run_unit(u, x, si)
            outs.append(x)
    return outs


def _reached(stack: Stack, batch: EncodedBatch) -> bool:
    """Whether a batch's forward reaches a stack: text-only batches never run the vision tower or projector."""
    return stack.name == "lm" or batch.n_images > 0


def capture_stack_inputs(model: nn.Module, stacks: Sequence[Stack],
                         batches: Iterable[EncodedBatch]) -> dict[str, list[StackInput]]:
    """Every requested stack's entry activations and per-unit call arguments for each batch that reaches it (see
    the module docstring). `model` is the Llava model (its inner `model.model` is run, without the LM head)."""
    stacks = [s for s in stacks if s.units]
    out: dict[str, list[StackInput]] = {s.name: [] for s in stacks}
    for bi, batch in enumerate(batches):
        here = [s for s in stacks if _reached(s, batch)]
        if here:
            for name, si in _capture_batch(model, here, batch, bi).items():
                out[name].append(si)
    return out


def _capture_batch(model: nn.Module, here: Sequence[Stack], batch: EncodedBatch, bi: int) -> dict[str, StackInput]:
    """One capture forward: pre-hooks on the units of every stack but the last, pass-throughs on the last's."""
    seen: dict[str, StackInput] = {}

    def record(stack: Stack, unit: Unit, args: tuple, kwargs: dict) -> Tensor:
        hidden, call = split_call(args, kwargs)
        si = seen.get(stack.name)
        if si is None:
            mask = batch.token_mask if stack.name == "lm" else None
            si = seen[stack.name] = StackInput(hidden.detach(), [None] * len(stack.units), mask, bi)
        si.calls[unit.index] = call
        return hidden

    def pre_hook(stack: Stack, unit: Unit):
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            record(stack, unit, args, kwargs)

        return hook

    def passthrough(stack: Stack, unit: Unit):
        def forward(*args, **kwargs) -> Tensor:
            hidden = record(stack, unit, args, kwargs)
            if unit is stack.units[-1]:
                raise _Stop
            return hidden

        return forward

    handles = [u.module.register_forward_pre_hook(pre_hook(s, u), with_kwargs=True) for s in here[:-1] for u in s.units]
    last = here[-1]
    patched = [(u.module, u.module.__dict__.get("forward")) for u in last.units]
    for u in last.units:
        u.module.forward = passthrough(last, u)
    try:
        with torch.no_grad():
            model.model(**batch.inputs, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
        for m, previous in patched:
            if previous is None:
                del m.forward  # the instance attribute: the class's forward is back
            else:
                m.forward = previous
    missing = [s.name for s in here if s.name not in seen or any(c is None for c in seen[s.name].calls)]
    if missing:
        raise HarnessError(f"the calibration forward never reached every unit of: {', '.join(missing)}")
    return seen

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

A unit's outputs are taken from the process when it already computed them (`BlockContext.outputs`, set by
`BlockContext.run_grouped` and `BlockContext.run_recording`), so a method that runs the block anyway does not pay
for a second run: GPTQ quantizes a unit group by group in *one* run of the block over the calibration batches
(`run_grouped`: every batch waits at each group until the group is quantized, then goes on through it), and AWQ
records its inputs, the inspected modules' calls and the float outputs in one run (`propagate="recorded"`).

Token masks: in the language-model stack each batch carries the attention mask of its (left-padded) prompts, so
statistics and Hessians use real tokens only; vision and projector inputs have no padding.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from qvlm_harness.errors import HarnessError
from qvlm_harness.models.capture import StackInput, capture_stack_inputs, first_output
from qvlm_harness.models.structure import Unit
from qvlm_harness.quant.pausable import Pausable, current

if TYPE_CHECKING:
    from qvlm_harness.calibration import CalibrationSet
    from qvlm_harness.models.llava import LlavaAdapter

__all__ = ["Batch", "BlockContext", "Recording", "first_output", "run_sequential", "valid_rows"]


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


def _input_of(args: tuple, kwargs: dict) -> Tensor:
    """The tensor a sub-module is called on (first positional argument, else the first tensor keyword)."""
    return args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))


@dataclass
class Recording:
    """What one run of a block over its batches recorded (`BlockContext.run_recording`)."""

    inputs: dict[str, Tensor]  # float32 rows [tokens, in] per linear; linears sharing an input share the tensor
    calls: dict[str, list[tuple[tuple, dict, Batch]]]  # full (args, kwargs) of each call, with its batch
    outputs: list[Tensor]  # the block's hidden-state output per batch


@dataclass
class _Discovery:
    """How a block calls its linears on one batch: groups sharing an input, in call order, and whether every
    linear was called at most once (what a single grouped run needs)."""

    groups: list[list[str]]  # relative names
    called_once: bool


@dataclass
class BlockContext:
    """What a method sees of one unit ("block"): its module, its calibration inputs, the linears to quantize and
    the seam's description of it (scale groups, attention, norms).

    `outputs`: the block's output per batch to propagate, when the process already computed it (`run_grouped`
    sets it: the block as it is after its last group; an AWQ-like process sets the float outputs it recorded);
    `run_sequential` then propagates those instead of running the block again. A process that changes the block
    after `run_grouped` must set it back to None. `group_cache` lets the
    units of one walk share what `input_groups` found for blocks of the same class and linear names."""

    stack: str
    name: str
    block: nn.Module
    batches: list[Batch]
    linears: list[str]  # FQNs in the model, in module order, restricted to the requested stacks
    model: nn.Module
    unit: Unit | None = None
    report: dict = field(default_factory=dict)
    outputs: list[Tensor] | None = None
    group_cache: dict | None = None

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
        current_batch: dict[str, Batch] = {}

        def record(name: str, args: tuple, kwargs: dict) -> None:
            fn(name, _input_of(args, kwargs), current_batch["b"])

        with torch.no_grad(), _hooks(mods, record):
            for b in self.batches:
                current_batch["b"] = b
                self.block(*b.args, **b.kwargs)

    def capture_calls(self, fqns: Sequence[str]) -> dict[str, list[tuple[tuple, dict, Batch]]]:
        """Full (args, kwargs) of every call of the named sub-modules while the block runs, with its batch."""
        return self.run_recording((), fqns).calls

    def linear_inputs(self, fqns: Sequence[str]) -> dict[str, Tensor]:
        """Float32 rows ``[tokens, in]`` fed to each named linear (real tokens only) over all batches."""
        return self.run_recording(fqns, ()).inputs

    def run_recording(self, inputs_of: Sequence[str], calls_of: Sequence[str]) -> Recording:
        """One run of the block over every batch recording the float32 input rows (real tokens only) of
        `inputs_of`, the full calls of `calls_of` and the block's outputs. Linears reading the same tensor get one
        shared rows tensor (q/k/v: one copy, not three; treat them as read-only). A process that propagates
        these outputs (``propagate="recorded"``) sets ``ctx.outputs = recording.outputs`` itself."""
        mods = {f: self.module(f) for f in dict.fromkeys([*inputs_of, *calls_of])}
        want_inputs, want_calls = set(inputs_of), set(calls_of)
        chunks: dict[str, list[Tensor]] = {f: [] for f in inputs_of}
        calls: dict[str, list[tuple[tuple, dict, Batch]]] = {f: [] for f in calls_of}
        seen: dict[tuple, Tensor] = {}  # (data_ptr, shape) of an input of this batch -> its rows
        alive: list[Tensor] = []  # keeps this batch's inputs alive, so that an address is never reused
        current_batch: dict[str, Batch] = {}

        def record(name: str, args: tuple, kwargs: dict) -> None:
            b = current_batch["b"]
            if name in want_calls:
                calls[name].append((tuple(args), dict(kwargs), b))
            if name in want_inputs:
                x = _input_of(args, kwargs)
                key = (x.data_ptr(), tuple(x.shape), x.dtype)
                if key not in seen:
                    alive.append(x)
                    seen[key] = valid_rows(x.detach(), b.mask).float()
                chunks[name].append(seen[key])

        outputs = []
        with torch.no_grad(), _hooks(mods, record):
            for b in self.batches:
                current_batch["b"] = b
                seen.clear()
                alive.clear()
                outputs.append(first_output(self.block(*b.args, **b.kwargs)))
        joined: dict[tuple, Tensor] = {}  # the same list of chunks (by identity) -> one concatenation
        inputs = {}
        for f, c in chunks.items():
            key = tuple(id(t) for t in c)
            if key not in joined:
                joined[key] = torch.cat(c) if c else torch.empty(0)
            inputs[f] = joined[key]
        return Recording(inputs, calls, outputs)

    def _discover(self) -> _Discovery:
        """Groups of the block's linears sharing an input, found on the first batch (or taken from
        `group_cache` for a block of the same class and linear names: the call structure is the class's code)."""
        rels = tuple(self.rel(f) for f in self.linears)
        key = (type(self.block), rels)
        if self.group_cache is not None and key in self.group_cache:
            return self.group_cache[key]
        seen: dict[tuple, list[str]] = {}
        order: list[tuple] = []
        alive: list[Tensor] = []  # keeps each input alive: a freed tensor's address can be reused by a later input
        counts: dict[str, int] = {}
        mods = {f: self.module(f) for f in self.linears}
        b = self.batches[0]

        def record(name: str, args: tuple, kwargs: dict) -> None:
            x = _input_of(args, kwargs)
            alive.append(x)
            counts[name] = counts.get(name, 0) + 1
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
        groups += [[f] for f in self.linears if f not in called]
        found = _Discovery([[self.rel(f) for f in g] for g in groups], all(c == 1 for c in counts.values()))
        if self.group_cache is not None:
            self.group_cache[key] = found
        return found

    def input_groups(self) -> list[list[str]]:
        """The block's linears (in scope) grouped by shared input tensor, in call order: e.g. [q, k, v], [o],
        [gate, up], [down]. Layers never called on the first batch come last, one per group."""
        if not self.batches:
            return [[f] for f in self.linears]
        return [[f"{self.name}.{r}" for r in g] for g in self._discover().groups]

    def _waiting_forward(self, i: int, fqn: str, module: nn.Module, previous, solved: list[bool],
                         see: Callable[[int, Tensor, Batch], None]):
        """The forward `run_grouped` installs on group `i`'s first member: a batch of the run shows it its input
        and pauses until the group is solved, then goes on through whatever module is now at `fqn`."""
        def forward(*args, **kwargs):
            p = current()
            if p is not None and solved[i]:
                raise HarnessError(f"{self.name} called {fqn} out of the order of its first batch; the grouped "
                                   "run needs the same call order on every batch")
            if p is not None:  # a batch of this run (a call from `solve` itself passes straight through)
                see(i, _input_of(args, kwargs), p.tag)
                p.pause(i)
            now = self.model.get_submodule(fqn)
            if now is module:  # solved in place: run the module's own forward
                own = previous or types.MethodType(type(module).forward, module)
                return own(*args, **kwargs)
            return now(*args, **kwargs)

        return forward

    def run_grouped(self, groups: Sequence[Sequence[str]], see: Callable[[int, Tensor, Batch], None],
                    solve: Callable[[int], None]) -> list[Tensor]:
        """Quantize the block group by group, each group seeing the inputs of the already-solved groups before it,
        in one run of the block over the batches; returns (and keeps in `self.outputs`) the block's outputs.

        `groups` are `input_groups()` (members share their input). Each batch's forward stops at every group's
        first member until all batches got there; ``see(i, x, batch)`` is called with the group's input of every
        batch, then ``solve(i)`` once (it may install new modules at the members' FQNs), then every batch goes on
        through the modules now installed. This computes exactly what running the block once per group (for its
        inputs) and once more for the outputs computes, in one run instead of ``len(groups) + 1``. A group no
        batch reaches is solved in its turn with nothing seen. Blocks that call a linear more than once per
        forward get exactly those runs instead (the single run would miss the later calls)."""
        groups = [list(g) for g in groups]
        if not self.batches or not self._discover().called_once:
            return self._run_grouped_by_passes(groups, see, solve)
        solved = [False] * len(groups)
        patched: list[tuple[nn.Module, object]] = []

        for i, g in enumerate(groups):
            m = self.module(g[0])
            previous = m.__dict__.get("forward")
            patched.append((m, previous))
            m.forward = self._waiting_forward(i, g[0], m, previous, solved, see)
        runs = [Pausable(lambda _p, b=b: first_output(self.block(*b.args, **b.kwargs)), tag=b) for b in self.batches]
        try:
            for r in runs:
                r.step()
            for i in range(len(groups)):
                solve(i)
                solved[i] = True
                for r in runs:
                    if r.at == i:
                        r.step()
        finally:
            for r in runs:
                r.close()
            for m, previous in patched:
                if previous is None:
                    del m.forward  # the instance attribute: the class's forward is back
                else:
                    m.forward = previous
        if not all(r.done for r in runs):
            raise HarnessError(f"{self.name}: a batch stopped at a group after every group was solved")
        self.outputs = [r.result for r in runs]
        return self.outputs

    def _run_grouped_by_passes(self, groups: list[list[str]], see: Callable[[int, Tensor, Batch], None],
                               solve: Callable[[int], None]) -> list[Tensor]:
        """`run_grouped`'s result the long way: one run per group for its inputs, one for the outputs."""
        for i, g in enumerate(groups):
            self.run_with_inputs(g[:1], lambda _f, x, b, i=i: see(i, x, b))
            solve(i)
        self.outputs = self.run()
        return self.outputs


def run_sequential(adapter: LlavaAdapter, calibration: CalibrationSet, stacks: Sequence[str],
                   linears: Sequence[str], process: Callable[[BlockContext], None], *,
                   propagate: Literal["quantized", "float", "recorded"] = "quantized", with_targets: bool = True,
                   batch_size: int = 8, log: Callable[[str], None] | None = None) -> list[str]:
    """Walk the requested stacks unit by unit calling `process`; returns the FQNs of `linears` that lay in a unit
    (the others, if any, are the caller's to handle).

    What the next unit receives: ``"quantized"``, the unit's outputs after the process (`ctx.outputs` when the
    process computed them, else one more run); ``"float"``, the float unit's outputs (one run before the process);
    ``"recorded"``, the `ctx.outputs` the process recorded (e.g. by `run_recording` on the float block; a unit
    without linears in scope is run as it is)."""
    model = adapter.model
    encoded = list(adapter.calibration_batches(calibration, with_targets=with_targets, batch_size=batch_size))
    covered: list[str] = []
    group_cache: dict = {}
    for stack in adapter.stacks(stacks):
        entries = capture_stack_inputs(model, [stack], encoded)[stack.name]
        for unit in stack.units:
            mine = [f for f in linears if f.startswith(unit.name + ".")]
            ctx = BlockContext(stack.name, unit.name, unit.module, [Batch.of(si, unit) for si in entries], mine,
                               model, unit, group_cache=group_cache)
            outputs = ctx.run() if propagate == "float" and entries else None
            if mine:
                process(ctx)
                covered += mine
                if propagate == "recorded" and entries and ctx.outputs is None:
                    raise HarnessError(f"{unit.name}: the process recorded no outputs to propagate")
            if entries:
                if outputs is None:
                    outputs = ctx.outputs if ctx.outputs is not None else ctx.run()
                entries = [si.with_hidden(o) for si, o in zip(entries, outputs, strict=True)]
            if log:
                log(f"{unit.name}: {len(mine)} linear layers")
    return covered

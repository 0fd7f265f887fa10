"""Block-by-block calibration passes, the way GPTQ and AWQ walk a transformer.

A Llava model is three stages in forward order: the vision tower's encoder layers, the projector (one block)
and the language model's decoder layers. For each stage the calibration set is run through the whole model
(vision tower and projector already processed) until the stage's first block is reached; its inputs
(positional and keyword arguments, per batch) are kept and the forward is stopped there. Then every block of
the stage is handed to the method (`process(ctx)`) and run on those inputs, and its outputs become the next
block's inputs: either the outputs of the block *after* the method processed it (`propagate="quantized"`: GPTQ,
"inputs from the already-quantized prefix") or the float block's outputs (`propagate="float"`: AWQ, whose
scaling leaves the float function unchanged).

Token masks: in the language-model stage each batch carries the attention mask of its (left-padded) prompts, so
statistics and Hessians use real tokens only; vision and projector inputs have no padding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from qvlm_harness.errors import HarnessError

if TYPE_CHECKING:
    from qvlm_harness.calibration import CalibrationSet
    from qvlm_harness.models.llava import LlavaAdapter

STAGE_PREFIXES = {"vision": "model.vision_tower", "projector": "model.multi_modal_projector",
                  "lm": "model.language_model"}


class _Stop(Exception):
    """Raised by the capture hook to end a calibration forward once a stage's first block is reached."""


@dataclass
class Batch:
    """The inputs of one block call: positional args (hidden states first), keyword args, and the token mask."""

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


def valid_rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """Rows ``[n, C]`` of a ``[..., C]`` tensor, keeping only real tokens when `mask` matches its leading dims."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(x.device)]
    return x.reshape(-1, x.shape[-1])


def first_output(out) -> Tensor:
    """The hidden-state output of a block or sub-module (HF modules may return tuples)."""
    if isinstance(out, tuple | list):
        return out[0]
    if isinstance(out, Tensor):
        return out
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        raise HarnessError(f"cannot find the hidden states in a {type(out).__name__} block output")
    return hidden


@dataclass
class Stage:
    scope: str
    blocks: list[tuple[str, nn.Module]]


def find_stages(model: nn.Module, scopes: Sequence[str]) -> list[Stage]:
    """The stages of a Llava model in forward order, restricted to `scopes`.

    Vision and language model: the `nn.ModuleList` of layers holding most parameters under the stage prefix
    (CLIP `encoder.layers`, DINOv2 `encoder.layer`, Llama `layers`); projector: the projector module itself.
    """
    stages = []
    for scope in ("vision", "projector", "lm"):
        if scope not in scopes:
            continue
        prefix = STAGE_PREFIXES[scope]
        try:
            root = model.get_submodule(prefix)
        except AttributeError:
            raise HarnessError(f"the model has no {prefix} (not a transformers>=4.52 Llava layout)") from None
        if scope == "projector":
            stages.append(Stage(scope, [(prefix, root)]))
            continue
        best, best_params = None, -1
        for name, m in root.named_modules():
            if isinstance(m, nn.ModuleList) and len(m):
                n = sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers())
                if n > best_params:
                    best, best_params = (name, m), n
        if best is None:
            raise HarnessError(f"cannot find the layer list of {prefix}")
        name, layers = best
        stages.append(Stage(scope, [(f"{prefix}.{name}.{i}", blk) for i, blk in enumerate(layers)]))
    return stages


def calibration_batches(adapter: LlavaAdapter, calibration: CalibrationSet, *, with_targets: bool = True,
                        batch_size: int = 8) -> Iterator[dict[str, Tensor]]:
    """Processor outputs of the calibration requests (prompt + target answer + EOS when `with_targets`)."""
    reqs = calibration.requests
    for start in range(0, len(reqs), batch_size):
        chunk = reqs[start:start + batch_size]
        suffixes = None
        if with_targets:
            end = adapter.tokenizer.eos_token or ""
            suffixes = [t + end for t in calibration.targets[start:start + batch_size]]
        yield adapter.encode(chunk, suffixes=suffixes)


def capture_block_inputs(adapter: LlavaAdapter, calibration: CalibrationSet, block: nn.Module, *,
                         lm_mask: bool, with_targets: bool = True, batch_size: int = 8) -> list[Batch]:
    """Inputs of `block` for every calibration batch that reaches it, stopping each forward right there."""
    batches: list[Batch] = []
    state: dict[str, Tensor | None] = {"mask": None}

    def hook(_m, args, kwargs):
        batches.append(Batch(tuple(args), dict(kwargs), state["mask"]))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in calibration_batches(adapter, calibration, with_targets=with_targets,
                                             batch_size=batch_size):
                state["mask"] = batch["attention_mask"].bool() if lm_mask else None
                with suppress(_Stop):
                    adapter.model(**batch, use_cache=False)
    finally:
        handle.remove()
    return batches


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
    """What a method sees of one block: its module, its calibration inputs and the linears to quantize."""

    scope: str
    name: str
    block: nn.Module
    batches: list[Batch]
    linears: list[str]  # FQNs in the model, in module order, restricted to the requested scopes
    model: nn.Module
    report: dict = field(default_factory=dict)

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


def run_sequential(adapter: LlavaAdapter, calibration: CalibrationSet, scopes: Sequence[str],
                   linears: Sequence[str], process: Callable[[BlockContext], None], *,
                   propagate: Literal["quantized", "float"] = "quantized", with_targets: bool = True,
                   batch_size: int = 8, log: Callable[[str], None] | None = None) -> list[str]:
    """Walk the stages block by block calling `process`; returns the FQNs of `linears` that lay in a block
    (the others, if any, are the caller's to handle)."""
    model = adapter.model
    covered: list[str] = []
    for stage in find_stages(model, scopes):
        batches = capture_block_inputs(adapter, calibration, stage.blocks[0][1], lm_mask=stage.scope == "lm",
                                       with_targets=with_targets, batch_size=batch_size)
        for name, block in stage.blocks:
            mine = [f for f in linears if f.startswith(name + ".")]
            ctx = BlockContext(stage.scope, name, block, batches, mine, model)
            outputs = ctx.run() if propagate == "float" and batches else None
            if mine:
                process(ctx)
                covered += mine
            if batches:
                outputs = outputs if outputs is not None else ctx.run()
                batches = [b.with_hidden(o) for b, o in zip(batches, outputs, strict=True)]
            if log:
                log(f"{name}: {len(mine)} linear layers")
    return covered

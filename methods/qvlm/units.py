"""Units and calibration data: what Q-VLM searches over, and the activations it searches with.

A *unit* is one transformer layer of the visual encoder or of the language model, or the multimodal projector,
in forward order. Units are found structurally (the longest `nn.ModuleList` of linear-bearing layers under
``model.vision_tower`` / ``model.language_model``), so DINOv2 (``encoder.layer.N``), CLIP/SigLIP
(``vision_model.encoder.layers.N``) and Llama-family LMs (``layers.N``) all work without a table of names.

Activations are captured at the *entry* of each stack (first vision layer, projector, first LM layer) with
forward pre-hooks that stop the forward pass once everything needed is recorded, and then propagated unit by
unit: a unit is run standalone with the positional/keyword arguments its stack passed to the first unit
(attention masks, rotary embeddings), which are the same for every layer of a stack.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from qvlm_harness.errors import HarnessError

STACKS = ("vision", "projector", "lm")


@dataclass
class Unit:
    name: str  # fully qualified module name
    stack: str  # "vision" | "projector" | "lm"
    index: int  # position within its stack
    module: nn.Module
    used: bool = True  # False for vision layers after the feature layer (their output feeds nothing)

    @property
    def label(self) -> str:
        return f"{self.stack}.{self.index}" if self.stack != "projector" else "projector"


def _has_linear(m: nn.Module) -> bool:
    return any(isinstance(c, nn.Linear) for c in m.modules())


def _layer_list(root: nn.Module, prefix: str) -> tuple[str, nn.ModuleList] | None:
    best: tuple[str, nn.ModuleList] | None = None
    for name, m in root.named_modules():
        is_stack = isinstance(m, nn.ModuleList) and len(m) > 0 and all(_has_linear(c) for c in m)
        if is_stack and (best is None or len(m) > len(best[1])):
            best = (f"{prefix}.{name}" if name else prefix, m)
    return best


def _used_vision_layers(config, n_layers: int) -> int:
    """How many vision layers feed the projector: hidden_states[k] is the output of k layers (0 = embeddings)."""
    idx = getattr(config, "vision_feature_layer", -1)
    idxs = idx if isinstance(idx, list | tuple) else [idx]
    return max(int(i) % (n_layers + 1) for i in idxs)


def find_units(model: nn.Module) -> dict[str, list[Unit]]:
    """The units of a Llava model per stack, in forward order."""
    inner = model.model
    out: dict[str, list[Unit]] = {s: [] for s in STACKS}
    vision = _layer_list(inner.vision_tower, "model.vision_tower")
    if vision is not None:
        name, layers = vision
        n_used = _used_vision_layers(model.config, len(layers))
        out["vision"] = [Unit(f"{name}.{i}", "vision", i, m, used=i < n_used) for i, m in enumerate(layers)]
    proj = getattr(inner, "multi_modal_projector", None)
    if proj is not None and _has_linear(proj):
        out["projector"] = [Unit("model.multi_modal_projector", "projector", 0, proj)]
    lm = _layer_list(inner.language_model, "model.language_model")
    if lm is None:
        raise HarnessError("cannot find the language model's decoder layers; Q-VLM supports Llava models whose "
                           "language model keeps its layers in one nn.ModuleList (Llama family)")
    name, layers = lm
    out["lm"] = [Unit(f"{name}.{i}", "lm", i, m) for i, m in enumerate(layers)]
    return out


def linears_of(unit: Unit) -> list[tuple[str, nn.Linear]]:
    """(FQN, linear) of the quantizable linears inside a unit, in module order."""
    return [(f"{unit.name}.{n}", m) for n, m in unit.module.named_modules() if isinstance(m, nn.Linear)]


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


# -- calibration batches ----------------------------------------------------------------------------------------


@dataclass
class CalibBatch:
    """One encoded calibration batch (prompt + target answer + EOS, left-padded) and where its answers are."""

    inputs: dict[str, Tensor]
    answer_pos: Tensor  # bool [b, T]: positions whose *next* token belongs to the answer
    answer_ids: Tensor  # long [n]: those next tokens, in row-major order of answer_pos
    n_samples: int
    n_images: int

    @property
    def token_mask(self) -> Tensor:
        return self.inputs["attention_mask"].to(torch.bool)


def build_batches(adapter, calibration, batch_size: int) -> list[CalibBatch]:
    """Encode the calibration requests with their target answers, in fixed order, `batch_size` per batch."""
    eos = adapter.tokenizer.eos_token or ""
    batches: list[CalibBatch] = []
    reqs, targets = calibration.requests, calibration.targets
    for start in range(0, len(reqs), batch_size):
        chunk = reqs[start:start + batch_size]
        full = adapter.encode(chunk, suffixes=[t + eos for t in targets[start:start + batch_size]])
        prompt = adapter.encode(chunk)
        n_full = full["attention_mask"].sum(dim=1)
        n_prompt = prompt["attention_mask"].sum(dim=1)
        ids = full["input_ids"]
        t = ids.shape[1]
        pos = torch.zeros_like(ids, dtype=torch.bool)
        for i in range(len(chunk)):
            n_ans = int((n_full[i] - n_prompt[i]).clamp(min=1, max=n_full[i] - 1))
            pos[i, t - n_ans - 1:t - 1] = True  # left padding: the answer ends the row
        answer_ids = ids[:, 1:][pos[:, :-1]]
        n_images = int(full["pixel_values"].shape[0]) if "pixel_values" in full else 0
        batches.append(CalibBatch(full, pos, answer_ids, len(chunk), n_images))
    return batches


# -- capture and standalone execution ------------------------------------------------------------------------------


class _Stop(Exception):
    pass


@dataclass
class StackInput:
    """The entry activations of one stack for one calibration batch, and the call arguments of its units."""

    hidden: Tensor
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    mask: Tensor | None = None  # bool [b, T] valid tokens (LM); None = all valid
    batch: int = 0  # index of the calibration batch


def _split_call(args: tuple, kwargs: dict) -> tuple[Tensor, tuple, dict]:
    if args and isinstance(args[0], Tensor):
        return args[0], tuple(args[1:]), dict(kwargs)
    kw = dict(kwargs)
    for key in ("hidden_states", "input", "x"):
        if isinstance(kw.get(key), Tensor):
            return kw.pop(key), tuple(args), kw
    raise HarnessError("cannot find the hidden-state input of a unit call")


def capture_stack_inputs(model: nn.Module, batches: Sequence[CalibBatch], stacks: Sequence[str],
                         units: dict[str, list[Unit]]) -> dict[str, list[StackInput]]:
    """Run the model on each batch until the first unit of every requested stack has been called, recording its
    input and call arguments. Stacks a batch never reaches (vision for text-only batches) get no entry."""
    wanted = [s for s in stacks if units.get(s)]
    out: dict[str, list[StackInput]] = {s: [] for s in wanted}
    for bi, batch in enumerate(batches):
        here = [s for s in wanted if s == "lm" or batch.n_images > 0]
        if not here:
            continue
        seen: dict[str, StackInput] = {}

        def hook_for(stack: str, bi: int = bi, batch: CalibBatch = batch, here: list[str] = here,
                     seen: dict[str, StackInput] = seen):
            def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
                if stack in seen:
                    return
                hidden, rest, kw = _split_call(args, kwargs)
                kw.pop("past_key_values", None)
                if "use_cache" in kw:
                    kw["use_cache"] = False
                seen[stack] = StackInput(hidden.detach(), rest, kw, batch.token_mask if stack == "lm" else None, bi)
                if all(s in seen for s in here):
                    raise _Stop

            return hook

        handles = [units[s][0].module.register_forward_pre_hook(hook_for(s), with_kwargs=True) for s in here]
        try:
            with torch.no_grad():
                model.model(**batch.inputs, use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        for s, value in seen.items():
            out[s].append(value)
    return out


def run_unit(unit: Unit, x: Tensor, si: StackInput) -> Tensor:
    """Run one unit standalone on `x` with the stack's call arguments."""
    out = unit.module(x) if unit.stack == "projector" else unit.module(x, *si.args, **si.kwargs)
    return out[0] if isinstance(out, tuple) else out


def run_units(units: Sequence[Unit], x: Tensor, si: StackInput) -> Tensor:
    for u in units:
        x = run_unit(u, x, si)
    return x


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Disable gradients of a module's parameters for the duration (restored afterwards)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)

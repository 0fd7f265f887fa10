"""QuaRot's rotation of the language model through the seam: the float function unchanged, the activations
spread out, so that per-token 4-bit activations survive.

`rotate_model(adapter, kind, seed)` on the language model (the vision tower is not rotated: its LayerNorms do
not commute with a rotation without SliceGPT's centring, which this module does not do):

1. fold every RMSNorm's weight into the linears that read it (``W diag(w)``; Gemma's ``(1 + w)`` likewise) and
   reset the norm to the identity scale; the final norm folds into the LM head;
2. rotate the residual stream by an orthogonal Q (``hadamard``: ``diag(random signs) H_d``; ``random``: a
   Haar-random orthogonal matrix from a QR): the embedding ``E <- E Q``, every linear reading the residual
   (q/k/v, gate/up, the LM head: ``W <- W Q``), every linear writing it (o_proj, down_proj and the projector's
   last linear, whose output is the image tokens' embedding: ``W <- Q^T W``, ``b <- b Q``); a tied embedding /
   LM head pair is untied first (the two now need different matrices);
3. per attention head, ``v_proj``'s output rows and ``o_proj``'s input columns by a head-sized orthogonal matrix
   (offline, exact: attention mixes value vectors linearly);
4. online Hadamards (`qvlm_harness.quant.online`) on the input of ``down_proj`` (over its whole width) and of
   ``o_proj`` (across heads, ``H_heads (x) I_head_dim``; over the whole width when the head count has no
   Hadamard, e.g. SmolLM2's 9 heads), each with its matching matrix folded into the layer's weight
   (``W <- W T``), so the float function is unchanged and the layer's input quantizer sees rotated inputs.

Everything is computed in float64 and cast back to each weight's dtype. The rotation is recorded in the adapter's
transform log (`RotationTransform`), so it can be replayed alone on a fresh model (the transforms-alone check).
`rotation_problem(stacks, kind)` says, from the seam's description alone (a meta skeleton will do), why a model
cannot be rotated: LayerNorm in the language model, norms between a branch's output linear and the residual
(Gemma2/3's sandwich norms: ``(1 + w) * x / rms(x)`` on o_proj's output does not commute with Q), or a width
without a Hadamard construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from qvlm_harness.errors import HarnessError
from qvlm_harness.models.architectures import describe_model, norm_kind
from qvlm_harness.models.structure import NormKind, Stack, Unit
from qvlm_harness.quant.hadamard import has_hadamard, random_hadamard, random_orthogonal
from qvlm_harness.quant.online import OnlineHadamard, attach_online_transform

if TYPE_CHECKING:
    from qvlm_harness.models.llava import LlavaAdapter

KINDS = ("hadamard", "random")
ROTATE_CHOICES = ("none", *KINDS)
ROTATE = "rotate"
COVERS = ("the language model's residual stream, its attention heads and its down_proj inputs (plus the projector's "
          "output); the vision tower is not rotated")


# -- what can be rotated -----------------------------------------------------------------------------------------------
def _width(module: nn.Module, attr: str) -> int:
    value = getattr(module, attr, None)
    return int(value if value is not None else module.weight.shape[0 if attr == "out_features" else 1])


def _lm(stacks: Sequence[Stack]) -> Stack:
    return next(s for s in stacks if s.name == "lm")


def _branch_norms(unit: Unit) -> list[str]:
    """Norms of a unit that are neither a group's producer (the pre-norms) nor inside the attention (q/k norms):
    norms on a branch's output, between its last linear and the residual add."""
    producers = {g.producer for g in unit.scale_groups if g.producer_kind == "norm"}
    attn = unit.attention.module + "." if unit.attention else "\0"
    return [n for n in unit.norms if n not in producers and not n.startswith(attn)]


def online_o_proj(heads: int, head_dim: int) -> OnlineHadamard | None:
    """The online Hadamard before o_proj: across heads when the head count has one, else over the whole width."""
    if has_hadamard(heads):
        return OnlineHadamard(heads, head_dim)
    if has_hadamard(heads * head_dim):
        return OnlineHadamard(heads * head_dim)
    return None


def rotation_problem(stacks: Sequence[Stack], kind: str) -> str | None:
    """None when `kind` can rotate the model the stacks describe (they must include "lm"), else the reason."""
    if kind not in KINDS:
        return f"unknown rotation {kind!r}; choose one of {', '.join(ROTATE_CHOICES)}"
    lm = _lm(stacks)
    if not lm.units:
        return "the language model has no layers"
    for unit in lm.units:
        kinds = {k for k in unit.norms.values()}
        if NormKind.LAYERNORM in kinds:
            return (f"{unit.arch} uses LayerNorm, whose mean subtraction does not commute with a rotation "
                    "(SliceGPT's centring is not implemented)")
        branch = _branch_norms(unit)
        if branch:
            return (f"{unit.arch} normalises its branch outputs ({branch[0].rpartition('.')[2]}) between "
                    "o_proj/down_proj and the residual: a rotation cannot be folded through that norm's weight")
        if unit.attention is None or len(unit.scale_groups) < 2:
            return f"{unit.arch} is not a pre-norm attention + MLP layer the rotation knows"
        a = unit.attention
        modules = dict(unit.module.named_modules())
        down = modules[unit.rel(unit.linears[-1])]
        d = _width(modules[unit.rel(a.q)], "in_features")
        need = {"the residual width": d} if kind == "hadamard" else {}
        need |= {"down_proj's input width": _width(down, "in_features")}
        if kind == "hadamard":
            need["the head dimension"] = a.head_dim
        for what, n in need.items():
            if not has_hadamard(n):
                return (f"no Hadamard matrix of order {n} ({what}) is known here"
                        + (" (try --rotate random for the offline rotations)" if what != "down_proj's input width"
                           else ""))
        if online_o_proj(a.heads, a.head_dim) is None:
            return f"no Hadamard across {a.heads} heads nor over o_proj's width {a.heads * a.head_dim} is known here"
    return None


# -- the rotation ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def _set(t: Tensor, value: Tensor) -> None:
    t.copy_(value.to(t.dtype))


def _reads(lin: nn.Module, m: Tensor) -> None:
    """A linear reading a rotated input: ``W <- W M``."""
    _set(lin.weight, lin.weight.double() @ m)


def _writes(lin: nn.Module, m: Tensor) -> None:
    """A linear whose output is rotated by M: ``W <- M^T W``, ``b <- b M``."""
    _set(lin.weight, m.t() @ lin.weight.double())
    if getattr(lin, "bias", None) is not None:
        _set(lin.bias, lin.bias.double() @ m)


def _fold_norm(norm: nn.Module, kind: NormKind, consumers: Sequence[nn.Module]) -> None:
    """``W <- W diag(g)`` for the norm's effective scale g (w, or 1 + w), and the norm reset to scale 1."""
    g = norm.weight.double() + (1.0 if kind is NormKind.RMSNORM_OFFSET else 0.0)
    for lin in consumers:
        _set(lin.weight, lin.weight.double() * g[None, :])
    _set(norm.weight, torch.zeros_like(g) if kind is NormKind.RMSNORM_OFFSET else torch.ones_like(g))


def _untie(model: nn.Module) -> bool:
    """Give the LM head its own weight when it shares the embedding's; record it in the config. True if untied."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
        return True
    return False


def _derived_seed(seed: int, k: int) -> int:
    return (int(seed) * 1_000_003 + k) % (2**63 - 1)


def _orthogonal(kind: str, n: int, seed: int) -> Tensor:
    return random_hadamard(n, seed) if kind == "hadamard" else random_orthogonal(n, seed)


def _per_head(m: Tensor, heads: int) -> Tensor:
    """``I_heads (x) M``."""
    return torch.kron(torch.eye(heads, dtype=torch.float64), m)


def _check_float(model: nn.Module, units: Sequence[Unit]) -> None:
    modules = dict(model.named_modules())
    quantized = [f for u in units for f in u.linears if type(modules[f]) is not nn.Linear]
    if quantized:
        raise HarnessError(f"rotate before quantizing: {quantized[0]} is a {type(modules[quantized[0]]).__name__}, "
                           "not a float nn.Linear")


@torch.no_grad()
def rotate_weights(model: nn.Module, kind: str, seed: int) -> dict[str, Any]:
    """Rotate `model` (a Llava model) in place as the module docstring says; returns what was done."""
    stacks = describe_model(model, ("projector", "lm"))
    reason = rotation_problem(stacks, kind)
    if reason is not None:
        raise HarnessError(f"--rotate {kind} cannot rotate this model: {reason}")
    lm = _lm(stacks)
    projector = next(s for s in stacks if s.name == "projector")
    _check_float(model, lm.units)
    modules = dict(model.named_modules())
    emb = model.get_input_embeddings()
    d = emb.weight.shape[1]
    untied = _untie(model)
    head = model.get_output_embeddings()
    # 1. norms into their readers
    for unit in lm.units:
        for g in unit.scale_groups:
            if g.producer_kind == "norm":
                _fold_norm(modules[g.producer], g.norm_kind, [modules[c] for c in g.consumers])
    if lm.final_norm is not None:
        _fold_norm(modules[lm.final_norm], norm_kind(modules[lm.final_norm], lm.final_norm), [head])
    # 2. the residual stream
    q = _orthogonal(kind, d, _derived_seed(seed, 0))
    _set(emb.weight, emb.weight.double() @ q)
    _writes(modules[projector.units[0].linears[-1]], q)
    _reads(head, q)
    online: dict[str, dict] = {}
    for unit in lm.units:
        a = unit.attention
        assert a is not None
        for g in unit.scale_groups:
            if g.producer_kind == "norm":
                for c in g.consumers:
                    _reads(modules[c], q)
        o, v, down = modules[a.o], modules[a.v], modules[unit.linears[-1]]
        _writes(o, q)
        _writes(down, q)
        # 3. per head: v's output rows and o's input columns
        h = _orthogonal(kind, a.head_dim, _derived_seed(seed, 1))
        _writes(v, _per_head(h, a.kv_heads))
        _reads(o, _per_head(h, a.heads))
        # 4. online Hadamards, their matrices folded into the weights they precede
        for lin, fqn, t in ((down, unit.linears[-1], OnlineHadamard(_width(down, "in_features"))),
                            (o, a.o, online_o_proj(a.heads, a.head_dim))):
            assert t is not None
            _reads(lin, t.matrix())
            attach_online_transform(lin, t)
            online[fqn] = t.to_dict()
    return {"kind": kind, "seed": int(seed), "covers": COVERS, "untied_lm_head": untied, "online": online}


@dataclass(frozen=True)
class RotationTransform:
    """The rotation as an entry of an adapter's transform log: replaying it rotates another copy of the model."""

    kind: str
    seed: int
    op: str = ROTATE
    targets: tuple[str, ...] = field(default=())

    def apply(self, model: nn.Module) -> None:
        rotate_weights(model, self.kind, self.seed)


def rotate_model(adapter: LlavaAdapter, kind: str, seed: int) -> dict[str, Any]:
    """Rotate `adapter.model` in place (see the module docstring) and record it in `adapter.transforms`."""
    report = rotate_weights(adapter.model, kind, seed)
    adapter.transforms.append(RotationTransform(kind, int(seed)))
    return report


def describe_rotation(kind: str) -> str:
    """One sentence for a row's description."""
    what = "a randomised Hadamard" if kind == "hadamard" else "a random orthogonal matrix"
    return (f"Rotated first (QuaRot, {kind}): norms folded, {what} on {COVERS}; online Hadamards (fast "
            "Walsh-Hadamard transforms) before down_proj and o_proj, applied before each layer quantizes its input.")

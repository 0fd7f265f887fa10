"""Block-wise rounding search (Q-VLM section 3.3): one block of units optimised jointly.

Inputs come from the already-quantized prefix (the "q stream"), targets from the FP model (the FP outputs of
every unit of the block on the FP stream), as in BRECQ-style block reconstruction. The loss is

    sum_l w_l * ||Y~_l - Y_l||^2 / ||Y_l||^2          (w_l proportional to the entropy H_l within the block)
  + lambda * mean(1 - |2h - 1|^beta)                   (AdaRound regulariser, annealed after a warm-up)
  + gamma * KL(p_FP || p_Q) on the answer tokens        (only on the language model's final block)

where the KL term ("auto-regressive guidance") compares the next-token distributions that the final norm and
LM head give on the block's output at the answer positions (CalibrationSet carries target answers; the
sequences are teacher-forced). Padded tokens never count. A block of d units runs ``iters * d`` Adam steps,
one calibration batch per step in a seeded order. After the search the rounding is made hard; if the hard
result is worse than round-to-nearest on the evaluation batches, the initial rounding is kept (and reported).

What one step costs, and why it is cheap: the block's inputs (the quantized prefix's outputs) and its FP targets
are computed once per block before the loop, never per step; the soft weights go through the fused form
(`LearnableQLinear.fused` / `AdaRoundWeight.fused_soft_weight`: one element-wise pass forward, one multiply-add
backward, the regulariser's gradient folded in, optionally compiled), Adam runs its fused kernel, and with
``search_dtype=bf16`` the block's matrix products run in bfloat16 under autocast (weights, V and Adam's state stay
float32; the before/after losses and the keep-the-start decision are measured in float32 hard mode).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qvlm_harness.config import QuantSpec
from qvlm_harness.methods.qvlm.options import QVLMOptions
from qvlm_harness.methods.qvlm.quantizers import LearnableQLinear
from qvlm_harness.methods.qvlm.units import StackInput, Unit, linears_of, run_unit, set_submodule


@dataclass
class KLGuide:
    """Auto-regressive guidance: FP next-token log-probabilities at the answer positions of each batch."""

    norm: nn.Module
    head: nn.Module
    fp_logprobs: dict[int, Tensor]  # calibration batch index -> [n_answer_positions, vocab]
    answer_pos: dict[int, Tensor]  # calibration batch index -> bool [b, T]

    def kl(self, hidden: Tensor, batch: int) -> Tensor:
        pos = self.answer_pos[batch]
        ref = self.fp_logprobs[batch]
        logits = self.head(self.norm(hidden[pos])).float()
        logq = F.log_softmax(logits, dim=-1)
        return (ref.exp() * (ref - logq)).sum(dim=-1).mean()


def answer_logprobs(norm: nn.Module, head: nn.Module, hidden: Tensor, pos: Tensor) -> Tensor:
    with torch.no_grad():
        return F.log_softmax(head(norm(hidden[pos])).float(), dim=-1)


@dataclass
class BlockResult:
    units: list[str]
    steps: int
    loss_before: float  # composite loss (reconstruction + KL), hard round-to-nearest, evaluation batches
    loss_after: float  # the same after the search (hard rounding)
    recon_before: list[float] = field(default_factory=list)  # per unit, pooled relative error
    recon_after: list[float] = field(default_factory=list)
    kl_before: float | None = None
    kl_after: float | None = None
    kept_init: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def wrap_units(units: Sequence[Unit], spec: QuantSpec, weight_mse: bool) -> dict[str, LearnableQLinear]:
    """Replace every linear of the units by a `LearnableQLinear` (initialised to round-to-nearest)."""
    wrapped: dict[str, LearnableQLinear] = {}
    for unit in units:
        for fqn, lin in linears_of(unit):
            mod = LearnableQLinear(lin, spec, name=fqn, weight_mse=weight_mse)
            set_submodule(unit.module, fqn[len(unit.name) + 1:], mod)
            wrapped[fqn] = mod
    return wrapped


def restore_units(units: Sequence[Unit], wrapped: dict[str, LearnableQLinear]) -> None:
    """Put the original float linears back (used by provisional quantization and the dependency analysis)."""
    for unit in units:
        for fqn, mod in wrapped.items():
            if fqn.startswith(unit.name + "."):
                lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(mod.weight_fp)
                    if mod.bias is not None:
                        lin.bias.copy_(mod.bias)
                set_submodule(unit.module, fqn[len(unit.name) + 1:], lin.to(mod.orig_dtype).requires_grad_(False))


def finalize_units(units: Sequence[Unit], wrapped: dict[str, LearnableQLinear]) -> list[str]:
    """Swap each `LearnableQLinear` for the deployable `QLinear` built from its hard codes; returns the FQNs."""
    names = []
    for unit in units:
        for fqn, mod in wrapped.items():
            if fqn.startswith(unit.name + "."):
                set_submodule(unit.module, fqn[len(unit.name) + 1:], mod.to_qlinear())
                names.append(fqn)
    return names


def _set_soft(wrapped: dict[str, LearnableQLinear], soft: bool) -> None:
    for m in wrapped.values():
        m.soft = soft


def _sq_error(out: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
    """Sum of squared error over valid tokens."""
    diff = (out.float() - target.float()).square().sum(dim=-1)
    if mask is not None and diff.dim() == mask.dim():
        return diff[mask].sum()
    return diff.sum()


def _sq_norm(target: Tensor, mask: Tensor | None) -> Tensor:
    """Sum of squared target over valid tokens."""
    ref = target.float().square().sum(dim=-1)
    if mask is not None and ref.dim() == mask.dim():
        return ref[mask].sum()
    return ref.sum()


def init_static_activations(units: Sequence[Unit], wrapped: dict[str, LearnableQLinear], inputs: Sequence[StackInput],
                            n_tokens: int, seed: int) -> None:
    """MSE-initialise the static activation step sizes from the inputs each linear sees (weights hard-rounded,
    activations unquantized, valid tokens only, a seeded subsample of `n_tokens` rows per layer)."""
    static = {k: m for k, m in wrapped.items() if m.act.learnable}
    if not static:
        return
    records: dict[str, list[Tensor]] = {k: [] for k in static}
    try:
        for m in wrapped.values():
            m.act.bypass = True
        for m in static.values():
            m.record = []
        with torch.no_grad():
            for si in inputs:
                h = si.hidden
                for u in units:
                    h = run_unit(u, h, si)
                for k, m in static.items():
                    assert m.record is not None
                    for x in m.record:
                        rows = x
                        if si.mask is not None and x.shape[0] == si.mask.numel():
                            rows = x[si.mask.reshape(-1)]
                        records[k].append(rows)
                    m.record = []
    finally:
        for m in wrapped.values():
            m.act.bypass = False
            m.record = None
    gen = torch.Generator().manual_seed(seed)
    for k, m in static.items():
        rows = torch.cat(records[k]) if records[k] else torch.zeros(1, m.in_features, device=m.weight_fp.device)
        if rows.shape[0] > n_tokens:
            idx = torch.randperm(rows.shape[0], generator=gen)[:n_tokens].sort().values
            rows = rows[idx]
        m.act.init_from(rows)


class BlockSearch:
    """Search one block: `run()` optimises, `finalize()` installs the `QLinear`s."""

    def __init__(self, units: Sequence[Unit], entropies: Sequence[float], spec: QuantSpec, opts: QVLMOptions,
                 seed: int, kl: KLGuide | None = None, *, fused: bool = True):
        self.units = list(units)
        self.fused = fused  # False: the reference formulation (autograd soft weight + regulariser), for comparisons
        self.spec = spec
        self.opts = opts
        self.seed = seed
        self.kl = kl
        h = torch.tensor([max(float(e), 0.0) for e in entropies], dtype=torch.float64)
        self.weights = (h / h.sum() if float(h.sum()) > 0 else torch.full_like(h, 1.0 / len(h))).tolist()
        self.wrapped: dict[str, LearnableQLinear] = {}
        self._norms: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}  # (batch, unit) -> (target, its squared norm)

    def _target_norm(self, si: StackInput, i: int, y: Tensor) -> Tensor:
        """The squared norm of a target over valid tokens: a constant of the block, computed once, not per step."""
        hit = self._norms.get((si.batch, i))
        if hit is None or hit[0] is not y:
            hit = self._norms[(si.batch, i)] = (y, _sq_norm(y, si.mask))
        return hit[1]

    # -- loss ------------------------------------------------------------------------------------------------------
    def _forward(self, si: StackInput, targets: Sequence[Tensor]) -> tuple[list[tuple[Tensor, Tensor]], Tensor | None]:
        parts = []
        h = si.hidden
        for i, (u, y) in enumerate(zip(self.units, targets, strict=True)):
            h = run_unit(u, h, si)
            parts.append((_sq_error(h, y, si.mask), self._target_norm(si, i, y)))
        kl = self.kl.kl(h, si.batch) if self.kl is not None else None
        return parts, kl

    def evaluate(self, inputs: Sequence[StackInput], targets: dict[int, list[Tensor]]) -> tuple[float, list[float],
                                                                                               float | None]:
        """(composite loss, per-unit pooled relative errors, mean KL) in the current (hard/soft) mode."""
        num = [0.0] * len(self.units)
        den = [0.0] * len(self.units)
        kls = []
        with torch.no_grad():
            for si in inputs:
                parts, kl = self._forward(si, targets[si.batch])
                for i, (a, b) in enumerate(parts):
                    num[i] += float(a)
                    den[i] += float(b)
                if kl is not None:
                    kls.append(float(kl))
        rel = [n / d if d > 0 else 0.0 for n, d in zip(num, den, strict=True)]
        loss = sum(w * r for w, r in zip(self.weights, rel, strict=True))
        kl_mean = sum(kls) / len(kls) if kls else None
        if kl_mean is not None:
            loss += self.opts.kl_weight * kl_mean
        return loss, rel, kl_mean

    # -- search ----------------------------------------------------------------------------------------------------
    def run(self, inputs: Sequence[StackInput], targets: dict[int, list[Tensor]], *, steps: int | None = None,
            eval_inputs: Sequence[StackInput] | None = None, prewrapped: bool = False) -> BlockResult:
        """Optimise the block. With `prewrapped`, the units already hold `LearnableQLinear`s (e.g. a layer-wise
        solution to warm-start from) and are searched from their current state; otherwise they are wrapped and
        initialised to round-to-nearest. If the search ends worse than its start on the evaluation batches, the
        start is restored."""
        t0 = time.perf_counter()
        opts = self.opts
        eval_inputs = list(eval_inputs) if eval_inputs is not None else list(inputs[: opts.eval_batches])
        if prewrapped:
            self.wrapped = {m.name: m for u in self.units for m in u.module.modules()
                            if isinstance(m, LearnableQLinear)}
        else:
            self.wrapped = wrap_units(self.units, self.spec, opts.weight_mse)
            init_static_activations(self.units, self.wrapped, eval_inputs, opts.act_tokens, self.seed)
        _set_soft(self.wrapped, False)
        start = {k: [p.detach().clone() for p in m.parameters()] for k, m in self.wrapped.items()}
        before, rec_before, kl_before = self.evaluate(eval_inputs, targets)
        n_steps = opts.iters * len(self.units) if steps is None else steps
        v_params = [m.rounding.v for m in self.wrapped.values() if m.rounding is not None]
        s_params = [m.act.log_scale for m in self.wrapped.values() if m.act.learnable]
        if n_steps > 0 and (v_params or s_params):
            self._optimise(inputs, targets, n_steps, v_params, s_params)
        _set_soft(self.wrapped, False)
        after, rec_after, kl_after = self.evaluate(eval_inputs, targets)
        kept = False
        if after > before:
            with torch.no_grad():
                for k, m in self.wrapped.items():
                    for p, p0 in zip(m.parameters(), start[k], strict=True):
                        p.copy_(p0)
            after, rec_after, kl_after = before, rec_before, kl_before
            kept = True
        return BlockResult([u.name for u in self.units], n_steps, before, after, rec_before, rec_after, kl_before,
                           kl_after, kept, time.perf_counter() - t0)

    def _optimise(self, inputs: Sequence[StackInput], targets: dict[int, list[Tensor]], n_steps: int,
                  v_params: list[Tensor], s_params: list[Tensor]) -> None:
        opts = self.opts
        groups = []
        if v_params:
            groups.append({"params": v_params, "lr": opts.lr_round})
        if s_params:
            groups.append({"params": s_params, "lr": opts.lr_act})
        opt = torch.optim.Adam(groups, fused=self.fused)
        rng = random.Random(f"qvlm-block-{self.seed}-{self.units[0].name}")
        order: list[int] = []
        rounding = [m.rounding for m in self.wrapped.values() if m.rounding is not None]
        static = [m.act for m in self.wrapped.values() if m.act.learnable]
        warm = int(opts.warmup * n_steps)
        self.train_mode(True, compiled=opts.compiles(n_steps // max(1, len(self.units))))
        try:
            with torch.enable_grad():
                for t in range(n_steps):
                    if not order:
                        order = list(range(len(inputs)))
                        rng.shuffle(order)
                    si = inputs[order.pop()]
                    beta = None
                    if t >= warm and rounding and opts.round_weight > 0:
                        rel_t = (t - warm) / max(1, n_steps - warm)
                        beta = opts.beta_end + (opts.beta_start - opts.beta_end) * max(0.0, 1.0 - rel_t)
                    loss = self.step_loss(si, targets[si.batch], beta)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    for a in static:
                        a.clamp_()
        finally:
            self.train_mode(False)

    def train_mode(self, on: bool, compiled: bool = False) -> None:
        """Soft weights through the fused (or reference) form while on; hard weights and plain state when off."""
        bf16 = on and self.opts.search_dtype == "bf16"
        for m in self.wrapped.values():
            m.fused, m.compiled = (self.fused, compiled) if on else (False, False)
            m.work_dtype = torch.bfloat16 if bf16 and self.fused else None
            if m.rounding is not None:
                m.rounding.reg = None
        _set_soft(self.wrapped, on)

    def step_loss(self, si: StackInput, targets: Sequence[Tensor], beta: float | None) -> Tensor:
        """The quantity one search step differentiates: entropy-weighted reconstruction + KL guidance, and, with
        `beta`, the rounding regulariser - added to the loss in the reference formulation, set on the fused soft
        weights (which add its gradient in their backward pass, its value being unused) otherwise."""
        opts = self.opts
        rounding = [m.rounding for m in self.wrapped.values() if m.rounding is not None]
        n_vars = sum(r.v.numel() for r in rounding)
        if self.fused:
            reg = None if beta is None else torch.tensor([opts.round_weight / n_vars, beta], device=si.hidden.device)
            for r in rounding:
                r.reg = reg
        with torch.autocast(si.hidden.device.type, dtype=torch.bfloat16, enabled=opts.search_dtype == "bf16"):
            parts, kl = self._forward(si, targets)
        loss = sum(w * (a / b.clamp(min=1e-12)) for w, (a, b) in zip(self.weights, parts, strict=True))
        if kl is not None:
            loss = loss + opts.kl_weight * kl
        if beta is not None and not self.fused:
            loss = loss + opts.round_weight * sum(r.regulariser(beta) * r.v.numel() for r in rounding) / n_vars
        return loss

    def finalize(self) -> list[str]:
        names = finalize_units(self.units, self.wrapped)
        self.wrapped = {}
        return names

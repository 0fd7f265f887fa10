"""Cross-layer dependency analysis: the discretisation error difference (DED) and its correlation with entropy.

For a unit l and its successor l+1 (same stack) on the same calibration inputs:

* layer-wise search: unit l's rounding is searched alone (target: l's FP output), then l+1's alone on l's
  quantized output (target: l+1's FP output) - the conventional sequential PTQ;
* joint search: both units' roundings searched together on the pair's output error, starting from the
  layer-wise solution: first the block search (soft offsets moved near the decision boundary so that decisions
  can flip; `joint_factor` x the layer-wise step budget), then a greedy flip search on the hard roundings (each
  round flips the k decisions of either unit whose first-order gain on the pair error is largest and keeps the
  flips only if the exact pair error drops; k doubles after a success and halves after a failure). The joint
  search space contains the layer-wise solution and every accepted move lowers the pair's error, so the joint
  error is never above the layer-wise one. The flip stage matters: with the small CPU step budgets the soft
  block search alone rarely beats its warm start (its soft weights start far from the hard ones), and every
  DED came out 0.

DED = E_layerwise - E_joint, the pair-output relative squared error (hard rounding), per sample and in total. The
paper's figure plots DED against the entropy of unit l's input, one point per multimodal sample (R^2 = 0.9718 at
LLaVA layer 15 on ScienceQA); `analyze_stack` gives the per-sample points and the per-layer means, and `r_squared`
the coefficient of determination of the least-squares line (the squared Pearson correlation).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from qvlm_harness.config import QuantSpec
from qvlm_harness.methods.qvlm.entropy import unit_entropy, unit_entropy_per_sample
from qvlm_harness.methods.qvlm.options import QVLMOptions
from qvlm_harness.methods.qvlm.quantizers import LearnableQLinear
from qvlm_harness.methods.qvlm.search import BlockSearch
from qvlm_harness.methods.qvlm.units import StackInput, Unit, run_unit


def pearson_r(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation (signed: the paper's claim is that DED *rises* with entropy, which R^2 cannot show);
    NaN for fewer than 3 points or a constant variable."""
    if len(x) != len(y) or len(x) < 3:
        return float("nan")
    xt = torch.tensor(list(x), dtype=torch.float64)
    yt = torch.tensor(list(y), dtype=torch.float64)
    xc, yc = xt - xt.mean(), yt - yt.mean()
    sxx, syy = float((xc * xc).sum()), float((yc * yc).sum())
    if sxx == 0 or syy == 0:
        return float("nan")
    return float((xc * yc).sum()) / (sxx * syy) ** 0.5


def r_squared(x: Sequence[float], y: Sequence[float]) -> float:
    """Coefficient of determination of the least-squares line y ~ a x + b (the squared Pearson correlation)."""
    return pearson_r(x, y) ** 2


def _token_errors(units: Sequence[Unit], si: StackInput, targets: dict[int, Tensor]) -> tuple[Tensor, Tensor]:
    """(squared error, squared reference) per token ``[b, T]`` of the units' output on one batch (differentiable
    when grad is enabled)."""
    h = si.hidden
    for u in units:
        h = run_unit(u, h, si)
    y = targets[si.batch]
    return (h.float() - y.float()).square().sum(dim=-1), y.float().square().sum(dim=-1)


def _sample_errors(units: Sequence[Unit], inputs: Sequence[StackInput],
                   targets: dict[int, Tensor]) -> Iterator[tuple[float, float]]:
    """(squared error, squared reference) of the units' output per sample over its valid tokens, in input order:
    the one propagation both the per-sample and the pooled error are read from."""
    with torch.no_grad():
        for si in inputs:
            diff, ref = _token_errors(units, si, targets)
            for i in range(diff.shape[0]):
                if si.mask is not None:
                    m = si.mask[i]
                    yield float(diff[i][m].sum()), float(ref[i][m].sum())
                else:
                    yield float(diff[i].sum()), float(ref[i].sum())


def per_sample_errors(units: Sequence[Unit], inputs: Sequence[StackInput], targets: dict[int, Tensor]) -> list[float]:
    """Relative squared error of the units' output per sample (valid tokens), in input order."""
    return [d / r if r > 0 else 0.0 for d, r in _sample_errors(units, inputs, targets)]


def _total(units: Sequence[Unit], inputs: Sequence[StackInput], targets: dict[int, Tensor]) -> float:
    """Relative squared error pooled over all samples' valid tokens."""
    num = den = 0.0
    for d, r in _sample_errors(units, inputs, targets):
        num += d
        den += r
    return num / den if den > 0 else 0.0


@dataclass
class PairDED:
    unit: str
    successor: str
    entropy: float
    error_layerwise: float
    error_joint: float
    sample_entropy: list[float] = field(default_factory=list)
    sample_ded: list[float] = field(default_factory=list)
    # valid tokens per sample: a control, because both errors and both entropy estimators can follow sequence
    # length (on the default model the released proxy is a function of it, and image samples are the long ones)
    sample_tokens: list[int] = field(default_factory=list)

    @property
    def ded(self) -> float:
        return self.error_layerwise - self.error_joint


def _clone(unit: Unit) -> Unit:
    return replace(unit, module=copy.deepcopy(unit.module))


def _roundings(units: Sequence[Unit]) -> list:
    return [m.rounding for u in units for m in u.module.modules()
            if isinstance(m, LearnableQLinear) and m.rounding is not None]


def flip_search(units: Sequence[Unit], inputs: Sequence[StackInput], targets: dict[int, Tensor], rounds: int = 24,
                k0: float = 1e-3) -> tuple[float, int]:
    """Greedy joint search over the hard rounding decisions of `units` on the pooled relative error of their
    output (see the module docstring). Returns (final error, number of accepted flips); never increases the error.
    Deterministic: no sampling, ties broken by position."""
    rounding = _roundings(units)
    if not rounding or rounds <= 0:
        return _total(units, inputs, targets), 0
    for m in (m for u in units for m in u.module.modules() if isinstance(m, LearnableQLinear)):
        m.soft = False
    sizes = [r.v.numel() for r in rounding]
    k = max(1, int(k0 * sum(sizes)))
    best = _total(units, inputs, targets)
    accepted = 0
    for _ in range(rounds):
        for r in rounding:
            r.probe = r.hard_offset().requires_grad_(True)
        try:
            den = 0.0
            with torch.enable_grad():
                for si in inputs:
                    diff, ref = _token_errors(units, si, targets)
                    if si.mask is not None:
                        diff, ref = diff[si.mask], ref[si.mask]
                    den += float(ref.sum())
                    diff.sum().backward()
            # first-order change of the error when a decision flips: grad * (1 - 2 * offset); < 0 helps
            gains = [(r.probe.grad if r.probe.grad is not None else torch.zeros_like(r.probe))
                     * (1.0 - 2.0 * r.probe.detach()) * r.flippable() for r in rounding]
        finally:
            for r in rounding:
                r.probe = None
        flat = torch.cat([g.reshape(-1) for g in gains])
        helpful = int((flat < 0).sum())
        if helpful == 0 or den <= 0:
            break
        take = torch.topk(-flat, min(k, helpful)).indices
        chosen = torch.zeros_like(flat, dtype=torch.bool)
        chosen[take] = True
        masks, start = [], 0
        for r, n in zip(rounding, sizes, strict=True):
            masks.append(chosen[start:start + n].reshape(r.v.shape))
            start += n
        for r, m in zip(rounding, masks, strict=True):
            r.flip_(m)
        err = _total(units, inputs, targets)
        if err < best:
            best, accepted, k = err, accepted + len(take), min(2 * k, max(1, sum(sizes) // 10))
        else:
            for r, m in zip(rounding, masks, strict=True):
                r.flip_(m)
            if k == 1:
                break
            k = max(1, k // 2)
    return best, accepted


def pair_ded(a: Unit, b: Unit, inputs: Sequence[StackInput], spec: QuantSpec, opts: QVLMOptions, seed: int,
             joint_factor: int = 2, warm_h: float = 0.6, flip_rounds: int = 24) -> PairDED:
    """DED of the pair (a, b) on `inputs` (FP inputs of a). Works on copies: the model is not modified."""
    with torch.no_grad():
        ya = {si.batch: run_unit(a, si.hidden, si) for si in inputs}
        yb = {si.batch: run_unit(b, ya[si.batch], si) for si in inputs}
    # layer-wise: a alone (target: a's FP output), then b alone on a's quantized output
    a1, b1 = _clone(a), _clone(b)
    BlockSearch([a1], [1.0], spec, opts, seed).run(inputs, {k: [v] for k, v in ya.items()}, eval_inputs=inputs)
    with torch.no_grad():
        qa = [si.with_hidden(run_unit(a1, si.hidden, si)) for si in inputs]
    BlockSearch([b1], [1.0], spec, opts, seed).run(qa, {k: [v] for k, v in yb.items()}, eval_inputs=qa)
    # joint: both searched together on the pair's output, warm-started from the layer-wise solution with its soft
    # offsets moved near the decision boundary (h = warm_h / 1 - warm_h, same hard decisions) so that the joint
    # loss can still flip them, for `joint_factor` times the steps of the two layer-wise searches
    a2, b2 = _clone(a1), _clone(b1)
    for m in (*a2.module.modules(), *b2.module.modules()):
        if isinstance(m, LearnableQLinear) and m.rounding is not None:
            m.rounding.sharpen_(warm_h)
    BlockSearch([a2, b2], [0.0, 1.0], spec, opts, seed).run(inputs, {k: [ya[k], v] for k, v in yb.items()},
                                                             eval_inputs=inputs, prewrapped=True,
                                                             steps=joint_factor * 2 * opts.iters)
    e_lw = _total([a1, b1], inputs, yb)
    e_joint = _total([a2, b2], inputs, yb)
    if e_joint > e_lw:  # the joint search space contains the layer-wise solution: the better candidate stands
        a2.module.load_state_dict(a1.module.state_dict())
        b2.module.load_state_dict(b1.module.state_dict())
        e_joint = e_lw
    e_joint, _ = flip_search([a2, b2], inputs, yb, rounds=flip_rounds)
    lw = per_sample_errors([a1, b1], inputs, yb)
    jt = per_sample_errors([a2, b2], inputs, yb)
    chunks = [si.hidden for si in inputs]
    masks = [si.mask for si in inputs]
    ent = unit_entropy(chunks, masks, opts.entropy, opts.bins)
    ent_s = unit_entropy_per_sample(chunks, masks, opts.entropy, opts.bins)
    tokens = [int(m[i].sum()) if m is not None else int(si.hidden.shape[1])
              for si, m in zip(inputs, masks, strict=True) for i in range(si.hidden.shape[0])]
    return PairDED(a.name, b.name, ent, e_lw, e_joint, ent_s, [x - y for x, y in zip(lw, jt, strict=True)], tokens)


def analyze_stack(units: Sequence[Unit], inputs: Sequence[StackInput], spec: QuantSpec, opts: QVLMOptions, seed: int,
                  indices: Sequence[int] | None = None, flip_rounds: int = 24,
                  progress: Callable[[PairDED, float], None] | None = None) -> list[PairDED]:
    """DED and entropy for consecutive pairs of a stack, propagating the FP inputs unit by unit; `progress` is
    called after each pair with its result and seconds (a pair can take minutes on a CPU)."""
    wanted = set(range(len(units) - 1)) if indices is None else set(indices)
    out: list[PairDED] = []
    stream = list(inputs)
    for i in range(len(units) - 1):
        if i in wanted:
            t0 = time.perf_counter()
            out.append(pair_ded(units[i], units[i + 1], stream, spec, opts, seed, flip_rounds=flip_rounds))
            if progress is not None:
                progress(out[-1], time.perf_counter() - t0)
        if i + 1 >= len(units) - 1 or not any(j > i for j in wanted):
            break
        with torch.no_grad():
            stream = [si.with_hidden(run_unit(units[i], si.hidden, si)) for si in stream]
    return out


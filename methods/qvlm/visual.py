"""Visual-encoder optimisation (Q-VLM section 3.4): disentangle cross-layer dependency before partitioning.

The FP visual encoder's normalisation layers and the projector (`ve_params`) are tuned with

    loss = KL(p_ref || p_theta)  +  eta * mean_l H~(LM unit l's input activations)

on the answer tokens of the calibration set, where p_theta is the next-token distribution of the model with the
tuned encoder and a *provisionally quantized* language model (round-to-nearest weights on the harness grid,
the spec's activation quantizer, straight-through gradients; restored to float afterwards), and H~ is the
differentiable soft-histogram entropy (bits) on fixed per-layer ranges. The reference p_ref is, by default
(`ve_anchor="quantized"`), the same provisionally quantized model with the *untouched* encoder: the KL term
keeps the quantized model's answers where they were while the entropy term lowers the LM's activation entropy,
which lowers the dependency proxy and allows a finer partition (lower search cost). With eta = 0 the untouched
encoder is the exact optimum (zero gradient): nothing changes. `ve_anchor="fp"` uses the FP model's answers
instead, which also lets the encoder compensate the LM's quantization error (and then eta = 0 does move it).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qvlm_harness.config import QuantSpec
from qvlm_harness.methods.qvlm.entropy import soft_histogram_entropy
from qvlm_harness.methods.qvlm.options import QVLMOptions
from qvlm_harness.methods.qvlm.search import restore_units, wrap_units
from qvlm_harness.methods.qvlm.units import CalibBatch, Unit


def tunable_parameters(model: nn.Module, which: str) -> list[tuple[str, nn.Parameter]]:
    """The parameters the visual-encoder stage may change: norms of the vision tower and/or the projector."""
    out: list[tuple[str, nn.Parameter]] = []
    if "norms" in which:
        for name, m in model.model.vision_tower.named_modules():
            if "norm" in type(m).__name__.lower():
                out += [(f"model.vision_tower.{name}.{n}", p) for n, p in m.named_parameters(recurse=False)]
    if "projector" in which:
        proj = model.model.multi_modal_projector
        out += [(f"model.multi_modal_projector.{n}", p) for n, p in proj.named_parameters()]
    return out


def provisional_spec(spec: QuantSpec) -> QuantSpec:
    """Static per-tensor activations need calibrated ranges; the provisional LM uses dynamic ones instead."""
    if spec.quantizes_activations and not spec.a_dynamic:
        return spec.with_activations("token", True)
    return spec


def _answer_logprobs(model: nn.Module, batch: CalibBatch) -> Tensor:
    hidden = model.model(**batch.inputs, use_cache=False).last_hidden_state
    logits = model.lm_head(hidden[batch.answer_pos]).float()
    return F.log_softmax(logits, dim=-1)


def optimise_visual_encoder(model: nn.Module, batches: Sequence[CalibBatch], lm_units: Sequence[Unit],
                            spec: QuantSpec, opts: QVLMOptions, seed: int) -> dict:
    """Tune the encoder in place (one calibration batch per step, seeded); returns a JSON-able report."""
    t0 = time.perf_counter()
    params = tunable_parameters(model, opts.ve_params)
    if not opts.visual_optimisation:
        # eta = 0 with the quantized-model anchor: the untouched encoder is the exact optimum (KL = 0, zero
        # gradient). Running Adam anyway would only amplify float round-off (Adam normalises a 1e-9 gradient into
        # a full step), so nothing is run and nothing changes.
        reason = "eta = 0 (the untouched encoder is the optimum)" if opts.ve_steps > 0 else "ve_steps = 0"
        return {"skipped": reason, "steps": 0, "eta": opts.eta, "anchor": opts.ve_anchor, "params": opts.ve_params,
                "n_tensors": len(params), "relative_change": 0.0, "seconds": time.perf_counter() - t0}
    batches = [b for b in batches if b.n_images > 0] or list(batches)
    rng = random.Random(f"qvlm-ve-{seed}")
    order = [rng.randrange(len(batches)) for _ in range(opts.ve_steps)]
    used = sorted(set(order))
    refs: dict[int, Tensor] = {}
    if opts.ve_anchor == "fp":
        with torch.no_grad():
            refs = {i: _answer_logprobs(model, batches[i]) for i in used}
    wrapped = wrap_units(lm_units, provisional_spec(spec), opts.weight_mse)
    for m in wrapped.values():
        for p in m.parameters():
            p.requires_grad_(False)
    captured: list[Tensor] = []

    def grab(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        captured.append(x)

    handles = [u.module.register_forward_pre_hook(grab, with_kwargs=True) for u in lm_units]
    before = {n: p.detach().clone() for n, p in params}
    report: dict = {"steps": opts.ve_steps, "eta": opts.eta, "anchor": opts.ve_anchor, "params": opts.ve_params,
                    "n_tensors": len(params)}
    try:
        # references and fixed soft-histogram ranges, from the provisionally quantized model as it is now
        ranges: list[tuple[float, float]] = [(float("inf"), float("-inf"))] * len(lm_units)
        with torch.no_grad():
            for i in used:
                captured.clear()
                logp = _answer_logprobs(model, batches[i])
                if opts.ve_anchor == "quantized":
                    refs[i] = logp
                mask = batches[i].token_mask
                for li, x in enumerate(captured[: len(lm_units)]):
                    v = x[mask] if x.shape[:2] == mask.shape else x
                    ranges[li] = (min(ranges[li][0], float(v.min())), max(ranges[li][1], float(v.max())))
        for _, p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam([p for _, p in params], lr=opts.ve_lr)
        history = []
        with torch.enable_grad():
            for i in order:
                batch = batches[i]
                captured.clear()
                logq = _answer_logprobs(model, batch)
                ref = refs[i]
                kl = (ref.exp() * (ref - logq)).sum(dim=-1).mean()
                loss = kl
                ent_value = None
                if opts.eta > 0:
                    mask = batch.token_mask
                    ents = []
                    for li, x in enumerate(captured[: len(lm_units)]):
                        v = x[mask] if x.shape[:2] == mask.shape else x
                        ents.append(soft_histogram_entropy(v, *ranges[li], bins=opts.ve_bins))
                    ent = torch.stack(ents).mean()
                    loss = loss + opts.eta * ent
                    ent_value = float(ent.detach())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                history.append({"kl": float(kl), "entropy": ent_value})
        report["history"] = history
    finally:
        for h in handles:
            h.remove()
        for _, p in params:
            p.requires_grad_(False)
        restore_units(lm_units, wrapped)
    change = sum(float((p.detach() - before[n]).square().sum()) for n, p in params) ** 0.5
    norm = sum(float(before[n].square().sum()) for n, _ in params) ** 0.5
    report["relative_change"] = change / norm if norm > 0 else 0.0
    report["seconds"] = time.perf_counter() - t0
    return report

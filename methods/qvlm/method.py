"""`qvlm`: the paper's method, end to end (Wang et al., NeurIPS 2024, arXiv 2410.08119).

Stages (each timed, with its peak resident memory, in `SearchCost.stages` and the report):

1. ``capture`` - encode the calibration set with its target answers; find the units.
2. ``entropy`` - propagate the FP model unit by unit over the calibration set, measuring the entropy of every
   unit's input; FP next-token log-probabilities at the answer positions; partition each stack ("before").
3. ``visual_opt`` (when enabled) - tune the FP visual encoder's norms and the projector (see `visual.py`), then
   ``entropy_after``: measure again and re-partition ("after").
4. ``search_vision``, ``search_projector``, ``search_lm`` - block-wise rounding search in forward order, inputs
   from the already-quantized prefix, targets from the FP model, the KL guidance on the LM's final block.

The result is made of standard `QLinear` modules (integer codes, per-channel/group weight scales, static
per-tensor or per-input-channel activation QParams from the learned step sizes, or per-token dynamic activations),
plus the tuned encoder norms / projector as ordinary parameters, so it saves, reloads and packs like any other
method's output (per-input-channel activations excepted: they never pack).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from qvlm_harness.config import ALL_SCOPES, CHANNEL_ACTIVATIONS_UNPACKABLE, QuantSpec, Scope
from qvlm_harness.cost import stage as cost_stage
from qvlm_harness.errors import HarnessError
from qvlm_harness.measure import PeakRSS
from qvlm_harness.method import Method, QuantizedModel, SearchCost, require_calibration
from qvlm_harness.methods.qvlm.entropy import unit_entropy
from qvlm_harness.methods.qvlm.options import QVLMOptions
from qvlm_harness.methods.qvlm.partition import partition
from qvlm_harness.methods.qvlm.search import (
    BlockSearch,
    KLGuide,
    answer_logprobs,
    finalize_units,
    init_static_activations,
    wrap_units,
)
from qvlm_harness.methods.qvlm.units import (
    STACKS,
    StackInput,
    build_batches,
    capture_stack_inputs,
    find_units,
    run_unit,
    run_units,
    unit_outputs,
)
from qvlm_harness.methods.qvlm.visual import optimise_visual_encoder
from qvlm_harness.quant.qlinear import QLinear


class QVLM(Method):
    name = "qvlm"
    needs_structure = True
    Config = QVLMOptions
    produces = (QLinear,)
    packs = True

    @property
    def opts(self) -> QVLMOptions:
        return self.config  # type: ignore[return-value]

    def needs_calibration(self, spec: QuantSpec) -> bool:
        return not spec.is_float

    def quantize(self, adapter, calibration, spec: QuantSpec, scope: Sequence[Scope] = ALL_SCOPES) -> QuantizedModel:
        if spec.is_float:
            return self.result(adapter, spec, "float")
        calibration = require_calibration(self, spec, calibration)
        return Pipeline(adapter, calibration, spec, scope, self.opts).run()

    def describe(self, spec: QuantSpec) -> str:
        o = self.opts
        w = (f"W{spec.w_bits} {'symmetric' if spec.w_symmetric else 'asymmetric'} per-"
             f"{'group ' + str(spec.w_group_size) if spec.w_group_size else 'channel'} with learned (AdaRound) rounding"
             if spec.quantizes_weights else "W16 (float)")
        if not spec.quantizes_activations:
            a = "A16 (float)"
        elif spec.a_dynamic:
            a = f"A{spec.a_bits} per-{spec.a_granularity} dynamic (nothing learned)"
        elif spec.a_granularity == "channel":
            a = (f"A{spec.a_bits} static per-input-channel ranges with learned (LSQ) step sizes, MSE-initialised per "
                 f"channel (simulated only: {CHANNEL_ACTIVATIONS_UNPACKABLE})")
        else:
            a = f"A{spec.a_bits} per-tensor static with learned (LSQ) step sizes, MSE-initialised"
        ve = (f"visual-encoder optimisation eta={o.eta} ({o.ve_steps} steps, anchor {o.ve_anchor})"
              if o.visual_optimisation else "no visual-encoder optimisation (eta=0)")
        preset = f" [preset {o.preset}]" if o.preset != "none" else ""
        return (f"Q-VLM{preset}: entropy-guided block partition (p={o.p}, max depth {o.max_depth}, {o.entropy} "
                f"entropy), block-wise rounding search ({o.iters} steps per unit, {o.search_dtype} matrix products, "
                f"entropy-weighted reconstruction + rounding regulariser + KL guidance on the LM's final block), {ve}; "
                f"{w}, {a}; simulated (fake-quant QLinear with integer codes)")

    @classmethod
    def report_columns(cls, report: dict) -> dict:
        """The final partition's block count and mean block size (units per block), over every stack: what an
        ablation of ``p`` / ``max_depth`` changes (``report["partition"]["block_sizes_after"]``)."""
        sizes = (report.get("partition") or {}).get("block_sizes_after") or {}
        all_sizes = [s for v in sizes.values() for s in v]
        return {"blocks": len(all_sizes) if all_sizes else None,
                "mean_block": round(sum(all_sizes) / len(all_sizes), 2) if all_sizes else None}


class Pipeline:
    def __init__(self, adapter, calibration, spec: QuantSpec, scope: Sequence[Scope], opts: QVLMOptions):
        self.adapter = adapter
        self.model = adapter.model
        self.calibration = calibration
        self.spec = spec
        self.scope = set(scope)
        self.opts = opts
        self.seed = int(getattr(calibration, "seed", 0))
        self.cost: dict[str, dict[str, float]] = {}
        self.quantized: list[str] = []
        self.blocks: list[dict] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        with PeakRSS() as rss, cost_stage(name):
            yield
        self.cost[name] = {"seconds": round(time.perf_counter() - t0, 3), "peak_rss_mb": round(rss.peak_mb, 1)}

    # -- pipeline ----------------------------------------------------------------------------------------------------
    def run(self) -> QuantizedModel:
        t0 = time.perf_counter()
        opts = self.opts
        self.model.eval()
        self.model.requires_grad_(False)
        torch.manual_seed(self.seed)
        with PeakRSS() as total_rss:
            with self.stage("capture"):
                self.batches = build_batches(self.adapter, self.calibration, opts.batch_size)
                self.units = find_units(self.model)
                if not self.units["vision"] and "vision" in self.scope:
                    raise HarnessError("qvlm found no vision-encoder layers in this model")
            run_ve = opts.visual_optimisation and bool(self.units["vision"]) and bool(self.units["projector"])
            with self.stage("entropy"):
                ent_before, entries, cache, fp_logp = self.fp_pass(keep=not run_ve)
            part_before = self.partition(ent_before)
            ve_report: dict = {"skipped": "eta = 0 (the untouched encoder is the optimum)"
                               if opts.ve_steps > 0 else "ve_steps = 0"}
            ent_after, part_after = ent_before, part_before
            if run_ve:
                with self.stage("visual_opt"):
                    ve_batches = build_batches(self.adapter, self.calibration, opts.ve_batch)
                    ve_report = optimise_visual_encoder(self.model, ve_batches, self.units["lm"], self.spec, opts,
                                                        self.seed)
                with self.stage("entropy_after"):
                    ent_after, entries, cache, fp_logp = self.fp_pass(keep=True)
                part_after = self.partition(ent_after)
            prefix_float = True  # nothing before this stack is quantized yet: its FP inputs are its search inputs
            for stack in STACKS:
                if stack in self.scope and self.units[stack]:
                    with self.stage(f"search_{stack}"):
                        self.search_stack(stack, part_after[stack], ent_after, entries.get(stack, []), cache, fp_logp,
                                          reuse_inputs=prefix_float)
                    prefix_float = False
        seconds = time.perf_counter() - t0
        cost = SearchCost(seconds, total_rss.peak_mb, {k: v["seconds"] for k, v in self.cost.items()})
        report = self.report(ent_before, ent_after, part_before, part_after, ve_report, bool(cache))
        return QuantizedModel(self.adapter, "qvlm", self.spec, "simulated", self.quantized, cost, report,
                              self.opts.to_dict())

    # -- FP pass: entropies, cache, FP answer distributions ----------------------------------------------------------
    def fp_pass(self, keep: bool) -> tuple[dict[str, float], dict[str, list[StackInput]],
                                          dict[str, dict[int, Tensor]], dict[int, Tensor]]:
        opts = self.opts
        entries = capture_stack_inputs(self.model, self.batches, STACKS, self.units)
        if keep:
            per_unit = sum(si.hidden.numel() * 4 * len(self.units[s]) for s, lst in entries.items() for si in lst)
            keep = per_unit / 2**20 <= opts.fp_cache_mb
        entropies: dict[str, float] = {}
        cache: dict[str, dict[int, Tensor]] = {}
        fp_logp: dict[int, Tensor] = {}
        with torch.no_grad():
            for stack in STACKS:
                stream = {si.batch: si.hidden for si in entries.get(stack, [])}
                sis = {si.batch: si for si in entries.get(stack, [])}
                if not stream:
                    continue
                for unit in self.units[stack]:
                    if unit.used:
                        masks = [sis[b].mask for b in stream]
                        entropies[unit.name] = unit_entropy(list(stream.values()), masks, opts.entropy, opts.bins)
                    stream = {b: run_unit(unit, x, sis[b]) for b, x in stream.items()}
                    if keep:
                        cache[unit.name] = stream
                if stack == "lm":
                    norm, head = self._lm_head()
                    if norm is not None:
                        fp_logp = {b: answer_logprobs(norm, head, x, self.batches[b].answer_pos)
                                   for b, x in stream.items()}
        return entropies, entries, cache, fp_logp

    def _lm_head(self):
        final = self.adapter.stacks(["lm"])[0].final_norm
        return (self.model.get_submodule(final) if final else None), self.model.lm_head

    def partition(self, entropies: dict[str, float]) -> dict[str, list[list[int]]]:
        out = {}
        for stack in STACKS:
            used = [u for u in self.units[stack] if u.used and u.name in entropies]
            out[stack] = partition([entropies[u.name] for u in used], self.opts.p, self.opts.max_depth)
        return out

    # -- search ------------------------------------------------------------------------------------------------------
    def search_stack(self, stack: str, blocks: list[list[int]], entropies: dict[str, float],
                     fp_entries: list[StackInput], cache: dict[str, dict[int, Tensor]],
                     fp_logp: dict[int, Tensor], reuse_inputs: bool = False) -> None:
        """Search one stack block by block. Its inputs are captured once (one forward of the quantized prefix per
        batch; with `reuse_inputs` the FP pass's capture is the same thing and is reused) and then propagated
        block by block through the searched units, so no block ever re-runs the model."""
        units = self.units[stack]
        q_stream = (list(fp_entries) if reuse_inputs and fp_entries
                    else capture_stack_inputs(self.model, self.batches, [stack], self.units)[stack])
        if not q_stream:
            raise HarnessError(f"no calibration sample reaches the {stack} part (text-only calibration set?); "
                               f"calibrate on a task with images or leave it out with --quantize")
        fp_stream = {si.batch: si.hidden for si in fp_entries}
        used = [u for u in units if u.used]
        last_lm = units[-1] if stack == "lm" else None
        for block in blocks:
            block_units = [used[i] for i in block]
            targets: dict[int, list[Tensor]] = {}
            with torch.no_grad():
                for si in q_stream:
                    if all(u.name in cache for u in block_units):
                        targets[si.batch] = [cache[u.name][si.batch] for u in block_units]
                    else:
                        targets[si.batch] = unit_outputs(block_units, fp_stream[si.batch], si)
                    fp_stream[si.batch] = targets[si.batch][-1]
            kl = None
            if last_lm is not None and last_lm in block_units and self.opts.kl_weight > 0 and fp_logp:
                norm, head = self._lm_head()
                kl = KLGuide(norm, head, fp_logp, {b: self.batches[b].answer_pos for b in fp_logp})
            search = BlockSearch(block_units, [entropies.get(u.name, 0.0) for u in block_units], self.spec,
                                 self.opts, self.seed, kl)
            result = search.run(q_stream, targets)
            self.quantized += search.finalize()
            self.blocks.append(result.to_dict() | {"stack": stack})
            with torch.no_grad():
                q_stream = [si.with_hidden(run_units(block_units, si.hidden, si)) for si in q_stream]
            del targets
        rest = [u for u in units if not u.used]
        if rest:  # layers whose output feeds nothing: round to nearest (static ranges from their inputs)
            wrapped = wrap_units(rest, self.spec, self.opts.weight_mse)
            init_static_activations(rest, wrapped, q_stream[: self.opts.eval_batches], self.opts.act_tokens, self.seed)
            self.quantized += finalize_units(rest, wrapped)

    # -- report --------------------------------------------------------------------------------------------------------
    def report(self, ent_before: dict[str, float], ent_after: dict[str, float], part_before: dict, part_after: dict,
               ve_report: dict, cached: bool) -> dict:
        def labels(stack: str, blocks: list[list[int]]) -> list[list[str]]:
            used = [u for u in self.units[stack] if u.used]
            return [[used[i].label for i in b] for b in blocks]

        units = [{"name": u.name, "label": u.label, "stack": u.stack, "used": u.used,
                  "entropy_before": _r(ent_before.get(u.name)), "entropy_after": _r(ent_after.get(u.name))}
                 for s in STACKS for u in self.units[s]]
        n_tokens = sum(int(b.token_mask.sum()) for b in self.batches)
        return {
            "method": "qvlm",
            "options": self.opts.to_dict(),
            "calibration": {"samples": len(self.calibration), "batches": len(self.batches), "tokens": n_tokens,
                            "images": sum(b.n_images for b in self.batches)},
            "units": units,
            "partition": {
                "before": {s: labels(s, part_before[s]) for s in STACKS},
                "after": {s: labels(s, part_after[s]) for s in STACKS},
                "block_sizes_before": {s: [len(b) for b in part_before[s]] for s in STACKS},
                "block_sizes_after": {s: [len(b) for b in part_after[s]] for s in STACKS},
            },
            "blocks": self.blocks,
            "visual_optimisation": ve_report,
            "fp_stream_cached": cached,
            "search_cost": self.cost,
        }


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), 6)


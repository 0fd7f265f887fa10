"""Units and calibration data: what Q-VLM searches over, and the activations it searches with, as the model seam
describes them.

A *unit* is one transformer layer of the visual encoder or of the language model, or the multimodal projector,
in forward order (`qvlm_harness.models.architectures`: DINOv2, CLIP/SigLIP, Llama/Mistral/Qwen/Gemma layers).
Calibration batches come from the adapter's one encoder (prompt + the assistant's answer turn, with the answer
positions the KL guidance reads). Activations are captured at the entry of each stack together with every
unit's own call arguments (attention masks, rotary embeddings: they differ between sliding-window and full
attention layers), and then propagated unit by unit (`run_unit`).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from qvlm_harness.models.architectures import describe_model
from qvlm_harness.models.capture import StackInput, run_unit, run_units, unit_outputs
from qvlm_harness.models.capture import capture_stack_inputs as _capture
from qvlm_harness.models.llava import CalibBatch
from qvlm_harness.models.structure import STACK_NAMES, STACK_ROOTS, Stack, Unit
from qvlm_harness.quant.apply import set_submodule

STACKS = STACK_NAMES

__all__ = ["STACKS", "CalibBatch", "StackInput", "Unit", "build_batches", "capture_stack_inputs", "find_units",
           "linears_of", "run_unit", "run_units", "set_submodule", "unit_outputs"]


def find_units(model: nn.Module) -> dict[str, list[Unit]]:
    """The seam's units of a Llava model per stack, in forward order."""
    return {s.name: s.units for s in describe_model(model, STACKS)}


def linears_of(unit: Unit) -> list[tuple[str, nn.Module]]:
    """(FQN, module) of the quantizable linears inside a unit, in forward order."""
    return [(fqn, unit.module.get_submodule(unit.rel(fqn))) for fqn in unit.linears]


def build_batches(adapter, calibration, batch_size: int) -> list[CalibBatch]:
    """The calibration set encoded with its target answers, in fixed order, `batch_size` per batch."""
    return list(adapter.calibration_batches(calibration, with_targets=True, batch_size=batch_size))


def capture_stack_inputs(model: nn.Module, batches: Sequence[CalibBatch], stacks: Sequence[str],
                         units: dict[str, list[Unit]]) -> dict[str, list[StackInput]]:
    """Entry activations and per-unit call arguments of the requested stacks for every batch that reaches them
    (`qvlm_harness.models.capture`); stacks a batch never reaches (vision for text-only batches) get no entry."""
    wanted = [Stack(s, STACK_ROOTS[s], units[s]) for s in STACKS if s in stacks and units.get(s)]
    return _capture(model, wanted, batches)

"""The method plugin contract, and what a method hands back.

A method receives the FP model (inside its adapter), the calibration set and a `QuantSpec`, and returns a
`QuantizedModel`: the same adapter with modules swapped, plus what the report needs to label the result honestly
(`execution`: "float", "simulated" fake-quant, or "real" packed kernels) and the search cost.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from qvlm_harness.config import ALL_SCOPES, QuantSpec, Scope
from qvlm_harness.errors import HarnessError

if TYPE_CHECKING:
    from qvlm_harness.calibration import CalibrationSet
    from qvlm_harness.models.llava import LlavaAdapter

Execution = Literal["float", "simulated", "real"]


@dataclass
class SearchCost:
    """What quantizing cost: wall time and peak resident memory of the process during quantization."""

    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)


@dataclass
class QuantizedModel:
    adapter: LlavaAdapter
    method: str
    spec: QuantSpec
    execution: Execution
    quantized_modules: list[str] = field(default_factory=list)
    search_cost: SearchCost = field(default_factory=SearchCost)
    report: dict[str, Any] = field(default_factory=dict)  # method-specific details (JSON-serialisable)


class Method(ABC):
    """One post-training quantization algorithm."""

    name: str = ""
    #: True for baselines that ignore --bits (fp32/fp16/bf16): the runner evaluates them once.
    fixed_precision: bool = False
    #: option name -> default; `--method-option NAME.OPTION=VALUE` may set only these
    default_options: dict[str, Any] = {}

    def __init__(self, **options: Any):
        unknown = sorted(set(options) - set(self.default_options))
        if unknown:
            known = ", ".join(sorted(self.default_options)) or "none"
            raise HarnessError(f"method {self.name} has no option(s) {', '.join(unknown)}; its options: {known}")
        self.options = {**self.default_options, **options}

    def supports(self, spec: QuantSpec) -> bool:
        return True

    def needs_calibration(self, spec: QuantSpec) -> bool:
        return False

    @abstractmethod
    def quantize(self, adapter: LlavaAdapter, calibration: CalibrationSet | None, spec: QuantSpec,
                 scope: Sequence[Scope] = ALL_SCOPES) -> QuantizedModel:
        """Quantize `adapter.model` in place and return the result."""

    @abstractmethod
    def describe(self, spec: QuantSpec) -> str:
        """One paragraph: what is quantized how, what is simulated and what is real."""

    @classmethod
    def report_columns(cls, report: dict[str, Any]) -> dict[str, Any]:
        """A few scalar columns summarising this method's `QuantizedModel.report` (as stored with a row), for
        generic tables such as `harness ablate`'s search-cost table; the engine cannot read method reports."""
        return {}

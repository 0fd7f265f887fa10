"""The method plugin contract, and what a method hands back.

A method is a class with a typed `Config` (a `MethodConfig` dataclass: its options with types, defaults and
allowed values), built from user options once (`Method(**options)` coerces and validates them, so a bad value
fails before any work). `quantize(adapter, calibration, spec, scope)` receives the FP model inside its adapter,
the calibration set and a `QuantSpec`, swaps modules in place and returns a `QuantizedModel`: the same adapter,
plus what the report needs to label the result honestly (`execution`: "float", "simulated" fake-quant, or
"real" packed kernels). The engine calls methods only through `qvlm_harness.quantize.quantize`, which owns
seeding, the calibration check, the cost clock (methods mark phases with `qvlm_harness.cost.stage`) and packing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from qvlm_harness.config import ALL_SCOPES, QuantSpec, Scope
from qvlm_harness.cost import SearchCost
from qvlm_harness.errors import HarnessError
from qvlm_harness.methodconfig import MethodConfig

if TYPE_CHECKING:
    from qvlm_harness.calibration import CalibrationSet
    from qvlm_harness.models.llava import LlavaAdapter
    from qvlm_harness.models.structure import Stack

Execution = Literal["float", "simulated", "real"]

__all__ = ["Execution", "Method", "MethodConfig", "QuantizedModel", "SearchCost"]


@dataclass
class QuantizedModel:
    adapter: LlavaAdapter
    method: str
    spec: QuantSpec
    execution: Execution
    quantized_modules: list[str] = field(default_factory=list)
    search_cost: SearchCost = field(default_factory=SearchCost)
    report: dict[str, Any] = field(default_factory=dict)  # method-specific details (JSON-serialisable)
    config: dict[str, Any] = field(default_factory=dict)  # the method's canonical config (MethodConfig.to_dict)


class Method(ABC):
    """One post-training quantization algorithm."""

    name: ClassVar[str] = ""
    #: the method's options; a method without options keeps the empty base
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    #: True for baselines that ignore --bits (fp32/fp16/bf16): the planner evaluates them once.
    fixed_precision: ClassVar[bool] = False
    #: the dtype the evaluated model computes in when the method casts it ("bf16" for the bf16 baseline); None:
    #: the dtype it was loaded in. Part of a cell's identity where kernels are not row-invariant in that dtype.
    compute_dtype: ClassVar[str | None] = None
    #: True for methods that walk the model's structure (stacks of units, scale groups, attention): the planner
    #: describes the model from its config (no weights) and refuses an architecture the seam does not know
    needs_structure: ClassVar[bool] = False
    #: the quantized module types this method leaves in the model (each with a codec, `qvlm_harness.quant.codec`):
    #: a checkpoint saves only these and resolves their codecs through the method named in its manifest.
    produces: ClassVar[tuple[type, ...]] = ()
    #: True when the output converts to packed integer kernels (`convert_to_packed`) at every supported spec that
    #: quantizes weights (float weights never pack) and whose activations are not per input channel (those never
    #: pack: their scale lies along the GEMM's reduction dim).
    packs: ClassVar[bool] = False
    #: the activation quantizer a bare bit-width (``w4a4``, no -token/-tensor/-channel) means for this method, as
    #: (granularity, dynamic): the harness's per-token dynamic one, unless the method reproduces code whose own
    #: default is another (qvlm-official: the released per-input-channel static ranges). `resolve_spec` applies it.
    default_activations: ClassVar[tuple[str, bool]] = ("token", True)

    def __init__(self, config: MethodConfig | None = None, **options: Any):
        if config is not None and options:
            raise TypeError("pass a config or options, not both")
        if config is not None and not isinstance(config, self.Config):
            raise TypeError(f"{self.name} takes a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config if config is not None else self.Config.from_options(options, method=self.name)

    @property
    def options(self) -> dict[str, Any]:
        """The config as a plain dict (every option, defaults included)."""
        return {k: v for k, v in self.config.to_dict().items() if k != "version"}

    @classmethod
    def canonical_spec(cls, spec: QuantSpec) -> QuantSpec:
        """The cell spec of a requested one: an explicit ``-token`` is dropped (``w4a4-token`` is ``w4a4``: same
        tag, same cell id) unless this method's bare bit-width means other activations."""
        if spec.names_token and cls.default_activations == ("token", True):
            return spec.with_activations("token", True)
        return spec

    @classmethod
    def computed_spec(cls, spec: QuantSpec) -> QuantSpec:
        """The activation quantizer this method runs for `spec`, as a plain spec (explicit -token dropped, a bare
        bit-width given `default_activations`): what tables print and what fair comparisons pair on."""
        if spec.names_token:
            return spec.with_activations("token", True)
        bare = spec.quantizes_activations and (spec.a_granularity, spec.a_dynamic) == ("token", True)
        if bare and cls.default_activations != ("token", True):
            return spec.with_activations(*cls.default_activations)  # type: ignore[arg-type]
        return spec

    def supports(self, spec: QuantSpec) -> str | None:
        """None when the method can quantize at `spec`, else the reason it cannot (one line)."""
        return None

    def check(self, spec: QuantSpec) -> None:
        """Raise a one-line HarnessError when the user's settings contradict each other at `spec` (e.g. a group
        size in --bits and another in the options). The planner calls it for every cell before any work."""
        self.describe(spec)

    def needs_calibration(self, spec: QuantSpec) -> bool:
        return False

    def check_structure(self, stacks: Sequence[Stack], spec: QuantSpec) -> str | None:
        """None when the model's structure (the seam's description, built from its config before any weights
        load) suits this method at `spec`, else the reason (one line). Called by the planner for methods that
        `needs_structure`, so a requirement fails in a second, not after a search."""
        return None

    def identity(self) -> dict[str, Any]:
        """What the method contributes to a cell's identity: its name and canonical config."""
        return {"method": self.name, "config": self.config.to_dict()}

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

    def result(self, adapter: LlavaAdapter, spec: QuantSpec, execution: Execution,
               quantized_modules: Sequence[str] = (), report: dict[str, Any] | None = None) -> QuantizedModel:
        """The `QuantizedModel` of this method (its config attached); the entry point fills in the cost."""
        return QuantizedModel(adapter, self.name, spec, execution, list(quantized_modules), SearchCost(),
                              dict(report or {}), self.config.to_dict())


def require_calibration(method: Method, spec: QuantSpec, calibration: CalibrationSet | None) -> CalibrationSet:
    """The calibration set, or one line saying the method needs samples (never a silent fallback)."""
    if calibration is None or len(calibration) == 0:
        raise HarnessError(f"{method.name} at {spec.tag} calibrates on samples; pass --calib-samples N (N >= 1)")
    return calibration

"""Which activation quantizer a stored result row was computed with, in the one word every table prints.

A row computed since activation granularity became explicit records it (`settings["activations"]`, written by
the evaluator from `Method.computed_spec`). An older row has only its bits label: a bare ``w4a4`` then means what
it meant to the method that computed it, which is the method's `default_activations` (per-token dynamic for every
method but qvlm-official, whose released per-input-channel ranges were the only ones it had), so the registry's
method class answers. A method whose plugin is not installed is read as the harness's default.
"""

from __future__ import annotations

from qvlm_harness import plugins
from qvlm_harness.config import QuantSpec
from qvlm_harness.store import ResultRow

FLOAT_ROW = "fp"
FLOAT_ACTIVATIONS = "float"


def _from_label(spec: QuantSpec, label: str) -> QuantSpec:
    granularity, _, kind = label.partition("-")
    if granularity not in ("token", "tensor", "channel") or kind not in ("dyn", "static"):
        return spec
    return spec.with_activations(granularity, kind == "dyn")  # type: ignore[arg-type]


def spec_computed(method: str, bits: str, recorded: str | None = None) -> QuantSpec | None:
    """The spec a cell of `method` labelled `bits` was computed with, activations as run (None for "fp"); `recorded`
    is the cell's stored activations word, when it has one."""
    if bits == FLOAT_ROW:
        return None
    spec = QuantSpec.parse(bits)
    if recorded:
        return _from_label(spec, str(recorded)) if spec.quantizes_activations else spec
    if method in plugins.methods:
        return plugins.methods.get(method).computed_spec(spec)
    return spec.with_activations("token", True) if spec.names_token else spec


def activations_of(method: str, bits: str, recorded: str | None = None) -> str:
    """'float', 'token-dyn', 'tensor-dyn', 'tensor-static' or 'channel-static' (see `spec_computed`)."""
    spec = spec_computed(method, bits, recorded)
    return FLOAT_ACTIVATIONS if spec is None else spec.activations


def computed_spec(row: ResultRow) -> QuantSpec | None:
    """The spec `row` was computed with, activations as run (None for a float baseline's "fp" row)."""
    return spec_computed(row.method, row.bits, (row.settings or {}).get("activations"))


def row_activations(row: ResultRow) -> str:
    """'float', 'token-dyn', 'tensor-dyn', 'tensor-static' or 'channel-static'."""
    spec = computed_spec(row)
    return FLOAT_ACTIVATIONS if spec is None else spec.activations


def computed_bits(row: ResultRow) -> str:
    """The bits tag of what `row` computed ("fp" for a float row): rows of two methods with the same computed bits
    used the same weight and activation quantizer settings, whatever their labels (qvlm-official's ``w4a4-token``
    and qvlm's ``w4a4`` are both per-token)."""
    spec = computed_spec(row)
    return FLOAT_ROW if spec is None else spec.tag

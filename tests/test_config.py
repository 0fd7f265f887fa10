from __future__ import annotations

import pytest

from qvlm_harness.config import QuantSpec
from qvlm_harness.errors import HarnessError


@pytest.mark.parametrize(
    ("text", "w", "a", "group", "gran", "dynamic"),
    [
        ("w4a4", 4, 4, None, "token", True),
        ("W6A6", 6, 6, None, "token", True),
        ("w8a8", 8, 8, None, "token", True),
        ("w4a16", 4, 16, None, "token", True),
        ("w4a16g128", 4, 16, 128, "token", True),
        ("w8a8-tensor", 8, 8, None, "tensor", False),
        ("w8a8-tensor-dynamic", 8, 8, None, "tensor", True),
    ],
)
def test_parse_bits(text, w, a, group, gran, dynamic):
    spec = QuantSpec.parse(text)
    assert (spec.w_bits, spec.a_bits, spec.w_group_size, spec.a_granularity, spec.a_dynamic) == (
        w, a, group, gran, dynamic)


@pytest.mark.parametrize("text", ["w4a4", "w4a16g128", "w8a8-tensor-static", "w4a4-sym", "w4a4-wasym"])
def test_tag_round_trips(text):
    spec = QuantSpec.parse(text)
    assert QuantSpec.parse(spec.tag) == spec


def test_float_spec():
    spec = QuantSpec.parse("fp")
    assert spec.is_float and not spec.quantizes_weights and not spec.quantizes_activations
    assert QuantSpec.parse("w4a16").quantizes_weights and not QuantSpec.parse("w4a16").quantizes_activations


@pytest.mark.parametrize("bad", ["w4", "4a4", "w4a4x", "w1a4", "w9a8", "w4a1", "w4a4g0", "", "w4a4-token-static"])
def test_bad_bits_are_one_line_errors(bad):
    with pytest.raises(HarnessError) as exc:
        QuantSpec.parse_list(bad)
    assert "\n" not in str(exc.value)


def test_parse_list():
    assert [s.tag for s in QuantSpec.parse_list("w4a4, w6a6,w8a8")] == ["w4a4", "w6a6", "w8a8"]

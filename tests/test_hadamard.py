"""Hadamard matrices and the fast Walsh-Hadamard transform (qvlm_harness.quant.hadamard), against float64 dense
references; the online transform object (qvlm_harness.quant.online) against its dense matrix."""

from __future__ import annotations

import pytest
import torch

from qvlm_harness.errors import HarnessError
from qvlm_harness.quant.hadamard import (
    factor,
    hadamard_matrix,
    hadamard_transform,
    random_hadamard,
    random_orthogonal,
    random_signs,
)
from qvlm_harness.quant.online import OnlineHadamard

# the small orders the brief names (156 and 172 aside), the default model's and the tiny model's widths
WIDTHS = (1, 2, 4, 12, 20, 28, 36, 40, 52, 60, 108, 140, 24, 32, 64, 128, 256, 384, 576, 1536)


@pytest.mark.parametrize("n", WIDTHS)
def test_hadamard_matrices_are_orthogonal_with_equal_magnitude_entries(n):
    h = hadamard_matrix(n)
    assert h.dtype == torch.float64 and h.shape == (n, n)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    # a Hadamard matrix, not just any orthogonal one: every entry is +-1/sqrt(n)
    torch.testing.assert_close(h.abs(), torch.full_like(h, n ** -0.5), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("n", "expected"), [(576, (36, 16)), (1536, (12, 128)), (384, (12, 32)), (4096, (1, 4096)),
                                             (40, (20, 2)), (52, (52, 1))])
def test_widths_factor_into_a_small_order_times_a_power_of_two(n, expected):
    assert factor(n) == expected


@pytest.mark.parametrize("n", WIDTHS)
def test_fast_transform_equals_the_dense_product(n):
    x = torch.randn(3, 5, n, dtype=torch.float64)
    torch.testing.assert_close(hadamard_transform(x), x @ hadamard_matrix(n), rtol=0, atol=1e-12)
    x32 = x.float()
    got = hadamard_transform(x32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), x32.double() @ hadamard_matrix(n), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", (9, 6, 156, 172, 11008))
def test_a_width_without_a_known_construction_is_refused_in_one_line(n):
    with pytest.raises(HarnessError) as err:
        hadamard_matrix(n)
    text = str(err.value)
    assert "\n" not in text and f"order {n}" in text and "--rotate random" in text


def test_random_rotations_are_orthogonal_seeded_and_differ_by_seed():
    for make in (random_hadamard, random_orthogonal):
        q = make(64, 3)
        torch.testing.assert_close(q @ q.T, torch.eye(64, dtype=torch.float64), rtol=0, atol=1e-12)
        assert torch.equal(q, make(64, 3)) and not torch.equal(q, make(64, 4))
    s = random_signs(1000, 0)
    assert set(s.tolist()) == {-1.0, 1.0} and abs(float(s.mean())) < 0.15


@pytest.mark.parametrize(("order", "stride"), [(4, 32), (256, 1), (12, 8), (576, 1)])
def test_online_hadamard_applies_its_dense_matrix(order, stride):
    t = OnlineHadamard(order, stride)
    x = torch.randn(2, 7, t.width, dtype=torch.float64)
    m = t.matrix()
    torch.testing.assert_close(m @ m.T, torch.eye(t.width, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(t.apply(x), x @ m, rtol=0, atol=1e-12)
    assert OnlineHadamard.from_dict(t.to_dict()) == t


def test_online_hadamard_refuses_a_wrong_width_and_a_malformed_record():
    with pytest.raises(HarnessError, match="width 128"):
        OnlineHadamard(4, 32).apply(torch.zeros(2, 64))
    with pytest.raises(HarnessError, match="unknown online transform"):
        OnlineHadamard.from_dict({"kind": "dct", "order": 4})

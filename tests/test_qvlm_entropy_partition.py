"""Q-VLM entropy estimators (against direct numpy computations) and the entropy-guided partition."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from qvlm_harness.methods.qvlm.dependency import pearson_r, r_squared
from qvlm_harness.methods.qvlm.entropy import (
    histogram_entropy,
    histogram_entropy_per_sample,
    official_entropy,
    official_entropy_sample,
    soft_histogram_entropy,
)
from qvlm_harness.methods.qvlm.partition import partition, quantile


def np_entropy(values: np.ndarray, bins: int, lo: float, hi: float) -> float:
    counts, _ = np.histogram(values, bins=bins, range=(lo, hi))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def test_histogram_entropy_matches_numpy_over_chunks_and_masks():
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(3, 7, 5, generator=gen) * 2, torch.randn(2, 9, 5, generator=gen).exp()]
    masks = [torch.rand(3, 7, generator=gen) > 0.3, None]
    valid = np.concatenate([chunks[0][masks[0]].reshape(-1).numpy(), chunks[1].reshape(-1).numpy()]).astype(np.float64)
    for bins in (2, 16, 256):
        ref = np_entropy(valid, bins, valid.min(), valid.max())
        assert histogram_entropy(chunks, masks, bins) == pytest.approx(ref, abs=1e-9)
    # batching does not matter
    whole = torch.cat([chunks[0][masks[0]], chunks[1].reshape(-1, 5)])
    assert histogram_entropy([whole], None, 64) == pytest.approx(histogram_entropy(chunks, masks, 64), abs=1e-12)
    # a concentrated distribution has lower entropy than a spread one
    spread = [torch.rand(4, 50, 8, generator=gen)]
    peaked = [torch.cat([torch.zeros(4, 50, 7), torch.full((4, 50, 1), 100.0)], dim=-1) + 0.01 * spread[0]]
    assert histogram_entropy(peaked) < histogram_entropy(spread)


def test_per_sample_entropy_uses_the_global_bins():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 3, generator=gen)
    x[2] *= 5
    lo, hi = float(x.min()), float(x.max())
    got = histogram_entropy_per_sample([x], None, 32)
    ref = [np_entropy(x[i].reshape(-1).double().numpy(), 32, lo, hi) for i in range(4)]
    assert got == pytest.approx(ref, abs=1e-9)


def test_official_proxy_matches_the_released_formula():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(11, 4, generator=gen)
    a = np.abs(x.double().numpy())
    a = a / np.maximum(np.sqrt((a**2).sum(axis=0, keepdims=True)), 1e-12)  # F.normalize over tokens
    ref = float((-(a * np.log(a + 1e-7)).sum(axis=0)).mean())
    assert official_entropy_sample(x) == pytest.approx(ref, rel=1e-5)
    mask = torch.tensor([[True] * 11, [True] * 5 + [False] * 6])
    both = torch.stack([x, x])
    assert official_entropy([both], [mask]) == pytest.approx(
        (official_entropy_sample(x) + official_entropy_sample(x[:5])) / 2, rel=1e-6)


def test_soft_histogram_entropy_is_differentiable_and_exact_on_bin_centres():
    lo, hi, bins = 0.0, 8.0, 8
    centres = torch.tensor([0.5, 0.5, 1.5, 2.5, 2.5, 2.5, 7.5], requires_grad=True)
    h = soft_histogram_entropy(centres, lo, hi, bins)
    counts = np.array([2, 1, 1, 3]) / 7  # ignoring empty bins
    assert float(h) == pytest.approx(float(-(counts * np.log2(counts)).sum()), abs=1e-5)
    h.backward()
    assert centres.grad is not None and torch.isfinite(centres.grad).all()
    # moving values apart (towards new bins) raises the entropy: the gradient sees it
    x = torch.full((100,), 3.5, requires_grad=True)
    shifted = x + torch.linspace(-0.4, 0.4, 100)
    assert float(soft_histogram_entropy(shifted, lo, hi, bins)) > float(soft_histogram_entropy(x, lo, hi, bins))


def test_quantile_matches_numpy():
    rng = random.Random(0)
    vals = [rng.random() for _ in range(13)]
    for p in (0.0, 0.25, 0.5, 0.9, 1.0):
        assert quantile(vals, p) == pytest.approx(float(np.quantile(vals, p)), abs=1e-12)


def reference_partition(h: list[float], p: float, depth: int) -> list[list[int]]:
    q = float(np.quantile(h, p))
    blocks, current = [], [0]
    for i in range(1, len(h)):
        if h[i - 1] >= q and len(current) < depth:
            current.append(i)
        else:
            blocks.append(current)
            current = [i]
    return blocks + [current]


@pytest.mark.parametrize("seed", range(20))
def test_partition_obeys_threshold_and_max_depth(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    h = [rng.random() * 5 for _ in range(n)]
    p = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0])
    depth = rng.randint(1, 5)
    blocks = partition(h, p, depth)
    q = float(np.quantile(h, p))
    assert [i for b in blocks for i in b] == list(range(n))  # consecutive, complete, forward order
    for b in blocks:
        assert 1 <= len(b) <= depth
        assert all(h[i] >= q for i in b[:-1])  # every unit that took its successor had H >= quantile
    for prev in blocks[:-1]:
        assert h[prev[-1]] < q or len(prev) == depth  # a block closes only for low entropy or full depth
    assert blocks == reference_partition(h, p, depth)


def test_partition_extremes():
    h = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0]
    assert partition(h, 0.0, 3) == [[0, 1, 2], [3, 4, 5], [6]]  # every H >= min: blocks of max depth
    assert partition(h, 1.0, 3) == [[0], [1], [2], [3], [4], [5, 6]]  # only the maximum takes its successor
    assert partition(h, 0.5, 1) == [[i] for i in range(7)]  # depth 1 is layer-wise
    assert partition([], 0.5, 3) == []


def test_r_squared_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=30)
    y = 2 * x + rng.normal(scale=0.5, size=30)
    assert r_squared(list(x), list(y)) == pytest.approx(float(np.corrcoef(x, y)[0, 1] ** 2), abs=1e-12)
    assert r_squared([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == pytest.approx(1.0)
    assert pearson_r(list(x), list(y)) == pytest.approx(float(np.corrcoef(x, y)[0, 1]), abs=1e-12)
    assert pearson_r([1.0, 2.0, 3.0], [6.0, 4.0, 2.0]) == pytest.approx(-1.0)  # the sign R^2 hides
    assert math.isnan(r_squared([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))

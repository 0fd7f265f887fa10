"""Entropy-guided block partition (Q-VLM section 3.2).

High activation entropy signals strong cross-layer dependency of discretisation errors (the DED/entropy
correlation), so a high-entropy unit is searched jointly with its successor; low-entropy units are searched alone.
Greedy, in forward order, within one stack: unit l+1 joins unit l's block while ``H_l >= quantile_p(H)`` (the
p-quantile of the stack's entropies) and the block holds fewer than `max_depth` units. p = 1 gives layer-wise
search (only the maximum can pass, and then only when ties allow), p = 0 gives blocks of `max_depth`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def quantile(values: Sequence[float], p: float) -> float:
    """The p-quantile with linear interpolation (numpy's default definition)."""
    if not values:
        raise ValueError("quantile of an empty sequence")
    return float(torch.quantile(torch.tensor(list(values), dtype=torch.float64), p))


def partition(entropies: Sequence[float], p: float, max_depth: int) -> list[list[int]]:
    """Blocks (lists of consecutive unit indices) of one stack."""
    n = len(entropies)
    if n == 0:
        return []
    if max_depth < 1:
        raise ValueError("max_depth must be >= 1")
    threshold = quantile(entropies, p)
    blocks: list[list[int]] = [[0]]
    for i in range(1, n):
        if entropies[i - 1] >= threshold and len(blocks[-1]) < max_depth:
            blocks[-1].append(i)
        else:
            blocks.append([i])
    return blocks

"""Hadamard matrices for the widths rotations meet, and the fast Walsh-Hadamard transform that applies them.

A Hadamard matrix of order n has entries +-1 and ``H H^T = n I``; divided by ``sqrt(n)`` it is orthogonal, and
multiplying activations by it spreads an outlier channel over all channels (QuaRot). Orders are built as
``H_m (x) H_{2^k}`` (Kronecker product): the power-of-two factor by Sylvester's construction, the small factor m
by Paley's constructions from a prime power q (I: q = 3 mod 4 gives order q + 1; II: q = 1 mod 4 gives order
2(q + 1)). That covers 12, 20, 28, 36, 40 (= 20 x 2), 52 (q = 25), 60, 108, 140 and every width of the
embedded default (384 = 12 x 32, 576 = 36 x 16, 1536 = 12 x 128). Orders 156 and 172 (LLaMA-7B's 11008 =
172 x 64) need Williamson-type tables this module does not carry: such widths are refused in one line.

`hadamard_transform(x)` computes ``x @ H_n / sqrt(n)`` on the last dimension in O(n log n) for the power-of-two
factor (butterflies) plus O(n m) for the small dense factor, in float32 (float64 inputs stay float64); it equals
the dense product with `hadamard_matrix(n)`, which the tests check in float64.
"""

from __future__ import annotations

import math
from functools import cache, lru_cache
from itertools import product

import torch
from torch import Tensor

from qvlm_harness.errors import HarnessError

MAX_SMALL_ORDER = 256  # the largest dense factor searched for (larger ones would cost O(n m) per row anyway)


# -- small orders: Paley over GF(q), q a prime power p^k (k <= 3) ----------------------------------------------------
def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k for a prime p and k <= 3, else None."""
    for p in range(2, q + 1):
        if q % p == 0:
            k, r = 0, q
            while r % p == 0:
                r //= p
                k += 1
            return (p, k) if r == 1 and k <= 3 else None
    return None


def _field(p: int, k: int) -> tuple[list[tuple[int, ...]], set[tuple[int, ...]]]:
    """The elements of GF(p^k) as coefficient tuples (k = 1: the integers mod p) and its nonzero squares."""
    if k == 1:
        elems = [(a,) for a in range(p)]
        return elems, {((a * a) % p,) for a in range(1, p)}
    # a monic polynomial of degree 2 or 3 without a root in GF(p) is irreducible
    for tail in product(range(p), repeat=k):
        if tail[0] != 0 and all(
            (pow(x, k, p) + sum(c * pow(x, i, p) for i, c in enumerate(tail))) % p for x in range(p)
        ):
            poly = tail  # x^k = -(tail[0] + tail[1] x + ...)
            break
    else:  # pragma: no cover - one always exists
        raise HarnessError(f"no irreducible polynomial of degree {k} over GF({p})")

    def mul(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
        prod = [0] * (2 * k - 1)
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                prod[i + j] = (prod[i + j] + x * y) % p
        for deg in range(2 * k - 2, k - 1, -1):  # reduce x^deg with x^k = -tail
            c, prod[deg] = prod[deg], 0
            for i, t in enumerate(poly):
                prod[deg - k + i] = (prod[deg - k + i] - c * t) % p
        return tuple(prod[:k])

    elems = list(product(range(p), repeat=k))
    zero = (0,) * k
    return elems, {mul(a, a) for a in elems if a != zero}


def _jacobsthal(q: int) -> Tensor:
    """Q[i, j] = chi(e_j - e_i), chi the quadratic character of GF(q)."""
    p, k = _prime_power(q)  # type: ignore[misc]
    elems, squares = _field(p, k)
    zero = (0,) * k
    out = torch.zeros(q, q, dtype=torch.float64)
    for i, a in enumerate(elems):
        for j, b in enumerate(elems):
            d = tuple((y - x) % p for x, y in zip(a, b, strict=True))
            out[i, j] = 0.0 if d == zero else (1.0 if d in squares else -1.0)
    return out


def _paley1(q: int) -> Tensor:
    """Order q + 1 (q = 3 mod 4): H = I + S with S = [[0, 1^T], [-1, Q]] skew-symmetric."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + s


def _paley2(q: int) -> Tensor:
    """Order 2(q + 1) (q = 1 mod 4): C = [[0, 1^T], [1, Q]] symmetric, H = C (x) [[1, -1], [-1, -1]] + I (x)
    [[1, 1], [1, -1]]."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 0] = 1.0
    c[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


@cache
def _small(m: int) -> Tensor | None:
    """An unnormalised Hadamard matrix of order m from Paley's constructions (None when neither applies)."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if m % 4:
        return None
    q = m - 1
    if q % 4 == 3 and _prime_power(q):
        return _paley1(q)
    q = m // 2 - 1
    if q % 4 == 1 and _prime_power(q):
        return _paley2(q)
    return None


def factor(n: int) -> tuple[int, int]:
    """(m, 2^k) with n = m * 2^k, m the smallest order with a known construction; a width without one is refused."""
    if n < 1:
        raise HarnessError(f"a Hadamard matrix needs a positive order, got {n}")
    k = (n & -n).bit_length() - 1  # the power of two dividing n
    for j in range(k, -1, -1):  # the largest power-of-two factor first: the cheapest transform
        m = n >> j
        if m <= MAX_SMALL_ORDER and _small(m) is not None:
            return m, 1 << j
    raise HarnessError(f"no Hadamard matrix of order {n} is known here (it must be m x 2^k with m built by Paley's "
                       "constructions, e.g. 12, 20, 28, 36, 52, 60, 108, 140; 156 and 172 are not carried): use "
                       "--rotate random, or a model of another width")


def has_hadamard(n: int) -> bool:
    """True when `factor(n)` finds a construction."""
    try:
        factor(n)
    except HarnessError:
        return False
    return True


@lru_cache(maxsize=16)
def _sylvester(n: int) -> Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@lru_cache(maxsize=32)
def hadamard_matrix(n: int) -> Tensor:
    """The orthogonal (normalised) Hadamard matrix of order n, float64: ``H_m (x) H_{2^k} / sqrt(n)``."""
    m, p = factor(n)
    small = _small(m)
    assert small is not None
    return torch.kron(small, _sylvester(p)) / math.sqrt(n)


@lru_cache(maxsize=32)
def _small_normalised(m: int) -> Tensor:
    small = _small(m)
    assert small is not None
    return small / math.sqrt(m)


def random_signs(n: int, seed: int) -> Tensor:
    """A seeded +-1 vector (float64), the diagonal that randomises a Hadamard matrix."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, 2, (n,), generator=g, dtype=torch.int64).to(torch.float64) * 2 - 1


def random_hadamard(n: int, seed: int) -> Tensor:
    """``diag(s) H_n``: orthogonal, float64, seeded (QuaRot's randomised Hadamard)."""
    return random_signs(n, seed)[:, None] * hadamard_matrix(n)


def random_orthogonal(n: int, seed: int) -> Tensor:
    """A seeded Haar-random orthogonal matrix (QR of a Gaussian with the signs of R's diagonal fixed), float64."""
    g = torch.Generator().manual_seed(int(seed))
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))[None, :]).contiguous()


RADIX_BITS = 4  # butterflies of 2^4 = 16 inputs: each stage one small matrix product instead of four add/sub passes


def _fwht(x: Tensor) -> Tensor:
    """Unnormalised Walsh-Hadamard transform along the last dimension (a power of two n = 2^k), Sylvester order,
    as a radix-16 fast transform: ceil(k / 4) stages, each a 16-point (or smaller) Hadamard applied to one group
    of index bits (``H_{2^k}`` is the Kronecker product of the stages' matrices), O(n log n) work in few ops."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    k = n.bit_length() - 1
    done = 0  # low index bits already transformed
    while done < k:
        bits = min(RADIX_BITS, k - done)
        r, inner = 1 << bits, 1 << done
        h = _sylvester(r).to(device=x.device, dtype=x.dtype)
        y = x.reshape(*lead, n // (r * inner), r, inner)
        x = torch.matmul(h, y).reshape(*lead, n)  # H_r is symmetric: h @ y transforms the r axis
        done += bits
    return x


def hadamard_transform(x: Tensor, n: int | None = None) -> Tensor:
    """``x @ hadamard_matrix(n)`` along the last dimension (n defaults to its size), computed as a fast
    Walsh-Hadamard transform for the 2^k factor and a dense product for the small factor m; float32 compute
    (float64 stays float64), returned in `x`'s dtype."""
    n = x.shape[-1] if n is None else n
    if x.shape[-1] != n:
        raise ValueError(f"hadamard_transform of order {n} on a last dimension of {x.shape[-1]}")
    m, p = factor(n)
    dtype = x.dtype
    work = x if dtype == torch.float64 else x.float()
    lead = work.shape[:-1]
    y = _fwht(work.reshape(*lead, m, p))
    if m > 1:
        hm = _small_normalised(m).to(device=y.device, dtype=y.dtype)
        y = torch.matmul(y.transpose(-1, -2), hm).transpose(-1, -2)
    return (y / math.sqrt(p)).reshape(*lead, n).to(dtype)

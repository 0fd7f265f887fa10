"""LoRC (ZeroQuant-V2's low-rank compensation): ``W ~ Q(W) + U_m V_m`` with the rank-m truncated SVD of the
quantization error ``E = W - Q(W) = U S V^T``: ``U_m = U[:, :m] S_m^(1/2)``, ``V_m = S_m^(1/2) V[:, :m]^T``.

`LoRCLinear` wraps the quantized layer as a child module (``.qlinear``, a `QLinear` that a packed-kernel
converter may replace) and adds the low-rank path ``x_q @ V_m^T @ U_m^T`` on the same quantized input. The
factors are kept in `bits` (8 by default: symmetric per row, as the paper allows) or float (16).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qvlm_harness.quant.codec import ModuleCodec, StoredModule, attach_codec
from qvlm_harness.quant.quantizer import dequantize, quantize_weight


def lorc_factors(E: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(U_m [out, m], V_m [m, in]) with ``U_m @ V_m`` the best rank-m approximation of `E` (Eckart-Young).

    Only the top `rank` singular pairs are needed, so they come from the symmetric eigendecomposition of the
    smaller Gram matrix (``E^T E`` or ``E E^T``, float64) rather than a full SVD: about 4x faster at the default
    model's widths (a full float64 SVD per layer was most of ZeroQuant-V2's search time). Squaring the matrix
    costs accuracy only in the smallest singular values; the top ones keep float64 relative accuracy far below
    the float32 the factors are stored in."""
    Ed = E.detach().double()
    out, inp = Ed.shape
    m = min(rank, out, inp)
    if m == 0:
        return Ed.new_zeros(out, 0).float(), Ed.new_zeros(0, inp).float()
    wide = out <= inp  # eigendecompose the out x out Gram (left vectors) when it is the smaller one
    evals, evecs = torch.linalg.eigh(Ed @ Ed.T if wide else Ed.T @ Ed)  # ascending
    sigma = evals[-m:].flip(0).clamp(min=0).sqrt()
    top = evecs[:, -m:].flip(1)
    safe = sigma.clamp(min=torch.finfo(torch.float64).tiny)
    root = sigma.sqrt()
    if wide:  # E = U S V^T with U = top:  V^T = S^-1 U^T E
        U, Vh = top, (top.T @ Ed) / safe[:, None]
    else:  # V = top:  U = E V S^-1
        U, Vh = (Ed @ top) / safe[None, :], top.T
    return (U * root).float(), (root[:, None] * Vh).float()


class LoRCLinear(nn.Module):
    def __init__(self, qlinear: nn.Module, U: Tensor, V: Tensor, bits: int = 8, name: str = ""):
        super().__init__()
        self.qlinear = qlinear
        self.name = name
        self.rank = int(U.shape[1])
        self.bits = int(bits)
        self.in_features, self.out_features = int(V.shape[1]), int(U.shape[0])
        if self.bits < 16:
            uc, uq = quantize_weight(U, self.bits, True)
            vc, vq = quantize_weight(V, self.bits, True)
            self.register_buffer("u_codes", uc)
            self.register_buffer("u_scale", uq.scale.float())
            self.register_buffer("v_codes", vc)
            self.register_buffer("v_scale", vq.scale.float())
            self.register_buffer("u", None, persistent=False)
            self.register_buffer("v", None, persistent=False)
            self.refresh()
        else:
            self.register_buffer("u", U.detach().float().clone())
            self.register_buffer("v", V.detach().float().clone())

    def refresh(self) -> None:
        """Rebuild the float factors from their codes (after loading a checkpoint)."""
        if self.bits >= 16:
            return
        from qvlm_harness.quant.quantizer import QParams

        zu = torch.zeros_like(self.u_scale, dtype=torch.int32)
        zv = torch.zeros_like(self.v_scale, dtype=torch.int32)
        self.u = dequantize(self.u_codes, QParams(self.u_scale, zu, self.bits, True))
        self.v = dequantize(self.v_codes, QParams(self.v_scale, zv, self.bits, True))

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh()

    def lowrank_weight(self) -> Tensor:
        return self.u @ self.v

    def forward(self, x: Tensor) -> Tensor:
        y = self.qlinear(x)
        qin = getattr(self.qlinear, "quantize_input", None)
        xq = qin(x) if callable(qin) else x
        return y + F.linear(F.linear(xq, self.v.to(x.dtype)), self.u.to(x.dtype))

    def weight_storage_bytes(self, packed: bool) -> int:
        """The factors only (the wrapped layer reports its own weight)."""
        numel = self.rank * (self.in_features + self.out_features)
        if packed:
            if self.bits >= 16:
                return 2 * numel
            return math.ceil(self.bits * numel / 8) + 2 * (self.u_scale.numel() + self.v_scale.numel())
        bufs = [getattr(self, n, None) for n in ("u", "v", "u_codes", "v_codes", "u_scale", "v_scale")]
        return sum(t.numel() * t.element_size() for t in bufs if t is not None)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, factor_bits={self.bits}"


# -- checkpoint codec -----------------------------------------------------------------------------------------------
# Stored: the factors (their codes and per-row scales, or float) as the wrapper's own tensors; the wrapped layer is a
# child encoded by its own codec, so whatever quantized type a method wraps saves as that type does.
_FACTOR_CODES = ("u_codes", "u_scale", "v_codes", "v_scale")


def _codec_meta(m: LoRCLinear) -> dict:
    return {"rank": m.rank, "bits": m.bits, "in": m.in_features, "out": m.out_features, "name": m.name}


def _codec_build(s: StoredModule) -> LoRCLinear:
    inner = s.children.get("qlinear")
    if inner is None:
        s.fail("the wrapped layer 'qlinear' is missing")
    r, o, i, bits = s.ints("rank", "out", "in", "bits")
    name = s.meta.get("name", "")
    if bits < 16:
        s.need(_FACTOR_CODES)
        m = LoRCLinear(inner, torch.zeros(o, r), torch.zeros(r, i), bits, name=name)
        for k in _FACTOR_CODES:
            setattr(m, k, s.shaped(k, tuple(getattr(m, k).shape)).to(getattr(m, k).dtype))
        m.refresh()
        return m
    s.need({"u", "v"})
    return LoRCLinear(inner, s.shaped("u", (o, r)), s.shaped("v", (r, i)), 16, name=name)


attach_codec(ModuleCodec("LoRCLinear", LoRCLinear, _codec_meta, _codec_build, facts=lambda meta: None,
                         children=("qlinear",)))

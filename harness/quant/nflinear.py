"""`NFLinear`: a linear layer with NormalFloat (NF4 / NFk) blockwise weights, as QLoRA stores them.

Two executions of the same state:
* ``backend="bnb"``: bitsandbytes' `matmul_4bit` on the packed 4-bit weight and its QuantState (real 4-bit
  storage; bitsandbytes' CPU kernels). Only for 4 bits and when activations stay in float (bitsandbytes has no
  activation quantizer).
* ``backend="harness"``: the weight dequantized once (bit-identical to bitsandbytes' dequantization) and
  multiplied in float after the shared activation fake-quantizer: simulated.

Persistent buffers: ``qweight`` (packed 4-bit, or one uint8 code per value for other widths), the block
statistics (``absmax_q``, ``absmax2``, ``code2``, ``offset`` with double quantization, else ``absmax``) and
``bias``. The dequantized ``weight`` is a non-persistent cache rebuilt from them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qvlm_harness.config import QuantSpec
from qvlm_harness.errors import HarnessError
from qvlm_harness.quant.actquant import ActQuantMixin
from qvlm_harness.quant.codec import (
    ModuleCodec,
    ModuleFacts,
    StoredModule,
    attach_codec,
    dtype_name,
    spec_facts,
    spec_from_dict,
)
from qvlm_harness.quant.nf4 import NFState, pack_4bit, to_bnb, unpack_4bit


class NFLinear(ActQuantMixin, nn.Module):
    def __init__(self, state: NFState, bias: Tensor | None, spec: QuantSpec, *, name: str = "",
                 backend: str = "harness", dtype: torch.dtype = torch.float32):
        super().__init__()
        if backend not in ("harness", "bnb"):
            raise HarnessError(f"unknown NormalFloat backend {backend!r}: use 'harness' or 'bnb'")
        if backend == "bnb" and (state.bits != 4 or spec.quantizes_activations):
            raise HarnessError("the bitsandbytes backend runs 4-bit NormalFloat with float activations only")
        self.out_features, self.in_features = state.shape
        self.bits = state.bits
        self.blocksize = state.blocksize
        self.blocksize2 = state.blocksize2
        self.double_quant = state.double_quant
        self.backend = backend
        self.init_act_quant(spec, name)
        q = pack_4bit(state.codes) if state.bits == 4 else state.codes.reshape(-1).to(torch.uint8)
        self.register_buffer("qweight", q.clone())
        if state.double_quant:
            self.register_buffer("absmax_q", state.absmax_q.clone())
            self.register_buffer("absmax2", state.absmax2.float().clone())
            self.register_buffer("code2", state.code2.float().clone())
            self.register_buffer("offset", state.offset.float().reshape(()).clone())
        else:
            self.register_buffer("absmax", state.absmax.float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("weight", None, persistent=False)
        self._bnb = None
        self.refresh(dtype)

    def state(self) -> NFState:
        numel = self.out_features * self.in_features
        codes = unpack_4bit(self.qweight.cpu(), numel) if self.bits == 4 else self.qweight.cpu()
        st = NFState((self.out_features, self.in_features), self.bits, self.blocksize, codes,
                     blocksize2=self.blocksize2)
        if self.double_quant:
            st.absmax_q, st.absmax2 = self.absmax_q.cpu(), self.absmax2.cpu()
            st.code2, st.offset = self.code2.cpu(), self.offset.cpu()
        else:
            st.absmax = self.absmax.cpu()
        return st

    def refresh(self, dtype: torch.dtype | None = None) -> None:
        """Rebuild the execution cache (dequantized weight, or bitsandbytes' QuantState) from the buffers."""
        dtype = dtype or (self.weight.dtype if self.weight is not None else torch.float32)
        device = self.qweight.device
        if self.backend == "bnb":
            self.weight = None
            packed, qs = to_bnb(self.state())
            qs.to(device)
            self._bnb = (packed.to(device), qs)
        else:
            self.weight = self.state().dequantize(dtype).to(device)

    def _apply(self, fn, recurse: bool = True):
        """Keep the block statistics and static activation range in float32 through ``model.to(dtype)``."""
        names = ("absmax2", "code2", "offset", "absmax", "a_scale")
        keep = {n: getattr(self, n, None) for n in names}
        out = super()._apply(fn, recurse)
        for n, old in keep.items():
            new = getattr(self, n, None)
            if old is not None and new is not None and new.dtype != old.dtype:
                setattr(self, n, old.to(new.device))
        bnb_cache = getattr(self, "_bnb", None)
        if bnb_cache is not None and bnb_cache[0].device != self.qweight.device:
            self.refresh()  # bitsandbytes' QuantState is no buffer: rebuild it on the new device
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh()

    def forward(self, x: Tensor) -> Tensor:
        xq = self.quantize_input(x)
        if self.backend == "bnb":
            import bitsandbytes as bnb

            if self._bnb is None:
                self.refresh()
            packed, qs = self._bnb
            b = None if self.bias is None else self.bias.to(x.dtype)
            return bnb.matmul_4bit(xq, packed.t(), quant_state=qs, bias=b)
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(xq, w, b)

    def weight_storage_bytes(self, packed: bool) -> int:
        """``packed``: codes at `bits` each plus the block statistics (8-bit absmax codes + float32 second-level
        absmax and offset with double quantization, float32 absmax without). Otherwise what is held now."""
        numel = self.out_features * self.in_features
        if packed:
            stats = (self.absmax_q.numel() + 4 * (self.absmax2.numel() + 1) if self.double_quant
                     else 4 * self.absmax.numel())
            return math.ceil(self.bits * numel / 8) + stats
        bufs = [self.qweight, self.weight] + ([self.absmax_q, self.absmax2, self.code2, self.offset]
                                             if self.double_quant else [self.absmax])
        return sum(t.numel() * t.element_size() for t in bufs if t is not None)

    def extra_repr(self) -> str:
        a = "a16" if not self.spec.quantizes_activations else f"a{self.a_bits} {self.a_granularity}"
        return (f"in={self.in_features}, out={self.out_features}, NF{self.bits} block{self.blocksize}"
                f"{' double-quant' if self.double_quant else ''}, {a}, backend={self.backend}")


# -- checkpoint codec -----------------------------------------------------------------------------------------------
# Stored: the packed codes and block statistics (the persistent buffers) and the bias / static activation range; the
# dequantized weight (or bitsandbytes' QuantState) is rebuilt from them. `nf_state_tensors` / `nf_state_from` are
# the NormalFloat part on its own, for other module types that hold an `NFState` (e.g. qvlm-official's layers).
def nf_state_meta(state: NFState) -> dict:
    return {"bits": state.bits, "blocksize": state.blocksize, "blocksize2": state.blocksize2,
            "double_quant": state.double_quant}


def nf_state_tensors(state: NFState) -> dict[str, Tensor]:
    """The tensors that store `state`: codes packed two a byte at 4 bits (one byte each otherwise) and the block
    statistics, under the names `NFLinear` uses for its buffers."""
    q = pack_4bit(state.codes) if state.bits == 4 else state.codes.reshape(-1).to(torch.uint8)
    if state.double_quant:
        return {"qweight": q, "absmax_q": state.absmax_q, "absmax2": state.absmax2.float(),
                "code2": state.code2.float(), "offset": state.offset.float().reshape(())}
    return {"qweight": q, "absmax": state.absmax.float()}


def nf_stat_names(double_quant: bool) -> set[str]:
    return {"qweight"} | ({"absmax_q", "absmax2", "code2", "offset"} if double_quant else {"absmax"})


def nf_state_from(s: StoredModule, shape: tuple[int, int]) -> NFState:
    """The `NFState` of shape `shape` stored in `s` (metadata from `nf_state_meta`, tensors from
    `nf_state_tensors`), with every size checked so an inconsistent checkpoint fails in one line."""
    bits, blocksize, blocksize2 = s.ints("bits", "blocksize", "blocksize2")
    if not 2 <= bits <= 8 or blocksize < 1 or blocksize2 < 1:
        s.fail(f"invalid NormalFloat layout (bits {bits}, blocks {blocksize}/{blocksize2})")
    numel = shape[0] * shape[1]
    blocks = math.ceil(numel / blocksize)
    q = s.shaped("qweight", ((numel + 1) // 2,) if bits == 4 else (numel,))
    codes = unpack_4bit(q, numel) if bits == 4 else q.to(torch.uint8)
    st = NFState(tuple(shape), bits, blocksize, codes, blocksize2=blocksize2)
    if s.meta_field("double_quant"):
        st.absmax_q = s.shaped("absmax_q", (blocks,)).to(torch.uint8)
        st.absmax2 = s.shaped("absmax2", (math.ceil(blocks / blocksize2),)).float()
        st.code2 = s.shaped("code2", (256,)).float()
        st.offset = s.shaped("offset", ()).float()
    else:
        st.absmax = s.shaped("absmax", (blocks,)).float()
    if int(codes.max()) >= 2**bits:
        s.fail(f"codes exceed {bits} bits")
    return st


def _codec_meta(m: NFLinear) -> dict:
    return {"in": m.in_features, "out": m.out_features, "bits": m.bits, "blocksize": m.blocksize,
            "blocksize2": m.blocksize2, "double_quant": m.double_quant, "backend": m.backend,
            "spec": m.spec.to_dict(), "name": m.name,
            "dtype": dtype_name(m.weight.dtype if m.weight is not None else torch.float32)}


def _codec_build(s: StoredModule) -> NFLinear:
    from qvlm_harness.quant.nf4 import bnb_available

    s.need(nf_stat_names(bool(s.meta_field("double_quant"))), {"bias", "a_scale", "a_zero"})
    state = nf_state_from(s, s.ints("out", "in"))
    backend = s.meta_field("backend")
    if backend == "bnb" and not bnb_available():
        raise HarnessError("this checkpoint runs NF4 layers through bitsandbytes, which is not installed: "
                           "pip install 'qvlm-harness[bnb]'")
    spec = spec_from_dict(s.meta_field("spec"), f"checkpoint module {s.name}")
    m = NFLinear(state, s.tensors.get("bias"), spec, name=s.meta.get("name", ""), backend=backend, dtype=s.dtype())
    if ("a_scale" in s.tensors) != ("a_zero" in s.tensors):
        s.fail("a_scale and a_zero must be stored together")
    if "a_scale" in s.tensors:
        m.a_scale, m.a_zero = s.tensors["a_scale"].float(), s.tensors["a_zero"].to(torch.int32)
    return m


def _codec_facts(meta: dict) -> ModuleFacts:
    spec = spec_facts(meta.get("spec") or {}) | {"w_bits": meta.get("bits")}
    return ModuleFacts(spec, "real" if meta.get("backend") == "bnb" else "simulated")


attach_codec(ModuleCodec("NFLinear", NFLinear, _codec_meta, _codec_build, _codec_facts))

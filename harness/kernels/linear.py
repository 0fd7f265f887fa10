"""Packed linear layers: integer codes really stored low-bit, and integer (or int4-weight) GEMMs really run.

* `IntLinear` (WxAy, x, y <= 8): weights as int8 (5..8 bits) or two nibbles per byte (2..4 bits); the input is
  quantized on the fly (per token or per tensor, dynamic or static) to int8 codes; ``torch._int_mm`` (or the
  fused CPU kernel of `qvlm_harness.kernels.cpu`) computes the exact int32 products; the epilogue applies the
  scales and the zero-point corrections:

      y = s_x * s_w * (sum_k (x_q - z_x)(w_q - z_w))
        = s_x * s_w * (x_q W_q^T - z_x * rowsum(W_q) - z_w * rowsum(x_q) + K z_x z_w)

  With group-wise weight scales the sum runs per group of input channels and each group's int32 result is
  scaled before they are added.
* `WeightOnlyLinear` (WxA16): 2..4-bit weights through torch's int4pack kernels, which compute in bfloat16
  (``aten._weight_int4pack_mm_for_cpu`` on the CPU, ``aten._weight_int4pack_mm`` on CUDA GPUs of compute
  capability 8.0+, see `qvlm_harness.kernels.int4pack`), 5..8-bit weights stored as int8 and dequantized per
  call; where no int4 kernel runs (other GPUs, group sizes it lacks) the int4 codes stay packed and are
  unpacked and dequantized per call (`kernel_note` says why).

Every packed module reports `weight_storage_bytes` as the bytes it really holds (codes incl. padding, scales,
zero points, precomputed row sums), so `qvlm_harness.measure.weight_bytes` measures the real footprint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qvlm_harness.errors import HarnessError
from qvlm_harness.kernels import cpu as cpu_kernels
from qvlm_harness.kernels.actquant import quantize_activations
from qvlm_harness.kernels.gemm import int_mm
from qvlm_harness.kernels.packing import PackedCodes, unpack_int4

BACKENDS = ("auto", "torch", "cpp", "compile")


class PackedLinear(nn.Module):
    """Common base: sizes, bias handling and the storage report."""

    in_features: int
    out_features: int
    bias: Tensor | None

    def weight_storage_bytes(self, packed: bool) -> int:
        """Bytes of every buffer except the bias: the packed form is the stored form, so `packed` is ignored."""
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers(recurse=False)
                   if b is not None and n != "bias" and n not in self._cache_names)

    _cache_names: tuple[str, ...] = ()

    def _add_bias(self, y: Tensor) -> Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)


class IntLinear(PackedLinear):
    """Integer GEMM linear layer (W2..8 A2..8); see the module docstring for the arithmetic."""

    qweight: Tensor
    w_scale: Tensor
    w_zero: Tensor | None
    w_rowsum: Tensor
    a_scale: Tensor | None
    a_zero: Tensor | None

    def __init__(self, packed: PackedCodes, w_scale: Tensor, w_zero: Tensor | None, bias: Tensor | None, *,
                 group_size: int | None, a_bits: int, a_symmetric: bool, a_per_token: bool,
                 a_scale: Tensor | None = None, a_zero: Tensor | None = None, name: str = "",
                 backend: str = "auto"):
        """`w_scale` float32 ``[N or 1, G]``; `w_zero` int32 centred zero ``[N or 1, G]`` (None: symmetric);
        `a_scale`/`a_zero` a static per-tensor range (uncentred zero), None for dynamic quantization."""
        super().__init__()
        if backend not in BACKENDS:
            raise HarnessError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        centred = packed.centred()
        n, k = centred.shape
        self.in_features, self.out_features = k, n
        self.w_bits, self.w_symmetric, self.fmt = packed.bits, packed.symmetric, packed.fmt
        self.group_size = group_size
        groups = 1 if group_size is None else k // group_size
        if w_scale.dim() != 2 or w_scale.shape[1] != groups or w_scale.shape[0] not in (1, n):
            raise ValueError(f"w_scale shape {tuple(w_scale.shape)} does not fit {groups} group(s) of [{n}, {k}]")
        self.a_bits, self.a_symmetric, self.a_per_token = a_bits, a_symmetric, a_per_token
        self.name = name
        self.backend = backend
        self.register_buffer("qweight", packed.data)
        self.register_buffer("w_scale", w_scale.detach().float().contiguous())
        self.register_buffer("w_zero", None if w_zero is None else w_zero.detach().to(torch.int32).contiguous())
        rowsum = centred.to(torch.int32).reshape(n, groups, -1).sum(-1, dtype=torch.int32)
        self.register_buffer("w_rowsum", rowsum.contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        static = a_scale is not None and a_zero is not None
        self.register_buffer("a_scale", a_scale.detach().float().reshape(()) if static else None)
        self.register_buffer("a_zero", a_zero.detach().to(torch.int32).reshape(()) if static else None)
        # python copies of the static range for the fused kernel's scalar arguments (no tensor read per call)
        self.static_scale = float(a_scale) if static else None
        self.static_zero = int(a_zero) if static else None
        self._compiled = None
        self._cpp_args: tuple | None = None

    @property
    def groups(self) -> int:
        return self.w_scale.shape[1]

    def weight_codes(self) -> Tensor:
        """Centred int8 weight codes ``[N, K]`` (unpacked per call for int4 storage)."""
        return self.qweight if self.fmt == "int8" else unpack_int4(self.qweight, self.in_features)

    def resolved_backend(self, x: Tensor) -> str:
        """'auto' means the fused CPU kernel when it is usable (`cpu_kernels.auto_uses_cpp`) and the input is on
        the CPU, else plain torch around ``torch._int_mm``."""
        if self.backend == "auto":
            return "cpp" if x.device.type == "cpu" and cpu_kernels.auto_uses_cpp() else "torch"
        if self.backend == "cpp" and (x.device.type != "cpu" or not cpu_kernels.available()):
            why = cpu_kernels.unavailable_reason() or f"input on {x.device}"
            raise HarnessError(f"the fused CPU kernel cannot run here ({why}); use the 'torch' kernel backend")
        return self.backend

    def _apply(self, fn, recurse: bool = True):
        self._cpp_args = None  # buffers may be new tensors now
        return super()._apply(fn, recurse)

    def cpp_args(self) -> tuple:
        """The fused kernel's arguments after the input, built once (the per-call cost is the call itself)."""
        if self._cpp_args is None:
            static = self.a_scale is not None
            self._cpp_args = (
                self.qweight, 8 if self.fmt == "int8" else 4, self.w_scale, self.w_zero, self.w_rowsum,
                self.group_size or self.in_features, self.bias, self.a_bits, self.a_symmetric, self.a_per_token,
                self.static_scale if static else 0.0, self.static_zero if static else 0, static, cpu_kernels.SMALL_M)
        return self._cpp_args

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        backend = self.resolved_backend(x)
        if backend == "cpp":
            y = cpu_kernels.int_linear(x2, self.cpp_args(), self.name)
        elif backend == "compile":
            y = self._compiled_forward()(x2)
        else:
            y = self.forward_torch(x2)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def quantize_input(self, x: Tensor) -> Tensor:
        """The input as this layer sees it, dequantized (same shape and dtype as `x`; equal to the QLinear's
        fake-quantized input). Wrappers such as LoRC feed it to their own low-rank path, as around a QLinear."""
        what = f"the input activations of layer {self.name}" if self.name else "the input activations"
        qa = quantize_activations(x.reshape(-1, self.in_features), self.a_bits, self.a_symmetric,
                                  per_token=self.a_per_token, scale=self.a_scale, zero=self.a_zero, what=what)
        return ((qa.codes.float() - qa.zero) * qa.scale).reshape(x.shape).to(x.dtype)

    def forward_torch(self, x2: Tensor) -> Tensor:
        """Reference-grade path in plain torch ops (CPU and CUDA): float32 ``[M, N]``."""
        what = f"the input activations of layer {self.name}" if self.name else "the input activations"
        qa = quantize_activations(x2, self.a_bits, self.a_symmetric, per_token=self.a_per_token,
                                  scale=self.a_scale, zero=self.a_zero, what=what)
        w = self.weight_codes()
        k = self.in_features
        if self.groups == 1:
            y = self._corrected(int_mm(qa.codes, w.t()), qa.codes, qa.zero, 0, k).float()
            y = y * (qa.scale * self.w_scale[:, 0])
        else:
            g = self.group_size
            assert g is not None
            y = torch.zeros(x2.shape[0], self.out_features, dtype=torch.float32, device=x2.device)
            for i in range(self.groups):
                xs = qa.codes[:, i * g:(i + 1) * g].contiguous()
                acc = self._corrected(int_mm(xs, w[:, i * g:(i + 1) * g].t()), xs, qa.zero, i, g)
                y += acc.float() * self.w_scale[:, i]
            y = y * qa.scale
        return self._add_bias(y)

    def _corrected(self, acc: Tensor, xq: Tensor, zx: Tensor, group: int, width: int) -> Tensor:
        """``sum (x_q - z_x)(w_q - z_w)`` from the raw int32 products of one group (exact, int32)."""
        if not self.a_symmetric:
            acc = acc - zx * self.w_rowsum[:, group]
        if self.w_zero is not None:
            zw = self.w_zero[:, group]
            acc = acc - xq.sum(-1, keepdim=True, dtype=torch.int32) * zw
            if not self.a_symmetric:
                acc = acc + width * zx * zw
        return acc

    def _compiled_forward(self):
        if self._compiled is None:
            self._compiled = torch.compile(self.forward_torch, dynamic=True)
        return self._compiled

    def extra_repr(self) -> str:
        gran = f"group{self.group_size}" if self.group_size else ("channel" if self.w_scale.shape[0] > 1 else "tensor")
        w = f"w{self.w_bits} {'sym' if self.w_symmetric else 'asym'} per-{gran} {self.fmt} storage"
        kind = "static" if self.a_scale is not None else "dynamic"
        a = f"a{self.a_bits} {'sym' if self.a_symmetric else 'asym'} per-{'token' if self.a_per_token else 'tensor'}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{w}, {a} {kind}, backend={self.backend}, packed")


INT4PACK_GROUPS = (256, 128, 64, 32)


class WeightOnlyLinear(PackedLinear):
    """Weight-only quantized linear (WxA16): integer codes stored packed, float activations."""

    qweight: Tensor
    w_scale: Tensor
    w_zero: Tensor | None
    scales_and_zeros: Tensor | None

    def __init__(self, packed: PackedCodes, w_scale: Tensor, w_zero: Tensor | None, bias: Tensor | None, *,
                 group_size: int | None, name: str = "", device: torch.device | str = "cpu"):
        super().__init__()
        centred = packed.centred()
        n, k = centred.shape
        self.in_features, self.out_features = k, n
        self.w_bits, self.w_symmetric, self.fmt = packed.bits, packed.symmetric, packed.fmt
        self.group_size = group_size
        self.name = name
        groups = 1 if group_size is None else k // group_size
        w_scale = w_scale.detach().float().expand(n, groups).contiguous()
        w_zero = None if w_zero is None else w_zero.detach().to(torch.int32).expand(n, groups).contiguous()
        self.kernel = "dequant"
        self.kernel_note: str | None = None  # why the int4 kernel does not run (None when it does or 5..8 bits)
        self.int4pack_group = None
        self.int4pack_device = torch.device(device).type  # the int4pack layout is device-specific
        if packed.fmt == "int4":
            self.int4pack_group = self._int4pack_group(k, group_size)
            self.kernel_note = self._int4pack_blocker(torch.device(device), group_size)
            if self.kernel_note is not None:
                self.int4pack_group = None
        if self.int4pack_group is not None:
            self.kernel = "int4pack"
            self._init_int4pack(centred, w_scale, w_zero, torch.device(device))
        else:
            self.register_buffer("qweight", packed.data)
            self.register_buffer("w_scale", w_scale)
            self.register_buffer("w_zero", w_zero)
            self.register_buffer("scales_and_zeros", None)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @staticmethod
    def _int4pack_group(k: int, group_size: int | None) -> int | None:
        """The kernel's group size: the spec's (if the kernel has it), else the largest one dividing K padded to
        a multiple of 32 (per-channel scales are then repeated per group); None if nothing fits."""
        if group_size is not None:
            return group_size if group_size in INT4PACK_GROUPS else None
        kp = -(-k // 32) * 32
        return next(g for g in INT4PACK_GROUPS if kp % g == 0)

    def _int4pack_blocker(self, device: torch.device, group_size: int | None) -> str | None:
        """Why the int4pack kernel cannot hold this layer on `device` (None when it can)."""
        from qvlm_harness.kernels.int4pack import cuda_int4pack_blocker

        if self.int4pack_group is None:
            return f"group size {group_size} is none of the int4 kernel's {', '.join(map(str, INT4PACK_GROUPS))}"
        if device.type == "cpu":
            return None
        if device.type == "cuda":
            return cuda_int4pack_blocker(device)
        return f"no int4 kernel on {device.type}"

    def _init_int4pack(self, centred: Tensor, w_scale: Tensor, w_zero: Tensor | None,
                       device: torch.device) -> None:
        """Pack for ``aten._weight_int4pack_mm_for_cpu`` (CPU) or ``aten._weight_int4pack_mm`` (CUDA, see
        `qvlm_harness.kernels.int4pack`): both compute ``w = (nibble - 8) * s + z`` per group, and our weight is
        ``s * (v - z_c)`` with ``v = nibble - 8`` the centred code, so ``z = -s * z_c``. The layout is built on
        the CPU (no-op copies there) and only the packed result goes to `device`."""
        centred, w_scale = centred.cpu(), w_scale.cpu()
        w_zero = None if w_zero is None else w_zero.cpu()
        n, k = centred.shape
        g = self.int4pack_group
        assert g is not None
        self.n_pad = -(-n // 16) * 16  # the kernel wants N % 16 == 0 ...
        self.k_pad = -(-k // g) * g  # ... and whole groups
        nib = torch.full((self.n_pad, self.k_pad), 8, dtype=torch.int32)
        nib[:n, :k] = centred.to(torch.int32) + 8
        reps = self.k_pad // g  # == the spec's group count, or per-channel scales repeated over kernel groups
        s = w_scale.expand(n, reps)
        z = torch.zeros_like(s) if w_zero is None else (-(w_scale * w_zero.float())).expand(n, reps)
        sz = torch.zeros(reps, self.n_pad, 2, dtype=torch.float32)
        sz[:, :n, 0] = s.t()
        sz[:, :n, 1] = z.t()
        if self.int4pack_device == "cuda":
            from qvlm_harness.kernels.int4pack import inner_k_tiles, tinygemm_bytes

            tiles = inner_k_tiles(self.k_pad)  # k_pad is a multiple of the group (>= 32), so at least 2 fit
            assert tiles is not None
            qweight = torch.ops.aten._convert_weight_to_int4pack(tinygemm_bytes(nib).to(device), tiles)
            sz = sz.to(device)
        else:
            qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nib, 1)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales_and_zeros", sz.to(torch.bfloat16))
        self.register_buffer("w_scale", None)
        self.register_buffer("w_zero", None)

    def quantize_input(self, x: Tensor) -> Tensor:
        """Activations stay in float: the input itself (for wrappers that call it, as around a QLinear)."""
        return x

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        """The float weight ``s * (v - z_c)`` (dequant kernel only)."""
        v = self.qweight if self.fmt == "int8" else unpack_int4(self.qweight, self.in_features)
        v = v.float().reshape(self.out_features, self.w_scale.shape[1], -1)
        if self.w_zero is not None:
            v = v - self.w_zero.float().unsqueeze(-1)
        return (v * self.w_scale.unsqueeze(-1)).reshape(self.out_features, self.in_features).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel == "dequant":
            return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if x.device.type != self.int4pack_device or self.qweight.device.type != self.int4pack_device:
            raise HarnessError(f"layer {self.name} was packed for the {self.int4pack_device.upper()} int4 kernel; "
                               "convert on the device it runs on (move the model before `convert_to_packed`)")
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.k_pad != self.in_features:
            x2 = F.pad(x2, (0, self.k_pad - self.in_features))
        assert self.int4pack_group is not None and self.scales_and_zeros is not None
        if self.int4pack_device == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2.contiguous(), self.qweight, self.int4pack_group,
                                                   self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.int4pack_group,
                                                           self.scales_and_zeros)
        if self.n_pad != self.out_features:
            y = y[:, : self.out_features]
        y = self._add_bias(y.float()).to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        gran = f"group{self.group_size}" if self.group_size else "channel"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"w{self.w_bits} {'sym' if self.w_symmetric else 'asym'} per-{gran} {self.fmt}, a16 float, "
                f"kernel={self.kernel}{' (bf16 compute)' if self.kernel == 'int4pack' else ''}"
                f"{f' ({self.kernel_note})' if self.kernel_note else ''}, packed")

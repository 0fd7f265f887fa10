"""Per-sample outputs that do not depend on batch size or thread count, and the settings that still do.

A row's result changes with the batch it is computed in when a kernel's arithmetic depends on the shape of the
whole batch. Padding is one cause (the adapter removes it: `qvlm_harness.models.batching`); the GEMM kernels are
the other. Measured on this machine kind (torch 2.13 CPU, MKL 2024.2, oneDNN 3.12, AVX512; `bench/invariance.py`
repeats the model-level check), for ``y = x @ W.T + b`` at the default model's shapes and M = 1..1600 rows:

* fp32 through torch's default path (MKL sgemm): a row's result depends on M (three classes at one thread:
  M = 1, 2..15, >= 16) and on the thread count (other classes at two threads).
* fp32 through oneDNN (``mkldnn._linear_pointwise``): every row is bit-identical for every M >= 2 and both thread
  counts; M = 1 takes a GEMV path with another summation order. So `batch_invariant_linear` routes fp32 linears
  to oneDNN and computes a single row as two. Prefill speed is unchanged (M >= 16); a single-row call (decode at
  batch 1) costs up to ~1.5x the MKL GEMV.
* bf16 (torch already uses oneDNN): rows are identical for M <= 32 only; above, oneDNN picks kernels whose rows
  differ in the last bit (thread count too). Cutting every bf16 GEMM into 32-row pieces restores invariance but
  costs 2-10x the prefill GEMM time (bf16's whole advantage), so bf16 stays as it is and `invariance_key` says so.
* fp16: rows differ from M = 2 on for some shapes (K = 1536); not fixed (fp16 has no fast CPU kernels anyway).
* packed integer kernels (`qvlm_harness.kernels`): the int32 products are exact and the epilogue is per element,
  so they inherit the invariance of the float parts around them.
* per-tensor dynamic activation quantization takes one range over every row of the batch: batch-dependent by
  definition (per-token dynamic and static ranges are per row).
* quantized embeddings and LM head (`--quantize-embeddings`): the gather-dequant embedding is per row, and the
  head's int8pack / int4pack kernels give every row its bits alone for M = 1..40 at one and two threads
  (`tests/test_embedding_quant.py`), so they add nothing to the key.

Attention (SDPA), norms, RoPE and elementwise ops were found row- and thread-invariant at the default model's sizes
once rows share one length (measured end to end: identical logits at batch 1, 2, 4, 8 and 1 or 2 threads).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from qvlm_harness.config import FLOAT_BITS, QuantSpec

_DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}

# How the adapter lays a batch out (`models.ragged`: ragged batches where they are exact, same-length batches
# otherwise). Where outputs depend on the batch at all, they depend on this too, so it joins every non-empty key:
# a row computed under another layout (same-length batches everywhere, before ragged batches) is never reused.
BATCH_LAYOUT = "ragged"

_lock = threading.Lock()
_depth = 0
_original_linear = F.linear


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear` for fp32 CPU inference through oneDNN, whose rows do not depend on how many there are (M >= 2);
    anything else (other dtypes or devices, autograd) takes torch's own path."""
    if (x.dtype is not torch.float32 or weight.dtype is not torch.float32 or x.device.type != "cpu"
            or weight.device.type != "cpu" or (bias is not None and bias.dtype is not torch.float32)
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            or x.dim() == 0 or weight.dim() != 2):
        return _original_linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    single = rows.shape[0] == 1
    if single:  # oneDNN's one-row (GEMV) path sums in another order than every M >= 2: compute two
        rows = rows.expand(2, -1)
    y = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
    if single:
        y = y[:1]
    return y.reshape(*x.shape[:-1], weight.shape[0])


@contextlib.contextmanager
def batch_invariant_linear() -> Iterator[None]:
    """Route every `torch.nn.functional.linear` call (nn.Linear, QLinear, NFLinear, LoRC paths all use it) to
    `_onednn_linear` while the block runs. Nested and concurrent uses share one patch; the last to leave
    restores torch's function."""
    global _depth
    with _lock:
        if _depth == 0:
            F.linear = _onednn_linear
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                F.linear = _original_linear


def _as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    return _DTYPE_NAMES.get(str(dtype).replace("torch.", ""), torch.float32)


def invariance_key(spec: QuantSpec, execution: str, dtype: str | torch.dtype, batch_size: int,
                   threads: int | None, *, device: str = "cpu") -> dict[str, int | None]:
    """The execution settings that can still change a per-sample result of the adapter's answer path (empty when
    the path is batch- and thread-invariant), for a cell id: `{}` for fp32 on the CPU with per-token or static
    activations, simulated or packed; `batch_size` and `threads` for bf16/fp16 and non-CPU devices (their kernels
    are not row-invariant, see the module docstring); `batch_size` for per-tensor dynamic activations; and, with
    any of those, `batch_layout` (`BATCH_LAYOUT`).

    `dtype` is the dtype the model computes in during evaluation (the bf16/fp16 baselines cast the model: pass
    theirs, not the load dtype). `execution` ("simulated" or "packed") does not change the answer today; it is
    a parameter so that a future kernel that breaks invariance has one place to say so. Tasks that bypass the
    adapter's `answer` (lm-eval instances batch on their own) are not covered.
    """
    key: dict[str, int | None] = {}
    float_kernels_vary = device.split(":")[0] != "cpu" or _as_dtype(dtype) is not torch.float32
    if float_kernels_vary:
        key["batch_size"] = batch_size
        key["threads"] = threads
    per_batch_range = spec.a_bits < FLOAT_BITS and spec.a_granularity == "tensor" and spec.a_dynamic
    if per_batch_range:
        key["batch_size"] = batch_size
    if key:
        key["batch_layout"] = BATCH_LAYOUT
    return key

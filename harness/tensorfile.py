"""Read a safetensors file one tensor at a time into memory of its own, without mapping the file.

`safetensors.torch.load_file` / `safe_open` map the whole file: every page a tensor is read from stays resident
(and counted in the process's RSS) while any tensor of the file is alive, and the tensors themselves are views
of that mapping. Loading a quantized checkpoint straight into packed modules wants the opposite: read one
layer's integer codes, pack them, free them, so the peak memory is the packed model plus one layer. The format
is simple (an 8-byte little-endian header length, a JSON header of ``name -> {dtype, shape, data_offsets}``,
then the raw little-endian bytes), so this module reads it with plain file reads into freshly allocated tensors.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from torch import Tensor

from qvlm_harness.errors import HarnessError

#: safetensors dtype names -> torch dtypes (the ones a harness checkpoint can hold)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 2**20


class TensorFile:
    """The tensors of one safetensors file, read on demand (`read`); the header is parsed once."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) != 8:
                    raise ValueError("shorter than its header length")
                (n,) = struct.unpack("<Q", raw)
                if n > _MAX_HEADER:
                    raise ValueError(f"header length {n} is implausible")
                header = json.loads(f.read(n))
            size = self.path.stat().st_size
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise HarnessError(f"{self.path} is not a readable safetensors file ({exc}); re-run harness quantize"
                               ) from None
        header.pop("__metadata__", None)
        self._start = 8 + n
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for key, e in header.items():
            try:
                dtype = DTYPES[e["dtype"]]
                shape = tuple(int(d) for d in e["shape"])
                begin, end = (int(x) for x in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise HarnessError(f"{self.path}: tensor {key} has an unreadable header entry {e!r}") from None
            numel = 1
            for d in shape:
                numel *= d
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            if end - begin != nbytes or begin < 0 or self._start + end > size:
                raise HarnessError(f"{self.path}: tensor {key} ({e['dtype']} {list(shape)}) does not fit its byte "
                                   "range; the file is truncated or corrupt: re-run harness quantize")
            self._entries[key] = (dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def read(self, key: str) -> Tensor:
        """A new tensor holding `key` (its own memory: nothing of the file stays mapped)."""
        dtype, shape, begin, end = self._entries[key]
        out = torch.empty(shape, dtype=dtype)
        if end > begin:
            view = out.reshape(-1).view(torch.uint8).numpy()
            with open(self.path, "rb") as f:
                f.seek(self._start + begin)
                if f.readinto(view) != end - begin:
                    raise HarnessError(f"{self.path}: tensor {key} is truncated; re-run harness quantize")
        return out

"""The fused CPU kernel (`csrc/int_linear.cpp`): built with the system compiler when packed layers are made
(`qvlm_harness.kernels.convert.prepare_kernels`, at conversion time, outside every timed region; otherwise on
first use), then cached.

`available()` builds it once per machine (about a minute; the build folder under the harness cache is keyed by
the source and the CPU's instruction-set flags, because it is compiled with ``-march=native``) and says whether
it loaded. The kernel is optional: without a compiler or ninja, on a CPU without AVX512-VNNI, or with
``QVLM_HARNESS_NO_CPP=1``, the 'auto' backend of packed layers takes the plain torch path (``torch._int_mm``),
logging one line that says why (`auto_uses_cpp`). The kernel is exact in its integer part and uses the same
float32 quantization arithmetic as the torch path, so both backends produce the same integer codes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
from pathlib import Path

import torch
from torch import Tensor

from qvlm_harness.errors import HarnessError

SOURCE = Path(__file__).resolve().parent / "csrc" / "int_linear.cpp"
#: Up to this many rows (tokens) the VNNI dot-product kernel runs; above it, oneDNN's int8 GEMM (at::_int_mm).
SMALL_M = 8

_lock = threading.Lock()
_state: dict[str, object] = {}
log = logging.getLogger("qvlm_harness.kernels")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def build_dir() -> Path:
    from qvlm_harness.models.default import cache_root

    digest = hashlib.sha256(SOURCE.read_bytes() + _cpu_flags().encode() + torch.__version__.encode()).hexdigest()
    return cache_root() / "torch_extensions" / f"harness_kernels_{digest[:12]}"


def is_built() -> bool:
    """Whether the kernel is already compiled for this machine (so `available()` will not take a minute)."""
    return (build_dir() / "harness_kernels.so").is_file()


def _load() -> None:
    """Build (if needed) and load the operator library.

    torch's own build lock is a plain file that a killed build leaves behind, after which every later build
    waits on it forever. So builds are serialized here with `flock` on a file of our own (released by the OS
    when its holder dies), and whoever holds it removes a leftover torch lock before building.
    """
    import fcntl  # POSIX only; elsewhere the ImportError means "no fused kernel" like any build failure

    from torch.utils.cpp_extension import load

    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    built = is_built()
    with open(folder.parent / f"{folder.name}.flock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            (folder / "lock").unlink(missing_ok=True)
            if not built:
                print(f"harness: building the fused CPU kernel once for this machine (about a minute) in {folder}",
                      file=sys.stderr)
            load(name="harness_kernels", sources=[str(SOURCE)], build_directory=str(folder), is_python_module=False,
                 extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"], extra_ldflags=["-fopenmp"],
                 verbose=False)
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


def available() -> bool:
    """True once the fused kernel is built and loaded (builds it on the first call)."""
    if os.environ.get("QVLM_HARNESS_NO_CPP"):
        return False
    if "ok" not in _state:
        with _lock:
            if "ok" not in _state:
                try:
                    _load()
                    _state["ok"] = True
                except Exception as exc:  # no compiler, no ninja, build error: fall back to the torch path
                    _state["ok"] = False
                    _state["reason"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
    return bool(_state["ok"])


def unavailable_reason() -> str | None:
    if os.environ.get("QVLM_HARNESS_NO_CPP"):
        return "disabled by QVLM_HARNESS_NO_CPP"
    return None if available() else str(_state.get("reason"))


def has_vnni() -> bool:
    """Whether the loaded kernel was compiled with the AVX512-VNNI dot products (else a scalar loop)."""
    if not available():
        return False
    if "vnni" not in _state:
        _state["vnni"] = bool(torch.ops.harness_kernels.has_vnni())
    return bool(_state["vnni"])


def auto_uses_cpp() -> bool:
    """Whether the 'auto' backend takes the fused kernel: it must be built, loaded and compiled with VNNI (the
    scalar build is exact but no faster than ``torch._int_mm``). Logs one line, once per reason, when it does not."""
    if available() and has_vnni():
        return True
    why = unavailable_reason() or "compiled without AVX512-VNNI (this CPU lacks it)"
    logged = _state.setdefault("logged", set())
    assert isinstance(logged, set)
    if why not in logged:
        logged.add(why)
        log.warning("harness: fused CPU kernel off (%s); integer layers use torch._int_mm", why)
    return False


def int_linear(x2: Tensor, args: tuple, name: str = "") -> Tensor:
    """One fused call for `IntLinear.forward` (`args` from `IntLinear.cpp_args`): float32 ``[M, N]``."""
    x = x2 if x2.dtype == torch.float32 and x2.is_contiguous() else x2.float().contiguous()
    try:
        return torch.ops.harness_kernels.int_linear(x, *args)
    except RuntimeError as exc:
        if "NaN or inf" in str(exc):
            layer = f" of layer {name}" if name else ""
            raise HarnessError(f"NaN or inf in the input activations{layer}: check the model dtype (fp16 "
                               "overflow?) and the input") from None
        raise

"""Latency and memory measurement, and the environment facts every result row records.

Latency comes from the adapter (prefill and decode timed separately per batch). Memory: bytes of the weights
as stored (what the process really holds), the bytes they would take if packed (for simulated quantization:
labelled "simulated"), and the peak resident set size sampled while a cell runs.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import threading
import time
from importlib import metadata
from pathlib import Path

import torch
from torch import nn


def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB (from /proc; falls back to the peak from getrusage)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class PeakRSS:
    """Context manager sampling RSS in a background thread; `.peak_mb` is the maximum seen inside the block."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, current_rss_mb())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self.peak_mb = current_rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_mb = max(self.peak_mb, current_rss_mb())


def weight_bytes(model: nn.Module, *, packed: bool) -> int:
    """Bytes of parameters and buffers. With `packed`, quantized layers count the size their integer codes and
    scales take when packed (what a real kernel would hold); otherwise what the process holds now."""
    total = 0
    counted: set[int] = set()
    for module in model.modules():
        sizer = getattr(module, "weight_storage_bytes", None)
        if callable(sizer):
            total += sizer(packed)
            own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
            bias = getattr(module, "bias", None)
            counted.update(id(t) for t in own if t is not bias)
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in counted:
            counted.add(id(t))
            total += t.numel() * t.element_size()
    return total


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the distinct tensor storages the model's parameters and buffers live in: what the process really
    holds for its weights (a tied embedding and head, or two views of one storage, count once; a view of a larger
    storage counts the whole storage, which is what stays allocated)."""
    seen: dict[tuple[str, int], int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_meta or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def git_hash() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str = "cpu") -> dict:
    """What makes a result reproducible: versions, code revision, hardware, threads."""
    from qvlm_harness import __version__

    versions = {}
    for pkg in ("torch", "transformers", "numpy", "bitsandbytes", "safetensors", "accelerate", "tokenizers", "pillow"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "harness_version": __version__, "git": git_hash(), "python": platform.python_version(),
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "device": device, "packages": versions,
        "hostname": platform.node(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "accelerator": torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available()
        else None,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

"""One compiled kernel per function and process, shared by every search step that asks for it."""

from __future__ import annotations

from collections.abc import Callable

import torch

_COMPILED: dict[Callable, Callable] = {}


def compiled_once(fn: Callable, compiled: bool) -> Callable:
    """`fn` itself, or (with `compiled`) `torch.compile(fn, dynamic=True)` built on first use: dynamic shapes let
    every layer share the kernel; a failed compilation (no C++ compiler) falls back to eager, which computes the
    same values."""
    if not compiled:
        return fn
    out = _COMPILED.get(fn)
    if out is None:
        try:
            out = torch.compile(fn, dynamic=True)
        except Exception:  # pragma: no cover - depends on the platform's toolchain
            out = fn
        _COMPILED[fn] = out
    return out

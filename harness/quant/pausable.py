"""Run a computation step by step: `Pausable(fn)` runs ``fn(pausable)`` on its own thread, and the caller's
`step()` lets it go on until it calls `pause(at)` or returns.

Why: a layer-by-layer method that quantizes a block group by group (GPTQ's q/k/v, then o, ...) needs the
statistics of *every* calibration batch at a group before it can quantize that group, and each batch must then
go on through the quantized group. A module's forward cannot be suspended in Python, but a thread can wait: each
batch's forward runs on a thread that waits at the group until the caller has solved it. Exactly one side runs
at any time (the caller blocks in `step()` while the worker runs, the worker blocks in `pause()` while the caller
runs), so the forward computes what the same forward would compute run straight through, on the same intra-op
thread pool.

Torch's grad mode is thread-local: the worker runs under `torch.no_grad()`. A worker left paused when the caller
gives up is ended with `close()`, which makes its pending `pause()` raise `Abandoned` inside the forward.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch


class Abandoned(BaseException):
    """Raised inside a paused worker by `close()`: unwinds the forward without running the rest of it."""


_local = threading.local()


def current() -> Pausable | None:
    """The `Pausable` whose worker thread is calling (None on any other thread)."""
    return getattr(_local, "pausable", None)


class Pausable:
    """``fn(self)`` on its own thread, advanced by `step()`; see the module docstring."""

    def __init__(self, fn: Callable[[Pausable], Any], tag: Any = None):
        self.tag = tag  # the caller's label for this computation (e.g. the batch it runs)
        self.at: Any = None  # what the worker is paused at (None when not paused)
        self.done = False
        self.result: Any = None
        self._fn = fn
        self._error: BaseException | None = None
        self._abandon = False
        self._go = threading.Semaphore(0)
        self._back = threading.Semaphore(0)
        self._thread = threading.Thread(target=self._main, daemon=True, name=f"pausable-{tag}")
        self._started = False

    def _main(self) -> None:
        _local.pausable = self
        self._go.acquire()
        try:
            if self._abandon:
                raise Abandoned
            with torch.no_grad():
                self.result = self._fn(self)
        except Abandoned:
            pass
        except BaseException as exc:  # handed to the caller by step()
            self._error = exc
        finally:
            self.done = True
            self.at = None
            self._back.release()

    def step(self) -> None:
        """Let the worker run until its next `pause()` or its end; re-raises what the worker raised."""
        if self.done:
            return
        if not self._started:
            self._started = True
            self._thread.start()
        self.at = None
        self._go.release()
        self._back.acquire()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def pause(self, at: Any) -> None:
        """Called by the worker: hand control back to the caller until its next `step()`."""
        self.at = at
        self._back.release()
        self._go.acquire()
        if self._abandon:
            raise Abandoned

    def close(self) -> None:
        """End the worker (a paused one unwinds through `Abandoned`); idempotent."""
        if self.done:
            return
        self._abandon = True
        if self._started:
            self._go.release()
            self._back.acquire()
        self.done = True
        if self._started:
            self._thread.join()

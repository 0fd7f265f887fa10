"""Calibration data: seeded samples from a task's train split, turned into model requests (+ target answers).

Methods that only need activations run `CalibrationSet.run(adapter)` under their own hooks; methods with
output-guided losses (Q-VLM's auto-regressive term) also read the targets. Encoding is the adapter's
(`LlavaAdapter.calibration_batches`), the one calibration encoder every method goes through.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qvlm_harness.task import Request, Task

if TYPE_CHECKING:
    from qvlm_harness.models.llava import LlavaAdapter


@dataclass
class CalibrationSet:
    task: str
    requests: list[Request]
    targets: list[str]
    seed: int

    def __len__(self) -> int:
        return len(self.requests)

    @classmethod
    def from_task(cls, task: Task, n: int, seed: int, data_dir: Path | None = None) -> CalibrationSet:
        samples = task.calibration_samples(n, seed, data_dir)
        requests = [task.request(s, scoring="generate") for s in samples]
        for r in requests:  # calibration feeds prompts, never option-scoring batches
            r.kind = "generate"
        return cls(task.name, requests, [task.target(s) for s in samples], seed)

    def run(self, adapter: LlavaAdapter, *, with_targets: bool = True, batch_size: int = 8) -> None:
        """Forward every calibration request through the model (prompt + target answer when asked)."""
        with torch.no_grad():
            for batch in adapter.calibration_batches(self, with_targets=with_targets, batch_size=batch_size):
                adapter.model(**batch.inputs, use_cache=False)

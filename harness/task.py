"""The task plugin contract and the request/response types that flow between tasks and model adapters.

A task turns its data into `Request`s (a prompt, images, and either "generate" or "loglik" with options), the
model adapter answers them, and the task scores each answer and aggregates. Tasks never see the model; the model
never sees a task's fields: that keeps every task usable with every model and method.
"""

from __future__ import annotations

import random
import statistics
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

ImageRef = str | Path | bytes | Image.Image


@dataclass
class Sample:
    """One evaluation item as the task loaded it: an id, its image (or none) and the task's own fields."""

    id: str
    image: ImageRef | None
    data: dict[str, Any]


@dataclass
class Request:
    """What the model is asked. `prompt` is the user turn's text; the adapter places the image (if any) before it
    and applies the model's chat template. For "loglik", the adapter scores each of `options` as the assistant's
    answer and returns its summed log-probability and token count."""

    sample_id: str
    prompt: str
    image: ImageRef | None
    kind: Literal["generate", "loglik"] = "generate"
    options: Sequence[str] = ()
    max_new_tokens: int = 16


@dataclass
class Response:
    """The model's answer: generated text, or per-option (sum log-prob, n tokens)."""

    text: str | None = None
    option_logprobs: list[tuple[float, int]] = field(default_factory=list)
    prefill_s: float | None = None  # this request's share of its batch's prefill time
    decode_s: float | None = None
    new_tokens: int | None = None


class Task(ABC):
    """A benchmark: loads official files (or the embedded sample set), builds prompts, scores, aggregates."""

    name: str = ""
    description: str = ""
    eval_split: str = "test"
    train_split: str = "train"
    primary_metric: str = "acc"
    metrics: tuple[str, ...] = ("acc",)
    data_layout: str = ""  # shown by `harness ls tasks` and in missing-file errors
    supports_shots: bool = False
    scoring_modes: tuple[str, ...] = ("generate",)

    @abstractmethod
    def load(self, split: str, data_dir: Path | None = None) -> list[Sample]:
        """All samples of `split` ("test" means the task's evaluation split); embedded set if data_dir is None."""

    @abstractmethod
    def request(self, sample: Sample, *, scoring: str = "generate", demos: Sequence[Sample] = ()) -> Request:
        """The request for one sample (with few-shot demonstrations when the task supports them)."""

    @abstractmethod
    def score(self, sample: Sample, response: Response) -> dict[str, Any]:
        """A per-sample record: at least the task's correctness fields, the raw output and the parsed answer."""

    @abstractmethod
    def aggregate(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        """Metrics (percent where the paper reports percent), sub-metrics as separate keys."""

    @abstractmethod
    def target(self, sample: Sample) -> str:
        """The answer text a model should produce (used for calibration with answers and for training)."""

    def resolve_split(self, split: str) -> str:
        return self.eval_split if split == "test" else split

    def calibration_samples(self, n: int, seed: int, data_dir: Path | None = None) -> list[Sample]:
        """`n` samples from the train split, seeded; preferring samples with images (the vision path needs
        activations too) but keeping text-only ones in their natural share."""
        pool = self.load(self.train_split, data_dir)
        rng = random.Random(f"calib-{self.name}-{seed}")
        return rng.sample(pool, min(n, len(pool)))

    def describe_layout(self) -> str:
        return self.data_layout


def aggregate_trials(task: Task, entries: Sequence[dict[str, Any]], trials: int) -> dict[str, float]:
    """A cell's metrics from its per-sample log entries ({"trial", "record", ...}).

    One trial: the task's aggregate. Several (seeded few-shot trials): the mean over trials of each metric, its
    standard deviation as `<metric>_std`, and `trials`. Shared by the runner (which stores the result) and by
    regression comparison (which recomputes it on bootstrap resamples), so both always agree.
    """
    per_trial = []
    for t in range(trials):
        records = [e["record"] for e in entries if e["trial"] == t]
        per_trial.append(task.aggregate(records))
    if trials == 1:
        return {k: float(v) for k, v in per_trial[0].items() if isinstance(v, int | float)}
    keys = [k for k, v in per_trial[0].items() if isinstance(v, int | float)]
    out = {k: statistics.fmean(p[k] for p in per_trial) for k in keys}
    out |= {f"{k}_std": statistics.stdev(p[k] for p in per_trial) for k in keys if not k.startswith("n")}
    return out | {"trials": float(trials)}

"""The task plugin contract and the request/response types that flow between tasks and model adapters.

A task turns its data into `Request`s (a prompt, images, and either "generate" or "loglik" with options), the
model adapter answers them, and the task scores each answer and aggregates. Tasks never see the model; the model
never sees a task's fields: that keeps every task usable with every model and method.
"""

from __future__ import annotations

import math
import random
import statistics
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from PIL import Image

if TYPE_CHECKING:
    from qvlm_harness.store import ResultRow

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


SHOTS_FIGURE = "metric_vs_shots"  # a figure a task can ask for: its ranked metrics against the number of shots


@dataclass(frozen=True)
class TaskMeta:
    """How reports show a task's results. The task declares it and the runner stores it with every result row, so
    the report code knows no task: it renders rows of tasks it cannot import (third-party plugins, lm-eval YAML
    tasks), and each row keeps the labels it was computed under.

    Metric keys are the keys of the task's `aggregate`; everything else here is presentation.
    """

    label: str  # short name: table column headers, plot panels ("HM")
    metrics: tuple[str, ...]  # the breakdown table's columns, in display order
    primary: str  # the metric the main and per-dataset tables show
    title: str = ""  # prose name for captions and figure titles ("Hateful Memes"); default: the label
    metric_labels: Mapping[str, str] = field(default_factory=dict)  # column header per metric; default: the key
    metric_names: Mapping[str, str] = field(default_factory=dict)  # prose per metric ("ROC AUC"); default: header
    unit: str = ""  # "%" when the metrics are percentages; "" for fractions or unitless scores
    lower_is_better: tuple[str, ...] = ()  # bolded at their minimum; a drop is an improvement in regressions
    unranked: tuple[str, ...] = ()  # shown but never bolded as best (diagnostics such as a parse-failure rate)
    varies_by_shots: bool = False  # tables always show a Shots column (also for 0-shot rows)
    caption: str = ""  # caption of the breakdown table
    table_title: str = ""  # heading of the breakdown table in the HTML report; default: the title
    paper_table: bool = False  # the breakdown is one of the paper's tables (`harness report` writes it)
    figures: tuple[str, ...] = ()  # extra figures the task wants, e.g. SHOTS_FIGURE

    def __post_init__(self) -> None:
        for name in ("metrics", "lower_is_better", "unranked", "figures"):  # lists from JSON, tuples in code
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("metric_labels", "metric_names"):
            object.__setattr__(self, name, dict(getattr(self, name)))

    @property
    def display_title(self) -> str:
        return self.title or self.label

    @property
    def display_table_title(self) -> str:
        return self.table_title or self.display_title

    def metric_label(self, metric: str) -> str:
        """The column header of a metric ("acc" -> "Avg" for ScienceQA)."""
        return self.metric_labels.get(metric, metric)

    def metric_name(self, metric: str) -> str:
        """The metric in prose ("auroc" -> "ROC AUC")."""
        return self.metric_names.get(metric, self.metric_label(metric))

    def axis_label(self, metric: str) -> str:
        """The metric with its unit, for captions and axes: "accuracy (%)"."""
        return f"{self.metric_name(metric)} ({self.unit})" if self.unit else self.metric_name(metric)

    def is_ranked(self, metric: str) -> bool:
        return metric not in self.unranked

    def best(self, metric: str) -> str:
        """"min" or "max": which end of a column is the best value."""
        return "min" if metric in self.lower_is_better else "max"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (lists, dicts), as stored in a row's settings."""
        out = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskMeta:
        """The inverse of `to_dict`; keys this version does not know (written by a newer one) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _is_derived_metric(key: str) -> bool:
    """Keys stored next to the metrics that are not metrics themselves: counts, spreads, interval bounds."""
    return (key in ("n", "trials") or key.startswith("n_") or key.endswith(("_std", "_ci_lo", "_ci_hi")))


def row_task_meta(row: ResultRow) -> TaskMeta:
    """The report metadata a row was stored with; for rows stored before tasks declared it, a plain fallback: the
    task name as label, the row's metric keys in stored order, the recorded primary metric (else the first)."""
    stored = row.settings.get("task_meta")
    if stored:
        return TaskMeta.from_dict(stored)
    metrics = tuple(k for k in row.metrics if not _is_derived_metric(k))
    primary = str(row.settings.get("primary_metric") or (metrics[0] if metrics else ""))
    return TaskMeta(label=row.task, metrics=metrics, primary=primary)


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
    report_meta: ClassVar[TaskMeta | None] = None  # a task's declaration of how reports show it
    #: False for a task that batches requests itself instead of through the adapter's padding-free, row-invariant
    #: path (lm-eval's model API pads): its results can change with batch size and threads, which then join its
    #: cells' identity.
    batch_invariant: ClassVar[bool] = True

    def metadata(self) -> TaskMeta:
        """How reports show this task: its declaration, or one derived from `name`, `metrics`, `primary_metric` and
        `supports_shots`, so a task that declares nothing still renders."""
        if self.report_meta is not None:
            return self.report_meta
        return TaskMeta(label=self.name, metrics=tuple(self.metrics), primary=self.primary_metric,
                        varies_by_shots=self.supports_shots, figures=(SHOTS_FIGURE,) if self.supports_shots else ())

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

    def answer(self, adapter: Any, requests: Sequence[Request], batch_size: int = 8) -> list[Response]:
        """Answer a batch of this task's requests with the model. The default hands them to the adapter; a task
        whose requests follow another protocol (e.g. lm-eval instances) overrides this and still gets the runner's
        per-sample logs, resume and store for free."""
        return adapter.answer(requests, batch_size=batch_size)

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
    out = {k: statistics.fmean(float(p[k]) for p in per_trial) for k in keys}  # NaN in any trial: NaN
    out |= {f"{k}_std": _stdev([float(p[k]) for p in per_trial]) for k in keys if not k.startswith("n")}
    return out | {"trials": float(trials)}


def _stdev(values: list[float]) -> float:
    """Sample standard deviation, NaN when a value is NaN (e.g. AUROC of a single-class trial) or fewer than 2."""
    if len(values) < 2 or any(math.isnan(v) for v in values):
        return math.nan
    return statistics.stdev(values)

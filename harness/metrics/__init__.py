"""Task metrics: official VQA accuracy (per task), ScienceQA parsing/breakdown, ROC AUC and bootstrap intervals.

Pure Python + numpy (no torch), so results can be re-scored from saved predictions anywhere.
Conventions: per-sample / primitive functions (`vqa_accuracy`, `roc_auc`, `binary_accuracy`) return
fractions in [0, 1]; the `aggregate_*` reports and `unanswerable_precision_recall` return percentages, with
`n_<key>` counts next to each value and NaN (never 0) for a group without samples.
"""

from qvlm_harness.metrics.classification import (
    ConfidenceInterval,
    UndefinedMetricWarning,
    binary_accuracy,
    bootstrap_ci,
    paired_bootstrap_ci,
    roc_auc,
)
from qvlm_harness.metrics.intervals import cell_intervals, interval_columns, interval_metrics, paired_intervals
from qvlm_harness.metrics.sqa import SQA_KEYS, aggregate_sqa, parse_answer, parse_option_letter, sqa_categories
from qvlm_harness.metrics.vqa import (
    aggregate_vqa,
    normalize_answer,
    said_unanswerable,
    unanswerable_precision_recall,
    vqa_accuracy,
)
from qvlm_harness.metrics.vqa_eval import vizwiz_accuracy, vqav2_accuracy

__all__ = [
    "SQA_KEYS",
    "ConfidenceInterval",
    "UndefinedMetricWarning",
    "aggregate_sqa",
    "aggregate_vqa",
    "binary_accuracy",
    "bootstrap_ci",
    "cell_intervals",
    "interval_columns",
    "interval_metrics",
    "normalize_answer",
    "paired_bootstrap_ci",
    "paired_intervals",
    "parse_answer",
    "parse_option_letter",
    "roc_auc",
    "said_unanswerable",
    "sqa_categories",
    "unanswerable_precision_recall",
    "vizwiz_accuracy",
    "vqa_accuracy",
    "vqav2_accuracy",
]

"""Synthetic result rows for report tests: every task, FP/simulated/real executions, few-shot trials.

Each row carries the report metadata its real task class declares (as the runner stores it), so the golden
tables check the tasks' declarations as well as the report code."""

from __future__ import annotations

from qvlm_harness import plugins
from qvlm_harness.store import ResultRow

SQA_KEYS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")


def task_settings(task: str) -> dict:
    """What the runner stores about the task in a row's settings: its primary metric and report metadata."""
    declared = plugins.tasks.get(task)()
    return {"primary_metric": declared.primary_metric, "task_meta": declared.metadata().to_dict()}


def _row(method: str, bits: str, task: str, execution: str, metrics: dict, *, shots: int = 0, prefill: float,
         decode: float | None, stored: float, packed: float, search: float = 0.0, n: int = 100) -> ResultRow:
    return ResultRow(
        cell_id=f"{method}-{bits}-{task}-{shots}", run_id="run-1", model="default@demo", method=method, bits=bits,
        task=task, split="test", seed=0, n_samples=n, execution=execution, metrics=metrics, shots=shots,
        measurements={"prefill_ms_per_sample": prefill, "decode_tokens_per_s": decode, "weight_mb_stored": stored,
                      "weight_mb_packed": packed, "peak_rss_mb": 900 + stored, "timing": execution},
        search_cost={"seconds": search}, settings=task_settings(task),
        environment={"git": "abc123", "harness_version": "0.1.0", "threads": 2, "device": "cpu",
                     "packages": {"torch": "2.13.0"}},
        model_fingerprint="f00d", data_fingerprint=f"d-{task}", created=f"2026-01-01T00:00:{len(method):02d}")


def synthetic_rows() -> list[ResultRow]:
    """fp32, rtn at W8A8/W4A4 (simulated), and a real int8 kernel method, on sqa, vqav2, vizwiz and hm 0/4-shot."""
    settings = [("fp32", "fp", "float", 0.0, 1.00, 500.0, 500.0, 20.0),
                ("rtn", "w8a8", "simulated", -1.5, 1.02, 500.0, 130.0, 12.0),
                ("rtn", "w4a4", "simulated", -18.25, 1.03, 500.0, 70.0, 12.0),
                ("int8", "w8a8", "real", -1.0, 0.55, 135.0, 130.0, 35.5)]
    rows = []
    for method, bits, execution, drop, slow, stored, packed, decode in settings:
        cost = dict(prefill=round(80 * slow, 2), decode=decode, stored=stored, packed=packed,
                    search=0.0 if bits == "fp" else 3.25)
        sqa = {k: round(70 + 2 * i + drop, 2) for i, k in enumerate(SQA_KEYS)}
        sqa |= {"acc": round(72.5 + drop, 2), "parse_fail": 1.0 if bits != "w4a4" else 6.0}
        rows.append(_row(method, bits, "sqa", execution, sqa, **cost))
        rows.append(_row(method, bits, "vqav2", execution, {"acc": round(61.2 + drop, 2), "yes/no": 80.0,
                                                             "number": 40.5, "other": 50.25}, **cost))
        rows.append(_row(method, bits, "vizwiz", execution, {"acc": round(40.0 + drop / 2, 2), "yes/no": 70.0,
                                                              "unanswerable": 33.0}, **cost))
        for shots in (0, 4):
            rows.append(_row(method, bits, "hm", execution,
                             {"auroc": round(55.0 + 2 * shots + drop / 3, 2), "acc": 52.0 + shots,
                              "auroc_std": 0.0 if not shots else 1.5, "acc_std": 0.0 if not shots else 2.0},
                             shots=shots, **cost))
    return rows

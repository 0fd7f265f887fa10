"""What the per-cell bootstrap intervals cost, as ratios measured in the same run.

For each task on synthetic per-sample records (600 samples by default), it times `cell_intervals` (every metric,
1000 resamples) with the vectorised group means and with the aggregate recomputed on every resample
(`vectorise=False`), in interleaved rounds (median), and prints both as multiples of one call of the task's
aggregate on the same records, and their ratio.

    python bench/intervals_speed.py --samples 600 --rounds 3
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qvlm_harness import plugins
from qvlm_harness.metrics.intervals import cell_intervals

SUBJECTS = ("natural science", "social science", "language science")


def records(task: str, n: int, rng: random.Random) -> list[dict]:
    if task == "sqa":
        return [{"correct": (ok := rng.random() < 0.6), "parsed": ok or rng.random() < 0.9,
                 "subject": rng.choice(SUBJECTS), "hint": rng.choice(["", "hint"]), "image": rng.choice([None, "i"]),
                 "grade": f"grade{rng.randint(1, 12)}"} for _ in range(n)]
    if task == "hm":
        return [{"p_yes": rng.random(), "pred": rng.randint(0, 1), "label": rng.randint(0, 1)} for _ in range(n)]
    types = ("yes/no", "number", "other") + (("unanswerable",) if task == "vizwiz" else ())
    return [{"accuracy": rng.choice((0.0, 0.3, 0.6, 1.0)), "answer_type": rng.choice(types),
             "pred_unanswerable": rng.random() < 0.2, "gold_unanswerable": rng.random() < 0.2} for _ in range(n)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=600)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rng = random.Random(0)
    print(f"{args.samples} samples, {args.resamples} resamples, median of {args.rounds} interleaved rounds")
    print(f"{'task':<12} {'metrics':>7} {'vectorised':>12} {'per-resample':>14} {'ratio':>7}   (x one aggregate)")
    for name, trials in (("sqa", 1), ("vqav2", 1), ("vizwiz", 1), ("hm", 1), ("hm", 3)):
        task = plugins.tasks.get(name)()
        recs = [records(name, args.samples, rng) for _ in range(trials)]
        entries = [{"trial": t, "id": f"s{i:05d}", "record": r} for t in range(trials) for i, r in enumerate(recs[t])]
        fast, slow, one = [], [], []
        for _ in range(args.rounds):
            one.append(timed(lambda: task.aggregate(recs[0])))  # noqa: B023
            fast.append(timed(lambda: cell_intervals(task, entries, trials, n_boot=args.resamples)))  # noqa: B023
            slow.append(timed(lambda: cell_intervals(task, entries, trials, n_boot=args.resamples,  # noqa: B023
                                                     vectorise=False)))
        unit = statistics.median(one)
        n_metrics = len(cell_intervals(task, entries, trials, n_boot=10))
        f, s = statistics.median(fast) / unit, statistics.median(slow) / unit
        label = f"{name}{f' x{trials}' if trials > 1 else ''}"
        print(f"{label:<12} {n_metrics:>7} {f:>11.0f}x {s:>13.0f}x {s / f:>6.1f}x")


if __name__ == "__main__":
    main()

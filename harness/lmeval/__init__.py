"""Bridge to lm-evaluation-harness (`pip install qvlm-harness[lmeval]`, lm-eval 0.4.13).

Two directions:
- lm-eval tasks inside the harness: `harness run --tasks lmeval:<task>` (the task plugin is `tasks/lmeval.py`);
- the harness's quantized models inside lm-eval: the `qvlm-harness` lm-eval model (`qvlm_harness.lmeval.model`), reached
  through `python -m qvlm_harness.lmeval_cli ...` or, after `python -m qvlm_harness.lmeval_cli install-hook`, the plain
  `lm-eval --model qvlm-harness ...` command.

lm-eval 0.4.13 has no entry-point discovery for models: a model exists in its registry only once some code has
registered it in the running process. `register()` does that (and is idempotent); the hook in `qvlm_harness.lmeval.hook`
calls it automatically whenever a process imports lm-eval's model registry.
"""

from __future__ import annotations

MODEL_NAME = "qvlm-harness"
MODEL_TARGET = "qvlm_harness.lmeval.model:QVLMHarnessLM"


def register() -> None:
    """Register `qvlm-harness` in lm-eval's model registry (lazily: the class is imported on first use).

    lm-eval fills its registry with the built-in models only when the registry is empty at lookup time, so
    `lm_eval.models` is imported first: registering into an empty registry would hide every built-in model.
    """
    import lm_eval.models  # noqa: F401  (registers the built-ins; must precede ours)
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)

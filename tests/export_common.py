"""Helpers shared by the export tests: tiny quantized checkpoints and the harness's own dequantized weights."""

from __future__ import annotations

from pathlib import Path

import torch

from qvlm_harness import plugins
from qvlm_harness.calibration import CalibrationSet
from qvlm_harness.checkpoint import load_quantized, save_quantized
from qvlm_harness.config import QuantSpec
from qvlm_harness.models.llava import LlavaAdapter
from qvlm_harness.quant.qlinear import QLinear
from qvlm_harness.quant.quantizer import QParams, dequantize


def make_checkpoint(model_dir: Path, folder: Path, method: str, bits: str, **options) -> Path:
    """Quantize the tiny model with `method` at `bits` and save the checkpoint into `folder` (once)."""
    if (folder / "manifest.json").is_file():
        return folder
    adapter = LlavaAdapter.load(model_dir)
    spec = QuantSpec.parse(bits)
    m = plugins.methods.get(method)(**options)
    calibration = CalibrationSet.from_task(plugins.tasks.get("sqa")(), 4, 0) if m.needs_calibration(spec) else None
    qm = m.quantize(adapter, calibration, spec)
    return save_quantized(qm, folder, describe=m.describe(spec), base_model="tiny", fingerprint="x",
                          scope=("vision", "projector", "lm"))


def harness_weights(folder: Path, *, scale_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Module path -> the float32 weight the harness computes with, from the checkpoint as `harness eval` loads it:
    ``(codes - zero) * scale`` for every QLinear (its scales first rounded to `scale_dtype`), the weight itself for
    every float linear."""
    adapter, _ = load_quantized(folder)
    out = {}
    for name, m in adapter.model.named_modules():
        if isinstance(m, QLinear) and m.codes is not None:
            qp = m.w_qparams
            rounded = QParams(qp.scale.to(scale_dtype).float(), qp.zero_point, qp.bits, qp.symmetric, qp.group_size)
            out[name] = dequantize(m.codes, rounded)
            if scale_dtype == torch.float32:
                assert torch.equal(out[name], m.weight.float())  # what its forward multiplies with
        elif isinstance(m, torch.nn.Linear):
            out[name] = m.weight.detach().float()
    return out


LLAMA_CPP_HINT = ("pip install 'qvlm-harness[llamacpp]' builds llama.cpp from source (cmake and a C++ compiler); "
                  "see the README's 'Serving formats' section for the build flags (GGML_NATIVE=ON can die with SIGILL)")


def llama_cpp_or_skip(module_level: bool = False):
    """The llama_cpp module, or a skip naming why it cannot be used (not installed, or its library not built);
    `module_level`: called at import time of a test module (skips the whole module)."""
    import pytest

    try:
        import llama_cpp
    except (ImportError, OSError, RuntimeError) as exc:
        pytest.skip(f"llama.cpp is not usable here ({type(exc).__name__}: {str(exc)[:120]}); {LLAMA_CPP_HINT}",
                    allow_module_level=module_level)
    return llama_cpp

"""The default model's training script lives in scripts/ (it builds data with the task package's generators, and the
engine imports no task): it still imports, its LoRA layer is the formula it claims, and the shell recipe calls it."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "train_default_model.py"


def load_script():
    spec = importlib.util.spec_from_file_location("train_default_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lora_linear_starts_at_the_base_layer_and_adds_the_scaled_low_rank_term():
    script = load_script()
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    lora = script.LoRALinear(base, rank=3, alpha=6.0, gen=torch.Generator().manual_seed(1))
    x = torch.randn(5, 12)
    assert torch.equal(lora(x), base(x))  # B starts at zero
    with torch.no_grad():
        lora.B.normal_()
    expected = x @ base.weight.T + base.bias + (6.0 / 3) * (x @ lora.A.T @ lora.B.T)
    torch.testing.assert_close(lora(x), expected)


def test_task_weights_parse_and_the_shell_recipe_calls_the_script():
    script = load_script()
    assert script.parse_task_weights("sqa=0.7,hm=0.3") == {"sqa": 0.7, "vqav2": 0.0, "vizwiz": 0.0, "hm": 0.3}
    assert script.parse_task_weights(None) == script.TASK_WEIGHTS
    recipe = (ROOT / "scripts" / "train_default_model.sh").read_text()
    called = re.findall(r"^python (\S+)", recipe, flags=re.M)
    assert called == ["scripts/train_default_model.py"] * 2
    assert not (ROOT / "harness" / "models" / "train_default.py").exists()

"""Shared fixtures: an isolated model cache and a tiny random Llava checkpoint (built once per session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from harness.models.tiny import tiny_model_path

    return tiny_model_path(tmp_path_factory.mktemp("tiny") / "tiny-llava")


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model_dir):
    from harness.models.llava import LlavaAdapter

    return LlavaAdapter.load(tiny_model_dir)

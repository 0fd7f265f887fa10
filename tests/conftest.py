"""Shared fixtures: an isolated model cache and a tiny random Llava checkpoint (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# One thread: the tests use tiny tensors, where a second OpenMP thread buys nothing, and on a shared or loaded
# machine a multi-threaded pool spinning for a busy core makes small ops up to ~80x slower (measured here).
torch.set_num_threads(1)

NO_CUDA = "no CUDA device"


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `cuda` are skipped, with one reason, where torch sees no CUDA device (they never error)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=NO_CUDA)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from qvlm_harness.models.tiny import tiny_model_path

    return tiny_model_path(tmp_path_factory.mktemp("tiny") / "tiny-llava")


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model_dir):
    from qvlm_harness.models.llava import LlavaAdapter

    return LlavaAdapter.load(tiny_model_dir)

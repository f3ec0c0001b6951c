"""Shared fixtures: deterministic seeds and the optional real-data directory."""

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter. hmoe decides
# backend availability at import, so this must be set before any test module imports hmoe.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def data_dir() -> Path | None:
    """HMOE_DATA_DIR, else ../shared/data beside the project, else None (tests then skip)."""
    candidate = Path(os.environ.get("HMOE_DATA_DIR", ROOT.parent / "shared" / "data"))
    return candidate if candidate.is_dir() else None


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)

"""Loads hmoe._C, the compiled kernels, once — or explains why it could not.

A binary built against another torch than the one running can crash the interpreter, so the
versions recorded by setup.py (hmoe/_build_info.py) are compared before the library is loaded.
Whatever goes wrong, `import hmoe` keeps working on the reference backend and says so once.
"""

from __future__ import annotations

import importlib
import warnings

import torch

#: Why hmoe._C is not in use, or None when it is loaded.
load_error: str | None = None
#: What the loaded extension was built against ({"torch_version", "cuda_version"}), else {}.
build_info: dict = {}


def _release(version: str) -> str:
    """'2.13.0+cpu' -> '2.13.0': local build tags do not change the ABI between builds of a release."""
    return version.split("+")[0]


def _load() -> None:
    global load_error, build_info
    try:
        recorded = importlib.import_module("hmoe._build_info")
    except ImportError:
        load_error = (
            "hmoe._C was not built (no hmoe/_build_info.py); install with "
            "`pip install --no-build-isolation .`"
        )
        return
    if _release(recorded.TORCH_VERSION) != _release(torch.__version__):
        load_error = (
            f"hmoe._C was built against torch {recorded.TORCH_VERSION} but torch "
            f"{torch.__version__} is running; rebuild with `pip install --no-build-isolation .`"
        )
        return
    try:
        module = importlib.import_module("hmoe._C")
    except ImportError as exc:
        load_error = f"hmoe._C failed to load: {exc}"
        return
    build_info = dict(module.build_info())


_load()
if load_error is not None:
    warnings.warn(f"{load_error}. hmoe runs on the reference (pure PyTorch) backend.", stacklevel=2)


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether torch.ops.hmoe.<op> has a compiled kernel for dispatch_key ("CPU" or "CUDA")."""
    if load_error is not None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"hmoe::{op}", dispatch_key)
    except RuntimeError:  # no schema: an hmoe._C older than this op
        return False


def has_schema(op: str) -> bool:
    """Whether the loaded hmoe._C declares torch.ops.hmoe.<op> (an older build may not)."""
    if load_error is not None:
        return False
    return f"hmoe::{op}" in torch._C._dispatch_get_all_op_names()

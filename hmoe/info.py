"""`python -m hmoe.info`: versions, what was compiled, and which backend runs each op where.

For every op and device type it prints the backend "auto" picks and, for each other backend,
why it would not run — the first thing to look at when a kernel is slower or missing.
"""

from __future__ import annotations

import importlib.util
import platform

import torch

import hmoe
from hmoe import configs
from hmoe.ops import _backend, _extension


def _triton_version() -> str:
    if importlib.util.find_spec("triton") is None:
        return "not installed"
    import triton

    return triton.__version__


def report() -> str:
    """The report as text."""
    lines = [
        f"hmoe {hmoe.__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} "
        f"(CUDA {torch.version.cuda or 'none'}), triton {_triton_version()}",
        f"CUDA devices: {torch.cuda.device_count() if torch.cuda.is_available() else 0}"
        + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""),
    ]
    if _extension.load_error is None:
        info = _extension.build_info
        lines.append(
            f"hmoe._C: loaded, built against torch {info['torch_version']}, "
            f"CUDA kernels {'built for CUDA ' + info['cuda_version'] if info['cuda_version'] else 'not built'}"
        )
    else:
        lines.append(f"hmoe._C: not in use: {_extension.load_error}")
    lines.append(f"shipped dataset configs (--data.dataset=NAME): "
                 f"{', '.join(configs.names('dataset'))}")
    lines.append(f"shipped run configs (hmoe train --config NAME): "
                 f"{', '.join(configs.names('run'))}")
    lines.append(f"requested backend: {_backend.requested()} (HMOE_BACKEND or hmoe.ops.backend)")
    for op in sorted(_backend.OPS):
        lines.append(f"\nop {op}")
        for device_type in _backend.DEVICE_TYPES:
            try:
                chosen = _backend.select(op, device_type)
            except _backend.BackendUnavailable as exc:
                chosen = f"none ({exc})"
            note = "" if device_type == "cpu" or torch.cuda.is_available() else " (no CUDA device here)"
            lines.append(f"  {device_type} tensors: run on {chosen}{note}")
            for name, why in _backend.reasons(op, device_type).items():
                lines.append(f"    {name:<9} {'available' if why is None else 'no: ' + why}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()

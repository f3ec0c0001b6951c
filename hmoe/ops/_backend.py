"""Backend selection for hmoe ops: which implementation runs a call, and why the others do not.

Backends:
    reference  the pure-PyTorch `<op>_ref` (always available; the spec and the fallback)
    cpu        the C++ CPU kernel in hmoe._C (CPU tensors)
    cuda       the CUDA C++ kernel in hmoe._C (CUDA tensors, CUDA build)
    triton     the Triton kernel in hmoe.kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)

"auto" (the default) picks cuda, then triton, then reference for CUDA tensors, and cpu, then
reference for CPU tensors. Force one with ``with hmoe.ops.backend("triton"): ...`` or the
environment variable ``HMOE_BACKEND`` (read at import). A forced backend that cannot run raises
:class:`BackendUnavailable` naming why, never silently falls back.

Availability depends only on the op, the device type and how hmoe was installed, so it is
computed once when an op registers; a call does nothing but dictionary look-ups, which keeps
the choice visible to torch.compile (a compiled graph keeps the backend it was traced with).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass

from hmoe.ops import _extension

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
DEVICE_TYPES = ("cpu", "cuda")
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run the requested op on the requested device."""


@dataclass(frozen=True)
class OpInfo:
    """What an op offers: its name in torch.ops.hmoe and whether it has a Triton kernel."""

    name: str
    has_triton: bool


#: Registered ops by name.
OPS: dict[str, OpInfo] = {}
# (op, device_type) -> {backend: reason it cannot run, or None when it can}
_REASONS: dict[tuple[str, str], dict[str, str | None]] = {}
# The innermost forced backend is last; empty means the HMOE_BACKEND / "auto" default.
_forced: list[str] = []


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


_default = _check_name(os.environ.get("HMOE_BACKEND", "auto").strip().lower(), "HMOE_BACKEND")


def triton_reason(device_type: str) -> str | None:
    """Why Triton kernels cannot run on device_type, or None when they can."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton)"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs CPU tensors only under TRITON_INTERPRET=1 (set before import)"
    return None


def _reason(op: OpInfo, backend_name: str, device_type: str) -> str | None:
    if backend_name == "reference":
        return None
    if backend_name == "triton":
        return triton_reason(device_type) if op.has_triton else f"{op.name} has no Triton kernel"
    key = backend_name.upper()  # "cpu" -> "CPU" dispatch key
    if backend_name != device_type:
        return f"the {backend_name} kernels take {backend_name} tensors, got {device_type} tensors"
    if _extension.load_error is not None:
        return _extension.load_error
    if not _extension.has_kernel(op.name, key):
        if backend_name == "cuda" and not _extension.build_info.get("cuda_version"):
            return "hmoe._C was built without CUDA (HMOE_BUILD_CUDA=1 with a CUDA torch and nvcc)"
        return f"hmoe._C has no {key} kernel for {op.name}"
    return None


def register_op(name: str, has_triton: bool) -> OpInfo:
    """Declares an op and records, per device type, which backends can run it."""
    op = OpInfo(name, has_triton)
    OPS[name] = op
    for device_type in DEVICE_TYPES:
        _REASONS[(name, device_type)] = {b: _reason(op, b, device_type) for b in BACKENDS[1:]}
    return op


def reasons(op: str, device_type: str) -> dict[str, str | None]:
    """For each backend, why it cannot run op on device_type (None: it can)."""
    return dict(_REASONS[(op, device_type)])


@contextlib.contextmanager
def backend(name: str):
    """Forces the backend of every hmoe op called inside the block (thread-unsafe by design:
    it is a debugging and benchmarking switch, like torch.backends flags)."""
    _forced.append(_check_name(name, "backend"))
    try:
        yield
    finally:
        _forced.pop()


def requested() -> str:
    """The backend asked for right now: the innermost ``backend(...)`` block, else HMOE_BACKEND."""
    return _forced[-1] if _forced else _default


def select(op: str, device_type: str) -> str:
    """The backend that runs op on device_type now; raises BackendUnavailable if forced and unable."""
    table = _REASONS.get((op, device_type))
    if table is None:
        raise BackendUnavailable(f"hmoe ops run on cpu or cuda tensors, got {device_type}")
    name = requested()
    if name == "auto":
        for candidate in _AUTO_ORDER[device_type]:
            if table[candidate] is None:
                return candidate
    if table[name] is not None:
        raise BackendUnavailable(f"backend {name!r} cannot run {op} on {device_type}: {table[name]}")
    return name

# Sourced by the other scripts: makes .venv (torch CPU build, test tools, Triton) and installs
# hmoe into it, building the C++ kernels. Idempotent: a second run only rebuilds what changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HMOE_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"
fi
if ! "$PY" -c "import torch, yaml, pyarrow, tqdm, matplotlib, pytest, hypothesis, triton, expecttest" 2>/dev/null; then
  # torch 2.13.0 is the CPU build (a local file on CI machines); an unpinned torch would pull
  # a multi-GB CUDA build. Triton runs its kernels on CPU under TRITON_INTERPRET=1 in the tests.
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "torch==${HMOE_TORCH_VERSION:-2.13.0}" numpy pyyaml pyarrow tqdm matplotlib "triton>=3.6" pytest hypothesis expecttest setuptools wheel
fi
"$VENV/bin/pip" install -q --no-build-isolation --no-deps -e "$ROOT"

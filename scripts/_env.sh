# Sourced by the other scripts: makes .venv (torch CPU build, test tools, Triton) and installs
# hmoe into it, building the C++ kernels. Idempotent and quick the second time:
#   - the install is skipped when nothing it depends on changed (the build key below: the
#     C++/CUDA sources, setup.py, pyproject.toml, MANIFEST.in and the torch version), and
#   - when something did change, the object files kept in build/ let ninja recompile only the
#     sources that changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HMOE_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"
fi
# (from / so that folders of the checkout, such as build/, cannot pass for packages)
if ! (cd / && "$PY" -c "import torch, yaml, pyarrow, tqdm, matplotlib, pytest, hypothesis, triton, expecttest, build, fastapi, uvicorn, httptools, httpx") 2>/dev/null; then
  # torch 2.13.0 is the CPU build (a local file on CI machines); an unpinned torch would pull
  # a multi-GB CUDA build. Triton runs its kernels on CPU under TRITON_INTERPRET=1 in the tests.
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "torch==${HMOE_TORCH_VERSION:-2.13.0}" numpy pyyaml pyarrow tqdm matplotlib "triton>=3.6" pytest hypothesis expecttest setuptools wheel build \
    "fastapi>=0.110" "uvicorn[standard]>=0.29" "httpx>=0.27"  # the serve extra (hmoe serve and its tests)
fi
# The distributed extra (TorchRec, FBGEMM CPU): tests/distributed need it.
if ! (cd / && "$PY" -c "import torchrec, fbgemm_gpu") 2>/dev/null; then
  bash "$ROOT/scripts/install_distributed.sh" "$PY"
fi
if ! command -v ninja >/dev/null && [ ! -x "$VENV/bin/ninja" ]; then
  "$VENV/bin/pip" install -q ninja  # incremental builds; without it every build compiles all
fi
export PATH="$VENV/bin:$PATH"

_hmoe_build_key() {
  (cd "$ROOT" && {
    find csrc -type f | LC_ALL=C sort | xargs sha256sum
    sha256sum setup.py pyproject.toml MANIFEST.in
    "$PY" -c "import sys, torch; print(sys.version, torch.__version__)"
    env | grep -E '^(HMOE_BUILD_CUDA|HMOE_SKIP_EXT|TORCH_CUDA_ARCH_LIST|DEBUG)=' | LC_ALL=C sort || true
  } | sha256sum | cut -d' ' -f1)
}
HMOE_BUILD_STAMP="$VENV/.hmoe-build-key"
hmoe_key="$(_hmoe_build_key)"
if [ -f "$HMOE_BUILD_STAMP" ] && [ "$(cat "$HMOE_BUILD_STAMP")" = "$hmoe_key" ] \
    && compgen -G "$ROOT/hmoe/_C*.so" >/dev/null; then
  echo "hmoe: build skipped, no source changed since the last build ($HMOE_BUILD_STAMP)" >&2
else
  build_start=$SECONDS
  # build/temp-<key of the interpreter and torch> keeps the object files for ninja.
  export HMOE_BUILD_TEMP="${HMOE_BUILD_TEMP:-$ROOT/build/temp-$("$PY" -c 'import sys, torch; print(f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}")')}"
  # The build's output (compiler lines, setuptools' notices) goes to a log, shown on failure.
  if ! "$VENV/bin/pip" install --no-build-isolation --no-deps -e "$ROOT" \
      > "$VENV/.hmoe-build.log" 2>&1; then
    tail -n 80 "$VENV/.hmoe-build.log" >&2
    echo "hmoe: the build failed; full log: $VENV/.hmoe-build.log" >&2
    exit 1
  fi
  echo "$hmoe_key" > "$HMOE_BUILD_STAMP"
  echo "hmoe: built and installed in $((SECONDS - build_start)) s" >&2
fi

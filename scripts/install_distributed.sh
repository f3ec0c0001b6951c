#!/usr/bin/env bash
# Installs the distributed extra (TorchRec on FBGEMM) into the Python given as $1 (default: the
# python on PATH), CPU build. TorchRec goes in with --no-deps: its requirements name the CUDA
# build of fbgemm-gpu (2.7 GB), which does not load without a GPU. `pip check` then reports
# fbgemm-gpu as missing; fbgemm-gpu-cpu provides the same module. On a GPU machine install
# fbgemm-gpu built for your torch and CUDA instead of fbgemm-gpu-cpu.
set -euo pipefail
PY="${1:-python}"
"$PY" -m pip install -q "fbgemm-gpu-cpu==1.8.0" "tensordict==0.15.3" "torchmetrics==1.0.3" \
  "pyre-extensions==0.0.32" tqdm
"$PY" -m pip install -q --no-deps "torchrec==1.8.0"

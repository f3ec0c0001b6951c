#!/usr/bin/env bash
# One-shot check on a GPU machine (no network; Python 3.12, torch >= 2.11 CUDA build, Triton,
# nvcc, pytest): build with CUDA, run the CUDA and Triton tests on the GPU, run the op
# benchmarks with a device copy measured as the roofline, and print a short table last.
# Then, only on a machine of 2 or more GPUs that has TorchRec and the CUDA build of fbgemm-gpu
# (the lent GPU image has neither: the section says so and is skipped), the multi-GPU section:
# the 2-rank distributed tests, hmoe train on 2 ranks over nccl, and bench_distributed.py at 1
# and min(4, GPUs) ranks on CUDA.
# Budget: meant to finish in about 9 minutes on an H100/H200 (the CUDA export section adds up
# to 150 s); the per-script timeouts below cap the benchmarks at 9 minutes. With one GPU the multi-GPU section costs a few seconds (it counts
# the GPUs and skips); with 2 or more and TorchRec there it adds up to 8 minutes (timeouts of
# 150 + 120 + 60 + 150 s), so the whole script can outrun a 10-minute limit on one command.
# Usage: bash benchmarks/gpu_check.sh  (writes to $OUT or benchmarks/out/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
SECONDS=0
status=0

echo "== device =="
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory,driver_version --format=csv || true
python -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"

echo "== build ($SECONDS s) =="
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" HMOE_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
python -m hmoe.info

echo "== CUDA and Triton tests ($SECONDS s) =="
# The GPU machine has no hypothesis: run the files that need only pytest.
TRITON_INTERPRET=0 python -m pytest -q -x tests/ops/test_multi_embedding_cuda.py tests/kernels/test_multi_embedding_triton.py \
  tests/ops/test_mnse_cuda.py tests/kernels/test_mnse_triton.py \
  tests/ops/test_tim_attention_cuda.py tests/kernels/test_tim_attention_triton.py \
  tests/ops/test_id_remap_cuda.py 2>&1 | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmarks ($SECONDS s) =="
# Each measurement stops after 2 s once it has 5 runs, and each script has a hard timeout (9
# minutes for the six together even if torch.compile is slow).
for workload in criteo dram; do
  timeout 110 python benchmarks/bench_multi_embedding.py --device cuda --workload "$workload" --phase all --max-seconds 2 \
    --providers embedding_bag_per_set,single_table_torch,reference_compiled,hmoe_cuda,hmoe_triton \
    --out "$OUT" 2>&1 | tee "$OUT/bench_multi_embedding_$workload.txt" | tail -25 || status=1
done
for workload in numeric numeric_sum; do
  timeout 80 python benchmarks/bench_mnse.py --device cuda --workload "$workload" --phase all --max-seconds 2 \
    --providers eager_torch,compiled_torch,one_hot_matmul,embedding_bag,hmoe_cuda,hmoe_triton \
    --out "$OUT" 2>&1 | tee "$OUT/bench_mnse_$workload.txt" | tail -26 || status=1
done
for workload in l200 l1000; do
  timeout 80 python benchmarks/bench_tim.py --device cuda --workload "$workload" --phase all --max-seconds 2 \
    --providers eager_torch,compiled_torch,din_eager,hmoe_cuda,hmoe_triton \
    --out "$OUT" 2>&1 | tee "$OUT/bench_tim_$workload.txt" | tail -22 || status=1
done

# The id remap's CUDA kernel runs its LRU updates in one device thread: a short stream only.
timeout 60 python benchmarks/bench_id_remap.py --device cuda --ids 2000000 --phase stream \
  --providers hmoe_cuda,static_map --out "$OUT" 2>&1 | tee "$OUT/bench_id_remap.txt" | tail -8 || status=1

echo "== export for CUDA ($SECONDS s) =="
# A tiny quickstart run, exported with an AOTInductor package for CUDA; its scores on the GPU
# must agree with the eager model's on the CPU (export checks 1e-5 itself; this re-checks the
# loaded package on real rows).
timeout 150 bash -c '
set -e
WORK="$(mktemp -d)"
python -m hmoe train --config quickstart --out "$WORK/run" --data.synthetic.num_rows=20000 \
  --train.epochs=1 --train.progress=off --train.snapshot_every=0 > "$WORK/train.log"
python -m hmoe export "$WORK/run" --out "$WORK/art" --device cpu --device cuda
python - "$WORK" <<PY
import sys, numpy as np, hmoe.serving
from hmoe.train.trainer import load_run
work = sys.argv[1]
columns = {k: v.numpy() for k, v in load_run(f"{work}/run").dataset.source("test").tensors.items()}
cuda = hmoe.serving.load(f"{work}/art", device="cuda")
rows = cuda.encoder.rows(columns)
eager = hmoe.serving.load(f"{work}/art", mode="eager")
diff = np.abs(cuda.score(cuda.encode(rows)) - eager.score(eager.encode(rows))).max()
print(f"aoti cuda vs eager cpu on {len(rows)} test rows: max |score difference| {diff:.2e}")
assert diff <= 1e-5, diff
PY
' 2>&1 | tail -8
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== multi-GPU ($SECONDS s) =="
ngpu=$(timeout 60 python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null | tail -1)
[[ "$ngpu" =~ ^[0-9]+$ ]] || ngpu=0
if [ "$ngpu" -lt 2 ]; then
  echo "== multi-GPU: skipped ($ngpu GPU) =="
elif ! why=$(timeout 120 python -c "import torchrec, fbgemm_gpu" 2>&1); then
  echo "$why" | tail -3
  echo "== multi-GPU: skipped ($ngpu GPUs): it needs torchrec and fbgemm-gpu (the CUDA build) made for" \
    "$(python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" 2>/dev/null) =="
  echo "   On a networked machine with this CUDA torch: pip install torchrec fbgemm-gpu (the releases" \
    "paired with this torch, from the PyTorch index of its CUDA version); for this machine, without" \
    "network, pip download them there and pip install --no-index the wheels here."
else
  nproc=$(( ngpu < 4 ? ngpu : 4 ))
  # These tests run gloo on CPU (tests/distributed/_ranks.py hard-codes gloo, and
  # test_sharded_tables.py is one process): they check TorchRec and the CUDA fbgemm-gpu on this
  # machine, not nccl. If the timeout stops them, the 2 ranks of test_ranks.py (a process session
  # of their own) run on until they finish.
  CI=true timeout 150 python -m pytest -q -x tests/distributed/test_ranks.py tests/distributed/test_sharded_tables.py 2>&1 | tail -15
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  # The nccl path of the library: init_ranks puts each rank on the GPU of its LOCAL_RANK.
  runs=$(mktemp -d)
  { timeout 120 python -m hmoe train --out "$runs/two" --nproc 2 --data.synthetic.num_rows=4000 --train.epochs=1 \
      --train.max_steps=8 --train.batch_size=256 --train.progress=off \
    && timeout 60 python -m hmoe eval "$runs/two" --split valid; } > "$OUT/train_nproc2_gpu.log" 2>&1
  rc=$?
  tail -8 "$OUT/train_nproc2_gpu.log"
  [ "$rc" -eq 0 ] || { echo "hmoe train --nproc 2 on GPUs failed (rc $rc)"; status=1; }
  rm -rf "$runs"
  timeout 150 python benchmarks/bench_distributed.py --device cuda --nproc "$nproc" --phase ranks,local \
    --steps 30 --warmup 5 --threads 8 2>&1 | tee "$OUT/bench_distributed_gpu.txt" | tail -10 || status=1
fi
echo "== done in $SECONDS s, status $status =="
exit $status

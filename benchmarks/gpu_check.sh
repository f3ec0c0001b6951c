#!/usr/bin/env bash
# One-shot check on a GPU machine (no network; Python 3.12, torch >= 2.11 CUDA build, Triton,
# nvcc, pytest): build with CUDA, run the CUDA and Triton tests on the GPU, run the op
# benchmarks with a device copy measured as the roofline, and print a short table last.
# Budget: meant to finish in about 8 minutes on an H100/H200; the per-script timeouts below cap
# the benchmarks at 9 minutes. Usage: bash benchmarks/gpu_check.sh  (writes to $OUT or
# benchmarks/out/).
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
  tests/ops/test_tim_attention_cuda.py tests/kernels/test_tim_attention_triton.py 2>&1 | tail -15
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
echo "== done in $SECONDS s, status $status =="
exit $status

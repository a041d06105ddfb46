#!/usr/bin/env bash
# The GPU checks, on a machine with an NVIDIA GPU and its driver: the
# device forward against the CPU model and batch invariance on the GPU
# (the engine's ignored `cuda` tests), then the engine's speculation tests
# (every drafter, mode and batch size; sampling) with the target on the GPU.
# Runs the binaries of scripts/gpu_pack.sh when it sits beside them, else
# builds with cargo. NVRTC is looked up on LD_LIBRARY_PATH and in
# /usr/local/cuda.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export HETEROSPEC_TEST_DEVICE="${HETEROSPEC_TEST_DEVICE:-cuda}"
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
done
GPU_TESTS=(cuda::tests::the_gpu_ cuda::tests::gpu_ cuda::tests::the_kernels cuda::tests::opening)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
if [ -x "$here/engine-lib" ]; then
  "$here/engine-lib" --include-ignored "${GPU_TESTS[@]}"
  "$here/engine-speculation"
else
  cd "$here/.."
  cargo test --release -p heterospec-engine --lib -- --include-ignored "${GPU_TESTS[@]}"
  cargo test --release -p heterospec-engine --test speculation
fi
echo "GPU checks passed on $HETEROSPEC_TEST_DEVICE"

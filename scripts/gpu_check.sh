#!/usr/bin/env bash
# The GPU checks, on a machine with an NVIDIA GPU and its driver: the
# device forward and the device draft head against the CPU's, and batch
# invariance on the GPU (the engine's ignored `cuda` tests), then the
# engine's speculation tests (every drafter, mode and batch size; sampling;
# a head drafts on the GPU) with the target on the GPU;
# then the device benchmarks into one JSON of figures ($GPU_FIGURES,
# default gpu-figures.json): `bench forward --device cuda --synthetic` for
# Llama 3 1B and 8B shapes (T = 1..64, decode batches 1/16/64, the copy
# bandwidth), and, where models/ (under the directory it runs in) holds
# the default model, its `bench forward`, `bench spec` and `bench serve
# --compare-overlap` on the GPU.
# Runs the binaries of scripts/gpu_pack.sh when it sits beside them, else
# builds with cargo. NVRTC is looked up on LD_LIBRARY_PATH and in
# /usr/local/cuda.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export HETEROSPEC_TEST_DEVICE="${HETEROSPEC_TEST_DEVICE:-cuda}"
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
done
GPU_TESTS=(cuda::tests::the_gpu_ cuda::tests::gpu_ cuda::tests::the_kernels cuda::tests::opening cuda::head::tests::the_gpu_
  cuda::graphs::tests::the_gpu_ cuda::head::graph_tests::the_gpu_)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
figures="$(pwd)/${GPU_FIGURES:-gpu-figures.json}"
if [ -x "$here/engine-lib" ]; then
  "$here/engine-lib" --include-ignored "${GPU_TESTS[@]}"
  "$here/engine-speculation"
  heterospec="$here/heterospec"
else
  cd "$here/.."
  cargo test --release -p heterospec-engine --lib -- --include-ignored "${GPU_TESTS[@]}"
  cargo test --release -p heterospec-engine --test speculation
  cargo build --release --bin heterospec
  heterospec="$(pwd)/target/release/heterospec"
fi
echo "GPU checks passed on $HETEROSPEC_TEST_DEVICE"

# One JSON object, a key per benchmark: each its command's --json line, or
# null where it failed (its error goes to the log beside the figures).
log="${figures%.json}.log"
: > "$log"
bench() { "$heterospec" bench "$@" --json 2>>"$log" || { echo "bench $* failed (see $log)" >&2; printf 'null'; }; }
prompts="$here/bench/prompts.jsonl"
[ -f "$prompts" ] || prompts="$here/../bench/prompts.jsonl"
{
  printf '{"nvidia_smi": "%s"' "$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  for shape in llama-3-1b llama-3-8b; do
    printf ', "synthetic_%s": ' "$shape"
    bench forward --device "$HETEROSPEC_TEST_DEVICE" --synthetic "$shape"
  done
  model="${HETEROSPEC_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
  if [ -f "$model" ]; then
    printf ', "default_model_forward": '
    bench forward --device "$HETEROSPEC_TEST_DEVICE" --model "$model" --compare "" --llama-python none
    printf ', "default_model_spec": '
    bench spec --device "$HETEROSPEC_TEST_DEVICE" --model "$model" --prompts "$prompts" --concurrency 1,16 \
      --variants plain,fixed,hetero --repeat 1
    printf ', "default_model_serve": '
    bench serve --device "$HETEROSPEC_TEST_DEVICE" --model "$model" --prompts "$prompts" --concurrency 1,16,64 \
      --min-requests 16 --compare-overlap
  fi
  printf '}\n'
} > "$figures"
echo "figures: $figures"

#!/usr/bin/env bash
# The README's test command: on a fresh machine (a clean clone and cargo),
# installs what the tests need that cargo does not bring, fetches the
# default model, then runs `cargo test --release --workspace` (arguments
# go to cargo test).
#
# - PyPI, into target/pydeps: kubernetes-validate (deployment tests), NVRTC
#   (the GPU kernels compile in a test, no GPU needed), the openai client
#   (tests/openai.rs), gguf and numpy (tests/archs.rs writes tiny models);
# - npm, into target/npm: buf (tests/protos.rs installs it);
# - Debian, when missing (as root; otherwise it says what to install):
#   prometheus (promtool and a real Prometheus for the deployment tests),
#   a C++ compiler (the GPU kernels' CPU emulation), pip, npm.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
command -v c++ >/dev/null 2>&1 || missing+=(g++)
command -v npm >/dev/null 2>&1 || missing+=(npm)
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "the tests need Debian packages: apt-get install ${missing[*]}" >&2
    exit 1
  fi
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi

PYDEPS="$PWD/target/pydeps"
REQUIREMENTS="kubernetes-validate==1.37.0 nvidia-cuda-nvrtc-cu12==12.8.93 openai==3.57.0 gguf==0.17.1 numpy==2.4.6"
stamp="$PYDEPS/.installed-$(echo "$REQUIREMENTS" | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  # shellcheck disable=SC2086
  python3 -m pip install --quiet --upgrade --target "$PYDEPS" $REQUIREMENTS
  touch "$stamp"
fi
export PYTHONPATH="$PYDEPS${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$PYDEPS/bin:$PATH"
export LD_LIBRARY_PATH="$PYDEPS/nvidia/cuda_nvrtc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

cargo run --release -- fetch-model
cargo run --release -- fetch-model gemma3-270m
cargo test --release --workspace "$@"

#!/usr/bin/env bash
# Builds the GPU checks here, for a GPU machine without a Rust toolchain:
# the engine's unit tests (the device forward against the CPU model, batch
# invariance) and its speculation tests, and the heterospec binary (the
# device benchmarks), stripped, into gpu-pack/ with scripts/gpu_check.sh.
# Copy gpu-pack/ there (and models/ for the default model's figures) and
# run gpu-pack/gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf gpu-pack
mkdir -p gpu-pack
cargo test --release -p heterospec-engine --lib --test speculation --no-run --message-format=json \
  | python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        name = "engine-lib" if m["target"]["kind"] == ["lib"] else "engine-" + m["target"]["name"]
        shutil.copy(m["executable"], "gpu-pack/" + name)
        print("gpu-pack/" + name)
'
cargo build --release --bin heterospec
cp target/release/heterospec gpu-pack/
strip gpu-pack/engine-* gpu-pack/heterospec
cp scripts/gpu_check.sh gpu-pack/
mkdir -p gpu-pack/bench
cp bench/prompts.jsonl gpu-pack/bench/
du -sh gpu-pack

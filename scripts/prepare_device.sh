#!/usr/bin/env bash
# Prepares, on the build machine, everything the GPU machine needs (it has no Rust and no
# network), in target/device/:
#
#   cuda-tests   the stripped CUDA integration tests (tests/cuda.rs), run by scripts/device_cuda.sh
#   gpu_bench    the stripped GPU bench binary (examples/gpu_bench.rs), run by scripts/device_bench.sh
#   wheels/      the pinned Python reference: transformers 4.57.6, trl 0.26.2, tokenizers 0.22.2,
#                huggingface_hub 0.36.0 (+ wheels/extra: requests and its pure-Python dependencies)
#
# Then, on the GPU machine, from the repository root (target/device carried along):
#
#   timeout 200 scripts/device_cuda.sh target/device/cuda-tests; scripts/device_bench.sh target/device/gpu_bench target/device/wheels
#
# PROFILE picks the cargo profile of the bench binary (default release).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${PROFILE:-release}
dest=target/device
mkdir -p "$dest/wheels/extra"

tests=$(cargo test -p valuehead --test cuda --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda" and m.get("executable"):
        print(m["executable"])' | tail -1)
strip -o "$dest/cuda-tests" "$tests"

cargo build -p valuehead --profile "$profile" --example gpu_bench
# dev and test build into target/debug, other profiles into target/<profile>.
case "$profile" in dev | test) dir=debug ;; *) dir=$profile ;; esac
strip -o "$dest/gpu_bench" "target/$dir/examples/gpu_bench"

python=.venv/bin/python
"$python" -m pip download -q --no-deps transformers==4.57.6 trl==0.26.2 tokenizers==0.22.2 huggingface_hub==0.36.0 -d "$dest/wheels"
"$python" -m pip download -q --no-deps --only-binary=:all: --platform any --python-version 3.10 --implementation py \
    requests urllib3 idna certifi charset-normalizer -d "$dest/wheels/extra"
ls -la "$dest" "$dest/wheels" "$dest/wheels/extra"
du -sh "$dest"

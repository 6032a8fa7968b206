#!/usr/bin/env bash
# The GPU bench beside TRL, on a GPU machine without Rust and without network (python/gpu_bench.py
# says what it measures). It needs that machine's Python with torch 2.11.0+cu130, safetensors,
# numpy and accelerate; the pinned reference (transformers 4.57.6, trl 0.26.2, tokenizers 0.22.2,
# huggingface_hub 0.36.0) comes from wheels prepared here:
#
#   here:     scripts/prepare_device.sh            # builds and strips the binaries, downloads the wheels
#   GPU box:  scripts/device_bench.sh target/device/gpu_bench target/device/wheels   # from the repository root
#
# Results: $OUT/gpu_bench.md (the table), $OUT/results.jsonl (every measurement), $OUT/bench.log
# (default OUT: ./target/device-out). Every part has a time limit, so a slow part leaves the
# others' results; the whole run is kept under BENCH_BUDGET seconds (default 420).
set -uo pipefail

if [ $# -lt 2 ]; then
    echo "usage: $0 PATH/TO/gpu_bench WHEELS_DIR" >&2
    exit 2
fi
bin=$(realpath "$1") || { echo "no such binary: $1" >&2; exit 2; }
wheels=$(realpath "$2") || { echo "no such folder: $2" >&2; exit 2; }
cd "$(dirname "$0")/.." || exit 2
out=${OUT:-$PWD/target/device-out}
mkdir -p "$out"
out=$(realpath "$out")
budget=${BENCH_BUDGET:-420}
started=$(date +%s)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ ! -x "$bin" ]; then
    cp "$bin" "$work/gpu_bench" && chmod +x "$work/gpu_bench" && bin="$work/gpu_bench"
fi

python=${PYTHON:-python3}
torch_dir=$("$python" -c 'import torch, os; print(os.path.dirname(torch.__file__))') || {
    echo "error: $python cannot import torch" >&2
    exit 2
}
site=$(dirname "$torch_dir")
lib_path="$torch_dir/lib"
if [ -d "$site/nvidia" ]; then
    while IFS= read -r dir; do
        lib_path="$lib_path:$dir"
    done < <(find "$site/nvidia" -maxdepth 3 -type d -name lib | sort)
fi
export LD_LIBRARY_PATH="$lib_path${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

echo "== GPU" | tee "$out/bench.log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$out/bench.log"

echo "== the pinned reference, from wheels" | tee -a "$out/bench.log"
ref="$work/reference"
timeout 120 "$python" -m pip install --no-deps --no-index --target "$ref" "$wheels"/*.whl >>"$out/bench.log" 2>&1 \
    || echo "warning: pip install of the reference wheels failed (see bench.log)" | tee -a "$out/bench.log"
export PYTHONPATH="$ref${PYTHONPATH:+:$PYTHONPATH}"
if ! "$python" -c 'import requests' 2>/dev/null && [ -d "$wheels/extra" ]; then
    # huggingface_hub 0.36 and transformers 4.57 import requests, which a transformers 5 setup may lack.
    timeout 60 "$python" -m pip install --no-deps --no-index --target "$ref" "$wheels"/extra/*.whl >>"$out/bench.log" 2>&1 || true
fi
timeout 120 "$python" -c 'import torch, transformers, trl, tokenizers, huggingface_hub as h; print("torch", torch.__version__, "transformers", transformers.__version__, "trl", trl.__version__, "tokenizers", tokenizers.__version__, "huggingface_hub", h.__version__)' 2>&1 | tee -a "$out/bench.log"

echo "== our binary" | tee -a "$out/bench.log"
if ldd "$bin" | grep "not found" | tee -a "$out/bench.log"; then
    echo "error: the libraries above are missing" | tee -a "$out/bench.log"
fi

elapsed=$(( $(date +%s) - started ))
left=$(( budget - elapsed ))
echo "== bench (${left} s left of ${budget})" | tee -a "$out/bench.log"
rm -f "$out/results.jsonl"
# New models start only while 100 s are left; the whole run is cut at the budget.
timeout --kill-after=10 "$left" "$python" python/gpu_bench.py run --ours "$bin" --work "$work/models" --out "$out" \
    --budget $(( left > 100 ? left - 100 : 1 )) ${BENCH_ARGS:-} 2>&1 | tee -a "$out/bench.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
    echo "== the bench stopped early (exit $rc): the table from what was measured" | tee -a "$out/bench.log"
    timeout 60 "$python" python/gpu_bench.py report --out "$out" | tee -a "$out/bench.log"
fi
echo "== done in $(( $(date +%s) - started )) s; table: $out/gpu_bench.md"

#!/usr/bin/env bash
# Runs the CUDA integration tests (tests/cuda.rs) on a GPU machine that has no Rust toolchain,
# from a test binary built elsewhere:
#
#   here:     cargo test -p valuehead --test cuda --no-run       # prints the binary's path
#             strip -o target/cuda-tests target/debug/deps/cuda-<hash>   # ~4 MB instead of ~370 MB
#   GPU box:  scripts/device_cuda.sh target/cuda-tests            # from the repository root
#
# The binary's rpath points at the build machine's .libtorch, so libtorch, libc10 and the CUDA
# libraries come from the GPU machine's Python torch (2.11.0+cu130, the version the binary was
# built against) and its nvidia-* wheels, through LD_LIBRARY_PATH. `PYTHON` picks the Python
# (default python3). The tests need no Python and no files from the repository.
#
# The bad-input test runs in a second process: were a bad input ever to reach a CUDA kernel,
# the device-side assert would poison the CUDA context for every later test in the process.
set -uo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 PATH/TO/cuda-TEST-BINARY [extra test-harness arguments]" >&2
    exit 2
fi
bin=$(realpath "$1") || { echo "no such binary: $1" >&2; exit 2; }
shift
cd "$(dirname "$0")/.." || exit 2
if [ ! -x "$bin" ]; then
    # A copy may have lost its executable bit (or live on a read-only path).
    tmp=$(mktemp -d)
    cp "$bin" "$tmp/cuda-tests" && chmod +x "$tmp/cuda-tests" && bin="$tmp/cuda-tests"
fi

python=${PYTHON:-python3}
torch_dir=$("$python" -c 'import torch, os; print(os.path.dirname(torch.__file__))') || {
    echo "error: $python cannot import torch" >&2
    exit 2
}
site=$(dirname "$torch_dir")
lib_path="$torch_dir/lib"
if [ -d "$site/nvidia" ]; then
    # nvidia/<package>/lib (cudnn, nccl, ...) and nvidia/cu13/lib (the CUDA 13 runtime, cuBLAS, ...).
    while IFS= read -r dir; do
        lib_path="$lib_path:$dir"
    done < <(find "$site/nvidia" -maxdepth 3 -type d -name lib | sort)
fi
export LD_LIBRARY_PATH="$lib_path${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}

echo "== GPUs"
nvidia-smi -L || echo "nvidia-smi -L failed"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
echo "== Python torch"
"$python" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuda available:", torch.cuda.is_available(), "devices:", torch.cuda.device_count())'
echo "== libraries"
echo "torch: $torch_dir"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
if ldd "$bin" | grep "not found"; then
    echo "error: the libraries above are missing" >&2
    exit 2
fi
ldd "$bin" | grep -E "libtorch|libc10" || true

echo "== tests (all but bad input)"
"$bin" --ignored --nocapture --test-threads=1 --skip bad_input_on_cuda_is_an_error "$@"
rc_main=$?
echo "== test: bad input (own process)"
"$bin" --ignored --nocapture --test-threads=1 --exact bad_input_on_cuda_is_an_error "$@"
rc_bad=$?

echo "== exit codes: main tests $rc_main, bad-input test $rc_bad"
if [ "$rc_main" -ne 0 ] || [ "$rc_bad" -ne 0 ]; then
    exit 1
fi

#!/usr/bin/env bash
# The GPU checks of the CUDA backend, in two halves, since the GPU machine has no Rust:
#
#   scripts/gpu_check.sh build   here: builds the GPU tests (model/tests/cuda.rs) and the
#                                flywheel binary in release, stripped, into gpu-bin/ (ignored
#                                by git; the device tool carries it)
#   scripts/gpu_check.sh run     on the GPU machine, from the repository root: the parity tests
#                                and the one-rank NCCL communicator (run with --ignored: a
#                                missing GPU or library fails them), then
#                                `bench trainer --device cuda` beside PyTorch eager on the same
#                                GPU, for the demo model and Qwen2.5-0.5B's shape (f32, and
#                                bf16 products against bf16 autocast)
#
# One device call does it all within about 8 minutes (the device tool's README says how a
# command runs there and what travels):
#   run(command="scripts/gpu_check.sh run", carry=["gpu-bin"], timeout_s=540)
# Output goes to stdout and, when the device tool sets $OUT, to $OUT/gpu_check.log.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/gpu-bin"
cd "$ROOT"

case "${1:-}" in
build)
    cargo build --release --bin flywheel
    tests="$(cargo test --release -p flywheel-model --test cuda --no-run 2>&1 |
        sed -n 's/.*Executable tests\/cuda.rs (\(.*\))/\1/p')"
    [ -n "$tests" ] || { echo "gpu_check: no test binary built" >&2; exit 1; }
    mkdir -p "$BIN"
    cp target/release/flywheel "$BIN/flywheel"
    cp "$tests" "$BIN/cuda-tests"
    strip "$BIN/flywheel" "$BIN/cuda-tests"
    du -sh "$BIN"/*
    ;;
run)
    [ -x "$BIN/flywheel" ] && [ -x "$BIN/cuda-tests" ] ||
        { echo "gpu_check: run 'scripts/gpu_check.sh build' here first and carry gpu-bin" >&2; exit 1; }
    log="${OUT:-/tmp}/gpu_check.log"
    exec > >(tee "$log") 2>&1
    # The CUDA 13 libraries: the toolkit's, the driver's and those of the Python wheels that
    # come with PyTorch (cuBLAS, NVRTC).
    wheels="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])' 2>/dev/null || true)"
    export LD_LIBRARY_PATH="${wheels:+$wheels/cu13/lib:}/usr/local/cuda/lib64:/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    # NCCL's wheel ships libnccl.so.2 only; cudarc opens libnccl.so.
    nccl="$(find ${wheels:+"$wheels"} /usr/lib /usr/local -name 'libnccl.so.2*' 2>/dev/null | head -n 1 || true)"
    if [ -n "$nccl" ]; then
        mkdir -p "$BIN/nccl" && ln -sf "$nccl" "$BIN/nccl/libnccl.so"
        export LD_LIBRARY_PATH="$BIN/nccl:$LD_LIBRARY_PATH"
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    status=0
    echo "== parity tests (CPU against GPU)"
    (cd model && timeout 180 "$BIN/cuda-tests" --include-ignored --test-threads 1) || status=1
    for run in "demo f32" "qwen2-500m f32" "qwen2-500m bf16"; do
        set -- $run
        echo "== bench trainer --preset $1 --products $2"
        timeout 110 "$BIN/flywheel" bench trainer --device cuda --preset "$1" --products "$2" \
            --batch 8 --seq-len 128 --iters 5 --sample-tokens 64 --torch python3 || status=1
    done
    exit "$status"
    ;;
*)
    echo "usage: scripts/gpu_check.sh build|run" >&2
    exit 2
    ;;
esac

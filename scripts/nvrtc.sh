#!/usr/bin/env bash
# Installs, where missing, NVIDIA's NVRTC (the CUDA 13 run-time compiler, a PyPI wheel of
# about 140 MB, no GPU or driver needed) into .services/nvrtc-venv, and prints the directory
# holding libnvrtc.so.13. The tests compile the CUDA kernels with it (model/tests/cuda.rs).
# FLYWHEEL_NO_INSTALL=1 only checks.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.services/nvrtc-venv"
PACKAGE=nvidia-cuda-nvrtc==13.5.37

marker="$VENV/.installed-$(echo "$PACKAGE" | sha256sum | cut -c1-12)"
if [ ! -f "$marker" ]; then
    if [ "${FLYWHEEL_NO_INSTALL:-0}" = 1 ]; then
        echo "nvrtc: $PACKAGE is not installed in $VENV" >&2
        exit 1
    fi
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "$PACKAGE"
    touch "$marker"
    echo "nvrtc: installed $PACKAGE in $VENV" >&2
fi
lib="$(ls -d "$VENV"/lib/python3*/site-packages/nvidia/cu13/lib)"
if [ ! -e "$lib/libnvrtc.so.13" ]; then
    echo "nvrtc: $lib has no libnvrtc.so.13" >&2
    exit 1
fi
echo "$lib"

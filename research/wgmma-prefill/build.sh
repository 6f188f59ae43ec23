#!/usr/bin/env bash
# Builds the wgmma prototypes (gemm_wgmma.cu, its ablations, and gemm_wgmma_tma.cu) into .wgart/, beside the
# library's decode and prefill fat binaries (from .gpuart/, scripts/gpu/stage.sh), for
# `python3 research/wgmma-prefill/probe_wgmma.py .wgart OUT.json` on the GPU machine (carry .wgart).
set -euo pipefail
cd "$(dirname "$0")/../.."
NVCC=${QINS_NVCC:-.deps/cuda/nvidia/cu13/bin/nvcc}
INC=$(dirname "$(dirname "$NVCC")")/include
mkdir -p .wgart
cp .gpuart/qins_decode.fatbin .gpuart/qins_matmul_prefill.fatbin .wgart/
build() { "$NVCC" -O3 -std=c++17 -fatbin -gencode arch=compute_90a,code=sm_90a -I"$INC" -Ikernels/common "$@"; }
build research/wgmma-prefill/gemm_wgmma.cu -o .wgart/qins_matmul_wgmma.fatbin
build -DWG_NO_DECODE research/wgmma-prefill/gemm_wgmma.cu -o .wgart/wg_NO_DECODE.fatbin
build -DWG_NO_MMA research/wgmma-prefill/gemm_wgmma.cu -o .wgart/wg_NO_MMA.fatbin
build -Iresearch/wgmma-prefill research/wgmma-prefill/gemm_wgmma_tma.cu -o .wgart/qins_matmul_wgmma_tma.fatbin
build -Iresearch/wgmma-prefill -DWG_NO_DECODE research/wgmma-prefill/gemm_wgmma_tma.cu -o .wgart/wgt_NO_DECODE.fatbin
ls -la .wgart

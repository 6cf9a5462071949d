#!/usr/bin/env bash
# GPU readiness check, one command, at most 8 minutes, one JSON on stdout (progress on stderr):
# the llama-1b shape, 66 pairs x 16 layers, bfloat16, positions=all and positions=each
# (ours and raw, useful FLOPs, measured GEMM throughput, efficiency, peak GPU memory), then a
# bfloat16-vs-float32 agreement check on the same weights. Extra arguments go to gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE MPLBACKEND=Agg
exec timeout 480 python benchmarks/gpu_check.py --device cuda --shape llama-1b --pairs 66 --dtype bfloat16 "$@"

#!/usr/bin/env bash
# Executed instructions per SASS opcode of the fused bidirectional forward and
# backward kernels (bf16, N = 16, 8 x 2304 x 1024), from Nsight Compute:
#   kernels/harness/opcodes.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH=/usr/local/cuda/bin:$PATH
BUILD=${BUILD:-/tmp/scan_build}
[ -x "$BUILD/scan_harness" ] || kernels/harness/run.sh --fd-only >/dev/null
# Launch order in --profile: fwd(1 dir), bwd(1 dir), fwd(2 dirs), bwd(2 dirs).
ncu --kernel-name regex:'scan_(fwd|bwd)_kernel' --launch-skip 2 --launch-count 2 \
  --section InstructionStats --print-details all \
  "$BUILD/scan_harness" --profile 2>&1 | tee "${OUT:-/tmp}/opcodes.txt"

#!/usr/bin/env bash
# Builds and runs the selective-scan harness (on the device machine):
#   kernels/harness/run.sh [harness args: --seed S --quick --no-bench --bench-only]
# Output goes to stdout and, when $OUT is set, to $OUT/harness.log.
set -euo pipefail
cd "$(dirname "$0")/../.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
BUILD=${BUILD:-/tmp/scan_build}
mkdir -p "$BUILD"
FLAGS="${GENCODE:--gencode=arch=compute_90a,code=sm_90a} -O3 -std=c++17 --expt-relaxed-constexpr -lineinfo -I kernels ${EXTRA:-}"
pids=()
for f in kernels/scan_*.cu kernels/harness/scan_harness.cu; do
  o="$BUILD/$(basename "${f%.cu}").o"
  "$NVCC" $FLAGS -Xcompiler -fopenmp -c "$f" -o "$o" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
"$NVCC" $FLAGS -Xcompiler -fopenmp "$BUILD"/*.o -o "$BUILD/scan_harness" -lgomp
LOG=${OUT:-/tmp}/harness.log
"$BUILD/scan_harness" "$@" 2>&1 | tee "$LOG"

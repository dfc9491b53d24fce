#!/usr/bin/env bash
# Builds the harness once per compile-time setting, in parallel, then runs each
# build's benchmark one after the other on the device machine:
#   kernels/harness/sweep.sh "base:" "small1:-DDIM_MINB_FWD_SMALL=1" ...
# Each argument is NAME:FLAGS (FLAGS go to nvcc). Built as relocatable device
# code, as cc builds the crate. Logs: $OUT/sweep_<NAME>.log (or /tmp).
set -euo pipefail
cd "$(dirname "$0")/../.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
FLAGS="${GENCODE:--gencode=arch=compute_90a,code=sm_90a} -O3 -std=c++17 --expt-relaxed-constexpr -lineinfo -rdc=true -I kernels"
pids=()
for v in "$@"; do
  name=${v%%:*}; extra=${v#*:}
  b=/tmp/sweep_$name; mkdir -p "$b"
  (
    for f in kernels/scan_*.cu kernels/harness/scan_harness.cu; do
      "$NVCC" $FLAGS $extra -Xcompiler -fopenmp -c "$f" -o "$b/$(basename "${f%.cu}").o" &
    done
    wait
    "$NVCC" $FLAGS $extra -Xcompiler -fopenmp "$b"/*.o -o "$b/scan_harness" -lgomp
  ) &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
for v in "$@"; do
  name=${v%%:*}
  echo "=== $name (${v#*:})"
  /tmp/sweep_$name/scan_harness --bench-only ${HARNESS_ARGS:-} 2>&1 | tee "${OUT:-/tmp}/sweep_$name.log"
done

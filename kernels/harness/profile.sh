#!/usr/bin/env bash
# Profiles the fused bidirectional forward and backward kernels (bf16, N = 16,
# 8 x 2304 x 1024) with Nsight Compute on the device machine:
#   kernels/harness/profile.sh            # builds like run.sh, then ncu
# Prints throughput, occupancy, pipe utilisation and the warp-stall breakdown.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH=/usr/local/cuda/bin:$PATH
BUILD=${BUILD:-/tmp/scan_build}
[ -x "$BUILD/scan_harness" ] || kernels/harness/run.sh --fd-only >/dev/null
NCU=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
S=smsp__average_warps_issue_stalled
M=sm__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.per_cycle_active,smsp__issue_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,gpu__time_duration.sum
for r in barrier long_scoreboard short_scoreboard math_pipe_throttle mio_throttle wait not_selected lg_throttle no_instruction dispatch_stall branch_resolving membar drain selected; do
  M=$M,${S}_${r}_per_issue_active.ratio
done
# Launch order in --profile: fwd(1 dir), bwd(1 dir), fwd(2 dirs), bwd(2 dirs).
"$NCU" --kernel-name regex:'scan_(fwd|bwd)_kernel' --launch-skip 2 --launch-count 2 --metrics "$M" \
  "$BUILD/scan_harness" --profile 2>&1 | tee "${OUT:-/tmp}/ncu.txt"

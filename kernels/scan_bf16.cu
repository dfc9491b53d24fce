// Selective-scan kernels instantiated for one dtype (__nv_bfloat16); see scan_impl.cuh.
#include "scan_impl.cuh"

namespace dimscan {
int launch_fwd_bf16(const KArgs& a, int nt, int lpc, cudaStream_t s) {
  return launch_fwd_impl<__nv_bfloat16>(a, nt, lpc, s);
}
int launch_bwd_bf16(const KArgs& a, int lpc, cudaStream_t s) {
  return launch_bwd_impl<__nv_bfloat16>(a, lpc, s);
}
}  // namespace dimscan

// Selective-scan kernels instantiated for one dtype (__nv_bfloat16); see scan_impl.cuh.
#include "scan_impl.cuh"

namespace dimscan {
int launch_fwd_bf16(const KArgs& a, size_t smem, cudaStream_t s) {
  return launch_fwd2<__nv_bfloat16>(a, smem, s);
}
int launch_bwd_bf16(const KArgs& a, size_t smem, cudaStream_t s) {
  return launch_bwd_impl<__nv_bfloat16>(a, smem, s);
}
}  // namespace dimscan

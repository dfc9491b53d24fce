// Selective-scan kernels instantiated for one dtype (__half); see scan_impl.cuh.
#include "scan_impl.cuh"

namespace dimscan {
int launch_fwd_f16(const KArgs& a, size_t smem, cudaStream_t s) {
  return launch_fwd2<__half>(a, smem, s);
}
int launch_bwd_f16(const KArgs& a, size_t smem, cudaStream_t s) {
  return launch_bwd_impl<__half>(a, smem, s);
}
}  // namespace dimscan

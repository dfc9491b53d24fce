// Selective-scan kernels instantiated for one dtype (float); see scan_impl.cuh.
#include "scan_impl.cuh"

namespace dimscan {
int launch_fwd_f32(const KArgs& a, size_t smem, cudaStream_t s) {
  return launch_fwd2<float>(a, smem, s);
}
int launch_bwd_f32(const KArgs& a, size_t smem, cudaStream_t s) {
  return launch_bwd_impl<float>(a, smem, s);
}
}  // namespace dimscan

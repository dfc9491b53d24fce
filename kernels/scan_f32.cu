// Selective-scan kernels instantiated for one dtype (float); see scan_impl.cuh.
#include "scan_impl.cuh"

namespace dimscan {
int launch_fwd_f32(const KArgs& a, int nt, int lpc, cudaStream_t s) {
  return launch_fwd_impl<float>(a, nt, lpc, s);
}
int launch_bwd_f32(const KArgs& a, int lpc, cudaStream_t s) {
  return launch_bwd_impl<float>(a, lpc, s);
}
}  // namespace dimscan

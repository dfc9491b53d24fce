// Selective-scan kernels instantiated for one dtype (__half); see scan_impl.cuh.
#include "scan_impl.cuh"

namespace dimscan {
int launch_fwd_f16(const KArgs& a, int nt, int lpc, cudaStream_t s) {
  return launch_fwd_impl<__half>(a, nt, lpc, s);
}
int launch_bwd_f16(const KArgs& a, int lpc, cudaStream_t s) {
  return launch_bwd_impl<__half>(a, lpc, s);
}
}  // namespace dimscan

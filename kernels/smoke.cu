// A tiny kernel for the toolchain smoke test (see selective_scan.h): proves
// that nvcc output built by `cc` runs on libtorch-owned memory and stream.
#include <cuda_runtime.h>

#include "selective_scan.h"

__global__ void axpy_iota_kernel(float* out, const float* x, float alpha, int64_t n) {
  int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = alpha * x[i] + (float)i;
}

extern "C" int dim_smoke_axpy_iota(float* out, const float* x, float alpha, int64_t n,
                                   void* stream) {
  if (n <= 0) return 0;
  const int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  axpy_iota_kernel<<<(unsigned)blocks, threads, 0, (cudaStream_t)stream>>>(out, x, alpha, n);
  return (int)cudaGetLastError();
}

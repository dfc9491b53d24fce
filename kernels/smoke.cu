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

__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm volatile("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 8 independent chains keep the special-function unit busy; x -> 2^-x stays in (0, 1].
__global__ void exp2_rate_kernel(float* out, int iters) {
  const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  float x[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) x[k] = 1e-3f * (float)((t + k) & 1023);
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int k = 0; k < 8; ++k) x[k] = ex2_approx(-x[k]);
  }
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < 8; ++k) s += x[k];
  out[t] = s;
}

extern "C" int dim_probe_exp2_rate(float* out, int64_t threads, int iters, void* stream) {
  const int block = 256;
  if (threads <= 0 || threads % block != 0) return (int)cudaErrorInvalidValue;
  exp2_rate_kernel<<<(unsigned)(threads / block), block, 0, (cudaStream_t)stream>>>(out, iters);
  return (int)cudaGetLastError();
}

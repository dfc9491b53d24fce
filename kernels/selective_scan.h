// The selective scan's C ABI, shared by the CUDA kernels (kernels/*.cu), the
// libtorch autograd shim (crates/dim-scan/csrc) and the Rust CPU
// implementation (crates/dim-scan/src/ffi.rs mirrors these structs).
//
// Math, for batch b, channel d, state n, position l (see docs/scan.md):
//   delta'_l = softplus(delta_l + delta_bias[d])    (softplus, bias optional)
//   h_l[n]   = exp(delta'_l * A[d,n]) * h_{l-1}[n] + delta'_l * B_l[n] * u_l
//   y_l      = sum_n C_l[n] * h_l[n] + D[d] * u_l
// A reverse direction runs l = L-1 .. 0 on the same (unflipped) tensors. With
// two directions y = y_fwd + y_rev, then the optional gate y *= silu(z).
//
// Layouts (all contiguous): u, delta, z, y, du, ddelta, dz, dy: (batch, dim, L);
// B, C, dB, dC: (batch, ngroups, N, L), channel d uses group d / (dim / ngroups);
// A, dA: (dim, N); D, delta_bias, dD, ddelta_bias: (dim). A, D, delta_bias and
// every accumulated gradient (dA, dB, dC, dD, ddelta_bias) are float32; the
// other tensors have `dtype`. The state and all accumulation are float32.
#ifndef DIM_SELECTIVE_SCAN_H
#define DIM_SELECTIVE_SCAN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DIM_SCAN_MAX_DIRS 2
#define DIM_SCAN_CUDA_MAX_DSTATE 64

typedef enum { DIM_DTYPE_F32 = 0, DIM_DTYPE_BF16 = 1, DIM_DTYPE_F16 = 2 } dim_dtype;

// One direction's inputs.
typedef struct {
  const void* u;           // (batch, dim, L), dtype
  const void* delta;       // (batch, dim, L), dtype
  const float* A;          // (dim, N)
  const void* B;           // (batch, ngroups, N, L), dtype
  const void* C;           // (batch, ngroups, N, L), dtype
  const float* D;          // (dim) or NULL: no skip term
  const float* delta_bias; // (dim) or NULL
  int32_t reverse;         // 0: l = 0 .. L-1; 1: l = L-1 .. 0
} dim_scan_dir;

// One direction's gradients (backward outputs). Every pointer is written in
// full (not accumulated into); a NULL one is not wanted.
typedef struct {
  void* du;            // (batch, dim, L), dtype
  void* ddelta;        // (batch, dim, L), dtype
  float* dA;           // (dim, N)
  float* dB;           // (batch, ngroups, N, L)
  float* dC;           // (batch, ngroups, N, L)
  float* dD;           // (dim), when D != NULL
  float* ddelta_bias;  // (dim), when delta_bias != NULL
} dim_scan_dir_grads;

typedef struct {
  int64_t batch, dim, seqlen, dstate, ngroups;
  int32_t ndirs;           // 1 or 2
  int32_t dtype;           // dim_dtype of u, delta, B, C, z, y, dy, du, ddelta, dz
  int32_t delta_softplus;  // apply softplus to delta + delta_bias
  int32_t deterministic;   // backward: no floating-point atomics
  dim_scan_dir dir[DIM_SCAN_MAX_DIRS];
  const void* z;           // (batch, dim, L) or NULL: no gate
  void* y;                 // forward output, (batch, dim, L)
  // Backward only.
  const void* dy;          // (batch, dim, L)
  dim_scan_dir_grads grad[DIM_SCAN_MAX_DIRS];
  void* dz;                // (batch, dim, L), when z != NULL
  // Device memory the caller allocates with the sizes the *_bytes functions
  // report: `saved` is written by the forward and read by its backward
  // (chunk-boundary states, and y before the gate when z is given); a forward
  // whose backward will never run (sampling, no_grad) passes NULL and writes
  // nothing there. `workspace` is scratch for one call.
  void* saved;
  void* workspace;
  // Batch strides in elements of u, delta, B, C (per direction) and z; 0 means
  // contiguous. Only the batch dimension may be strided (the CUDA kernels read
  // narrowed views of a larger projection output without a copy); the other
  // dimensions are always packed. The CPU implementation takes 0 only.
  int64_t u_batch_stride[DIM_SCAN_MAX_DIRS];
  int64_t delta_batch_stride[DIM_SCAN_MAX_DIRS];
  int64_t B_batch_stride[DIM_SCAN_MAX_DIRS];
  int64_t C_batch_stride[DIM_SCAN_MAX_DIRS];
  int64_t z_batch_stride;
} dim_scan_params;

// CUDA entry points (kernels/*.cu). `stream` is a cudaStream_t. They return
// 0 on success, else a CUDA error code; dim_scan_cuda_error_string names it.
// Limits: 1 <= dstate <= DIM_SCAN_CUDA_MAX_DSTATE, dim % ngroups == 0; with two
// directions dir[0] runs forward and dir[1] in reverse.
size_t dim_scan_cuda_saved_bytes(const dim_scan_params* p);
size_t dim_scan_cuda_fwd_workspace_bytes(const dim_scan_params* p);
size_t dim_scan_cuda_bwd_workspace_bytes(const dim_scan_params* p);
int dim_scan_cuda_fwd(const dim_scan_params* p, void* stream);
int dim_scan_cuda_bwd(const dim_scan_params* p, void* stream);
const char* dim_scan_cuda_error_string(int code);

// Smoke-test kernel (kernels/smoke.cu): out[i] = alpha * x[i] + (float)i, for
// checking that a kernel built by this project runs on a tch tensor's memory
// on libtorch's current stream.
int dim_smoke_axpy_iota(float* out, const float* x, float alpha, int64_t n, void* stream);

// Special-function rate probe (kernels/smoke.cu): `threads` threads (a
// multiple of 256) each run 8 independent chains of `iters` ex2.approx
// operations, then write one value to out[thread]. Benchmarks time it to
// measure the card's exponential rate in the same run as the scan.
int dim_probe_exp2_rate(float* out, int64_t threads, int iters, void* stream);

#ifdef __cplusplus
}
#endif

#endif  // DIM_SELECTIVE_SCAN_H

// The C ABI of selective_scan.h: argument checks, the launch plan, sizes of
// `saved` and the workspaces, launches, and the fixed-order finishing kernels
// of the backward.
#include <cuda_runtime.h>

#include <atomic>

#include "scan_impl.cuh"

using namespace dimscan;

namespace {

static_assert(kMaxN == DIM_SCAN_CUDA_MAX_DSTATE, "one limit for N");

struct Plan {
  bool ok = false, empty = false;
  int64_t batch = 0, dim = 0, L = 0;
  int N = 0, G = 0, dpg = 0, nc = 0, ndirs = 1, lpc = 1, chf = 1, chb = 1;
  int nt = kNT, lpcf = 1, fstages = 1;  // forward: states a thread, lanes a channel, raw buffers
  size_t esize = 4;
};

size_t up256(size_t x) { return (x + 255) & ~(size_t)255; }

// Largest power of two <= want that divides dpg (blocks stay inside a group).
int fit(int want, int dpg) {
  int c = want < 1 ? 1 : want;
  while (c > 1 && dpg % c) c /= 2;
  return c;
}

// An attribute of the current device, read once per device and kept
// (make_plan runs several times per op call); `fallback` without a device.
enum CachedAttr { kAttrSmemOptin = 0, kAttrSms = 1 };
int device_attr(CachedAttr which, int fallback) {
  constexpr int kDevices = 64;
  static std::atomic<int> cache[2][kDevices];  // 0: not read yet
  const cudaDeviceAttr attr =
      which == kAttrSms ? cudaDevAttrMultiProcessorCount : cudaDevAttrMaxSharedMemoryPerBlockOptin;
  int dev = 0, v = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return fallback;
  }
  const bool cached = dev >= 0 && dev < kDevices;
  if (cached && (v = cache[which][dev].load(std::memory_order_relaxed)) > 0) return v;
  if (cudaDeviceGetAttribute(&v, attr, dev) != cudaSuccess || v <= 0) {
    cudaGetLastError();
    return fallback;
  }
  if (cached) cache[which][dev].store(v, std::memory_order_relaxed);
  return v;
}
// No device: size for the smallest supported card (99 KB a block) and an H100/H200.
size_t smem_limit() { return (size_t)device_attr(kAttrSmemOptin, 99 * 1024); }
int sm_count() { return device_attr(kAttrSms, 132); }
size_t fwd_smem(int dtype, int nd, int ch, int N, int np, int stages) {
  return dtype == DIM_DTYPE_F32 ? Smem<float>::fwd_bytes(nd, ch, N, np, stages)
                                : Smem<__half>::fwd_bytes(nd, ch, N, np, stages);
}
size_t bwd_smem(int dtype, int ch, int N, int np) {
  return dtype == DIM_DTYPE_F32 ? Smem<float>::bwd_bytes(ch, N, np) : Smem<__half>::bwd_bytes(ch, N, np);
}

Plan make_plan(const dim_scan_params* p) {
  Plan q;
  if (!p) return q;
  if (p->ndirs != 1 && p->ndirs != 2) return q;
  if (p->dtype < 0 || p->dtype > 2) return q;
  if (p->batch < 0 || p->dim < 0 || p->seqlen < 0) return q;
  if (p->dstate < 1 || p->dstate > kMaxN) return q;
  if (p->ngroups < 1 || (p->dim % p->ngroups) != 0) return q;
  if (p->ndirs == 2 && !(p->dir[0].reverse == 0 && p->dir[1].reverse != 0)) return q;
  q.batch = p->batch;
  q.dim = p->dim;
  q.L = p->seqlen;
  q.N = (int)p->dstate;
  q.G = (int)p->ngroups;
  q.ndirs = p->ndirs;
  q.dpg = (int)(p->dim / p->ngroups);
  q.empty = q.batch == 0 || q.dim == 0 || q.L == 0;
  q.nc = (int)((q.L + kT - 1) / kT);
  q.esize = p->dtype == DIM_DTYPE_F32 ? 4 : 2;
  while (q.lpc * kNT < q.N) q.lpc *= 2;
  // The forward splits a channel's states over twice the lanes (2 a thread)
  // when 4 a thread would leave the card under 8 warps an SM (batch x dim
  // small: 1 x 2304 x 16384 runs 1.3x faster so; measured on an H200, 1 and
  // 8 states a thread were slower at every size, docs/kernels.md).
  q.lpcf = q.lpc;
  const double warps = (double)q.batch * q.dim * q.ndirs * q.lpc / 32.0;
  if (q.N <= 16 && warps < 8.0 * sm_count()) q.nt = 2, q.lpcf = 8;
  // A small grid cannot hide a chunk's load latency behind other blocks:
  // copy two chunks ahead there (2 x 2304 x 4096: 1.55 -> 0.88 ms), one
  // elsewhere (a third buffer costs a block an SM: 8 x 2304 x 1024 0.53 -> 0.59).
  if (warps < 16.0 * sm_count()) q.fstages = kFwdMaxStages;
  q.chf = fit(kThreadsFwd / (q.ndirs * q.lpcf), q.dpg);
  q.chb = fit(kThreadsBwd / q.lpc, q.dpg);
  // Fewer channels a block where shared memory is smaller (99 KB a block on
  // sm_86 / sm_89, 163 KB on sm_80, 227 KB on sm_90).
  const size_t limit = smem_limit();
  const int np = q.lpc * kNT;
  while (q.chf > 1 && fwd_smem(p->dtype, q.ndirs, q.chf, q.N, q.lpcf * q.nt, q.fstages) > limit)
    q.chf /= 2;
  while (q.chb > 1 && bwd_smem(p->dtype, q.chb, q.N, np) > limit) q.chb /= 2;
  q.ok = true;
  return q;
}

size_t states_bytes(const Plan& q) {
  return up256((size_t)q.ndirs * q.batch * q.dim * q.nc * q.N * sizeof(float));
}
size_t ypre_bytes(const Plan& q, const dim_scan_params* p) {
  return p->z ? up256((size_t)q.batch * q.dim * q.L * q.esize) : 0;
}
size_t saved_bytes(const Plan& q, const dim_scan_params* p) {
  return states_bytes(q) + ypre_bytes(q, p);
}
size_t fwd_ws(const Plan& q) {
  return q.ndirs == 2 ? up256((size_t)q.batch * q.dim * q.L * sizeof(float)) : 0;
}

struct BwdLayout {
  size_t red = 0, bc = 0, total = 0;
};
BwdLayout bwd_layout(const Plan& q, const dim_scan_params* p) {
  BwdLayout l;
  l.red = 0;
  l.bc = up256((size_t)q.ndirs * q.batch * q.dim * (q.N + 2) * sizeof(float));
  l.total = l.bc;
  if (p->deterministic)
    l.total += up256((size_t)(q.dpg / q.chb) * q.ndirs * 2 * q.batch * q.G * q.N * q.L *
                     sizeof(float));
  return l;
}

bool al16(const void* ptr) { return ((uintptr_t)ptr & 15) == 0; }

int64_t bstride(int64_t given, int64_t dflt) { return given ? given : dflt; }

KArgs make_args(const Plan& q, const dim_scan_params* p, bool bwd) {
  KArgs a{};
  a.batch = q.batch;
  a.dim = q.dim;
  a.L = q.L;
  a.N = q.N;
  a.G = q.G;
  a.dpg = q.dpg;
  a.CH = bwd ? q.chb : q.chf;
  a.fstages = q.fstages;
  a.nc = q.nc;
  a.ndirs = q.ndirs;
  a.softplus = p->delta_softplus != 0;
  a.rev0 = p->dir[0].reverse != 0;
  a.det = p->deterministic != 0;
  // 16-byte rows everywhere: cp.async and vector loads / stores.
  const int64_t e = (int64_t)q.esize;
  bool vec = (q.L * e) % 16 == 0;
  auto row_ok = [&](const void* ptr, int64_t bs) { return ptr == nullptr || (al16(ptr) && (bs * e) % 16 == 0); };
  const int64_t per_bc = (int64_t)q.G * q.N * q.L;
  for (int k = 0; k < q.ndirs; ++k) {
    const dim_scan_dir& d = p->dir[k];
    DirArgs& o = a.dir[k];
    o.u = d.u;
    o.delta = d.delta;
    o.A = d.A;
    o.B = d.B;
    o.C = d.C;
    o.D = d.D;
    o.bias = d.delta_bias;
    o.u_bs = bstride(p->u_batch_stride[k], q.dim * q.L);
    o.delta_bs = bstride(p->delta_batch_stride[k], q.dim * q.L);
    o.B_bs = bstride(p->B_batch_stride[k], per_bc);
    o.C_bs = bstride(p->C_batch_stride[k], per_bc);
    vec = vec && row_ok(d.u, o.u_bs) && row_ok(d.delta, o.delta_bs) && row_ok(d.B, o.B_bs) &&
          row_ok(d.C, o.C_bs);
    if (bwd) {
      const dim_scan_dir_grads& g = p->grad[k];
      o.du = g.du;
      o.ddelta = g.ddelta;
      o.dB = g.dB;
      o.dC = g.dC;
      vec = vec && row_ok(g.du, 0) && row_ok(g.ddelta, 0) && row_ok(g.dB, 0) && row_ok(g.dC, 0);
    }
  }
  a.z = p->z;
  a.z_bs = bstride(p->z_batch_stride, q.dim * q.L);
  a.y = p->y;
  a.dy = p->dy;
  a.dz = p->dz;
  vec = vec && row_ok(p->z, a.z_bs) && row_ok(p->y, 0) && row_ok(p->dy, 0) && row_ok(p->dz, 0);
  a.vec = vec;
  if (p->saved) {
    char* s = reinterpret_cast<char*>(p->saved);
    a.states = reinterpret_cast<float*>(s);
    a.ypre = p->z ? s + states_bytes(q) : nullptr;
  }
  return a;
}

// dA[d][n], dD[d], dbias[d] = sum over b (fixed order) of the per-channel partials.
__global__ void finalize_param_grads(const float* __restrict__ part, int64_t batch, int64_t dim,
                                     int N, float* dA, float* dD, float* dbias) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t per = dim * (N + 2);
  if (i >= per) return;
  const int64_t d = i / (N + 2);
  const int j = (int)(i % (N + 2));
  float s = 0.f;
  for (int64_t b = 0; b < batch; ++b) s += part[b * per + i];
  if (j < N) {
    if (dA) dA[d * N + j] = s;
  } else if (j == N) {
    if (dD) dD[d] = s;
  } else {
    if (dbias) dbias[d] = s;
  }
}

// out[o] = sum over k (fixed order) of part[k][o] (deterministic dB/dC).
__global__ void finalize_bc(const float* __restrict__ part, int K, int64_t stride_k, int64_t n,
                            float* __restrict__ out) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float s = 0.f;
  for (int k = 0; k < K; ++k) s += part[k * stride_k + i];
  out[i] = s;
}

int launch_fwd(int dtype, const KArgs& a, int nt, int lpc, cudaStream_t s) {
  switch (dtype) {
    case DIM_DTYPE_F32: return launch_fwd_f32(a, nt, lpc, s);
    case DIM_DTYPE_BF16: return launch_fwd_bf16(a, nt, lpc, s);
    default: return launch_fwd_f16(a, nt, lpc, s);
  }
}
int launch_bwd(int dtype, const KArgs& a, int lpc, cudaStream_t s) {
  switch (dtype) {
    case DIM_DTYPE_F32: return launch_bwd_f32(a, lpc, s);
    case DIM_DTYPE_BF16: return launch_bwd_bf16(a, lpc, s);
    default: return launch_bwd_f16(a, lpc, s);
  }
}

bool inputs_ok(const Plan& q, const dim_scan_params* p) {
  for (int k = 0; k < q.ndirs; ++k) {
    const dim_scan_dir& d = p->dir[k];
    if (!d.u || !d.delta || !d.A || !d.B || !d.C) return false;
  }
  return true;
}

}  // namespace

extern "C" size_t dim_scan_cuda_saved_bytes(const dim_scan_params* p) {
  Plan q = make_plan(p);
  return q.ok ? saved_bytes(q, p) : 0;
}

extern "C" size_t dim_scan_cuda_fwd_workspace_bytes(const dim_scan_params* p) {
  Plan q = make_plan(p);
  return q.ok ? fwd_ws(q) : 0;
}

extern "C" size_t dim_scan_cuda_bwd_workspace_bytes(const dim_scan_params* p) {
  Plan q = make_plan(p);
  return q.ok ? bwd_layout(q, p).total : 0;
}

extern "C" int dim_scan_cuda_fwd(const dim_scan_params* p, void* stream) {
  Plan q = make_plan(p);
  if (!q.ok) return (int)cudaErrorInvalidValue;
  if (q.empty) return 0;
  if (!p->y || (q.ndirs == 2 && !p->workspace) || !inputs_ok(q, p)) return (int)cudaErrorInvalidValue;
  KArgs a = make_args(q, p, false);
  a.ypart = q.ndirs == 2 ? reinterpret_cast<float*>(p->workspace) : nullptr;
  return launch_fwd(p->dtype, a, q.nt, q.lpcf, (cudaStream_t)stream);
}

extern "C" int dim_scan_cuda_bwd(const dim_scan_params* p, void* stream) {
  Plan q = make_plan(p);
  if (!q.ok) return (int)cudaErrorInvalidValue;
  cudaStream_t s = (cudaStream_t)stream;
  if (q.empty) {
    // Parameter gradients of an empty problem are zero.
    for (int k = 0; k < q.ndirs; ++k) {
      const dim_scan_dir_grads& g = p->grad[k];
      if (g.dA && q.dim) cudaMemsetAsync(g.dA, 0, q.dim * q.N * sizeof(float), s);
      if (g.dD && q.dim) cudaMemsetAsync(g.dD, 0, q.dim * sizeof(float), s);
      if (g.ddelta_bias && q.dim) cudaMemsetAsync(g.ddelta_bias, 0, q.dim * sizeof(float), s);
      const size_t bcb = (size_t)q.batch * q.G * q.N * q.L * sizeof(float);
      if (g.dB && bcb) cudaMemsetAsync(g.dB, 0, bcb, s);
      if (g.dC && bcb) cudaMemsetAsync(g.dC, 0, bcb, s);
    }
    return (int)cudaGetLastError();
  }
  // The backward needs what a grad-enabled forward saved.
  if (!p->dy || !p->saved || !p->workspace || !inputs_ok(q, p)) return (int)cudaErrorInvalidValue;
  BwdLayout l = bwd_layout(q, p);
  char* ws = reinterpret_cast<char*>(p->workspace);
  KArgs a = make_args(q, p, true);
  a.red_part = reinterpret_cast<float*>(ws + l.red);
  a.bc_part = a.det ? reinterpret_cast<float*>(ws + l.bc) : nullptr;
  const size_t bcbytes = (size_t)q.batch * q.G * q.N * q.L * sizeof(float);
  if (!a.det) {
    for (int k = 0; k < q.ndirs; ++k) {
      for (float* t : {p->grad[k].dB, p->grad[k].dC}) {
        if (!t) continue;
        cudaError_t e = cudaMemsetAsync(t, 0, bcbytes, s);
        if (e != cudaSuccess) return (int)e;
      }
    }
  }
  int rc = launch_bwd(p->dtype, a, q.lpc, s);
  if (rc) return rc;
  const int K = q.dpg / q.chb;
  const int64_t n = q.batch * q.G * (int64_t)q.N * q.L;
  for (int k = 0; k < q.ndirs; ++k) {
    const dim_scan_dir_grads& g = p->grad[k];
    const int64_t per = q.dim * (q.N + 2);
    finalize_param_grads<<<(unsigned)((per + 255) / 256), 256, 0, s>>>(
        a.red_part + (int64_t)k * q.batch * per, q.batch, q.dim, q.N, g.dA, g.dD, g.ddelta_bias);
    if (a.det) {
      const int64_t stride_k = (int64_t)q.ndirs * 2 * n;
      for (int which = 0; which < 2; ++which) {
        float* out = which ? g.dC : g.dB;
        if (!out) continue;
        const float* src = a.bc_part + ((int64_t)k * 2 + which) * n;
        finalize_bc<<<(unsigned)((n + 255) / 256), 256, 0, s>>>(src, K, stride_k, n, out);
      }
    }
  }
  return (int)cudaGetLastError();
}

extern "C" const char* dim_scan_cuda_error_string(int code) {
  return cudaGetErrorString((cudaError_t)code);
}

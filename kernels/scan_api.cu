// The C ABI of selective_scan.h: sizes, argument checks, launches.
#include <cuda_runtime.h>

#include "scan_impl.cuh"

using namespace dimscan;

namespace dimscan {
// Upper bound of the deterministic backward's dB/dC partial buffer (bytes);
// a variable only so that the test harness can force several rounds.
int64_t g_det_partial_budget = 256ll << 20;
// Forward variant (0: automatic); a variable only for the harness's comparisons.
int g_fwd_variant = 0;
// Backward warps per block override (0: automatic); harness knob.
int g_bwd_w = 0;
}  // namespace dimscan

namespace {


struct Plan {
  bool ok = false;
  int64_t batch = 0, dim = 0, L = 0;
  int N = 0, G = 0, dpg = 0, W = 1, Wb = 1, nc = 0, K = 1, rounds = 1, ndirs = 1;
  bool empty = false;
};

size_t up256(size_t x) { return (x + 255) & ~(size_t)255; }

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
  q.W = 1;
  for (int w : {8, 4, 2}) {
    if (q.dpg % w == 0) {
      q.W = w;
      break;
    }
  }
  q.Wb = 1;
  for (int w : {4, 2}) {
    if (g_bwd_w && w > g_bwd_w) continue;
    if (q.dpg % w == 0) {
      q.Wb = w;
      break;
    }
  }
  q.nc = (int)((q.L + kChunk - 1) / kChunk);
  const int cbpg = q.dpg / q.Wb;
  q.K = cbpg;
  q.rounds = 1;
  if (p->deterministic && !q.empty) {
    const int64_t per = q.batch * q.G * (int64_t)q.N * q.L * 2 * q.ndirs * 4;
    int64_t k = g_det_partial_budget / per;
    if (k < 1) k = 1;
    if (k > cbpg) k = cbpg;
    q.K = (int)k;
    q.rounds = (cbpg + q.K - 1) / q.K;
  }
  q.ok = true;
  return q;
}

size_t saved_bytes(const Plan& q) {
  return up256((size_t)q.ndirs * q.batch * q.dim * q.nc * q.N * sizeof(float));
}

size_t ypart_bytes(const Plan& q) { return up256((size_t)q.batch * q.dim * q.L * sizeof(float)); }

size_t fwd_ws(const Plan& q) { return q.ndirs == 2 ? ypart_bytes(q) : 0; }

struct BwdLayout {
  size_t ypart = 0, red = 0, bc = 0, total = 0;
};

BwdLayout bwd_layout(const Plan& q, const dim_scan_params* p) {
  BwdLayout l;
  size_t off = 0;
  if (q.ndirs == 2 && p->z) {
    l.ypart = off;
    off += ypart_bytes(q);
  }
  l.red = off;
  off += up256((size_t)q.ndirs * q.batch * q.dim * (q.N + 2) * sizeof(float));
  l.bc = off;
  if (p->deterministic)
    off += up256((size_t)q.K * q.ndirs * 2 * q.batch * q.G * q.N * q.L * sizeof(float));
  l.total = off;
  return l;
}

bool al16(const void* ptr) { return ((uintptr_t)ptr & 15) == 0; }

KArgs make_args(const Plan& q, const dim_scan_params* p, bool bwd) {
  KArgs a{};
  a.batch = q.batch;
  a.dim = q.dim;
  a.L = q.L;
  a.N = q.N;
  a.G = q.G;
  a.dpg = q.dpg;
  a.W = bwd ? q.Wb : q.W;
  a.nc = q.nc;
  a.ndirs = q.ndirs;
  a.softplus = p->delta_softplus != 0;
  a.rev0 = p->dir[0].reverse != 0;
  bool vec = (q.L % 8) == 0;
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
    vec = vec && al16(d.u) && al16(d.delta) && al16(d.B) && al16(d.C);
    if (bwd) {
      const dim_scan_dir_grads& g = p->grad[k];
      o.du = g.du;
      o.ddelta = g.ddelta;
      o.dB = g.dB;
      o.dC = g.dC;
      vec = vec && al16(g.du) && al16(g.ddelta);
    }
  }
  a.z = p->z;
  a.y = p->y;
  a.dy = p->dy;
  a.dz = p->dz;
  vec = vec && al16(p->z) && al16(p->y);
  if (bwd) vec = vec && al16(p->dy) && al16(p->dz);
  a.vec = vec;
  a.vec4 = false;
  if (bwd) {
    bool v4 = (q.L % 4) == 0;
    for (int k = 0; k < q.ndirs; ++k) v4 = v4 && al16(p->grad[k].dB) && al16(p->grad[k].dC);
    a.vec4 = v4;
  }
  a.saved = reinterpret_cast<float*>(p->saved);
  a.K = q.K;
  a.rounds = q.rounds;
  a.det = p->deterministic != 0;
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
  int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * 4;
  if (i >= n) return;
  if (i + 4 <= n && (n % 4) == 0 && (stride_k % 4) == 0) {
    float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int k = 0; k < K; ++k) {
      float4 v = *reinterpret_cast<const float4*>(part + k * stride_k + i);
      s.x += v.x; s.y += v.y; s.z += v.z; s.w += v.w;
    }
    *reinterpret_cast<float4*>(out + i) = s;
  } else {
    for (int64_t j = i; j < i + 4 && j < n; ++j) {
      float s = 0.f;
      for (int k = 0; k < K; ++k) s += part[k * stride_k + j];
      out[j] = s;
    }
  }
}

int launch_fwd(int dtype, const KArgs& a, size_t smem, cudaStream_t s) {
  switch (dtype) {
    case DIM_DTYPE_F32: return launch_fwd_f32(a, smem, s);
    case DIM_DTYPE_BF16: return launch_fwd_bf16(a, smem, s);
    default: return launch_fwd_f16(a, smem, s);
  }
}
int launch_bwd(int dtype, const KArgs& a, size_t smem, cudaStream_t s) {
  switch (dtype) {
    case DIM_DTYPE_F32: return launch_bwd_f32(a, smem, s);
    case DIM_DTYPE_BF16: return launch_bwd_bf16(a, smem, s);
    default: return launch_bwd_f16(a, smem, s);
  }
}

}  // namespace

extern "C" size_t dim_scan_cuda_saved_bytes(const dim_scan_params* p) {
  Plan q = make_plan(p);
  return q.ok ? saved_bytes(q) : 0;
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
  if (!p->y || !p->saved || (q.ndirs == 2 && !p->workspace)) return (int)cudaErrorInvalidValue;
  for (int k = 0; k < q.ndirs; ++k) {
    const dim_scan_dir& d = p->dir[k];
    if (!d.u || !d.delta || !d.A || !d.B || !d.C) return (int)cudaErrorInvalidValue;
  }
  KArgs a = make_args(q, p, false);
  a.ypart = reinterpret_cast<float*>(p->workspace);
  a.vec = a.vec && al16(a.ypart);
  const size_t smem = 2 * kNG * kFChunk * sizeof(float);
  return launch_fwd(p->dtype, a, smem, (cudaStream_t)stream);
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
  if (!p->dy || !p->saved || !p->workspace) return (int)cudaErrorInvalidValue;
  for (int k = 0; k < q.ndirs; ++k) {
    const dim_scan_dir& d = p->dir[k];
    if (!d.u || !d.delta || !d.A || !d.B || !d.C) return (int)cudaErrorInvalidValue;
  }
  BwdLayout l = bwd_layout(q, p);
  char* ws = reinterpret_cast<char*>(p->workspace);
  KArgs a = make_args(q, p, true);
  a.ypart = (q.ndirs == 2 && p->z) ? reinterpret_cast<float*>(ws + l.ypart) : nullptr;
  a.red_part = reinterpret_cast<float*>(ws + l.red);
  a.bc_part = p->deterministic ? reinterpret_cast<float*>(ws + l.bc) : nullptr;
  a.vec = a.vec && al16(a.ypart);
  const size_t bcbytes = (size_t)q.batch * q.G * q.N * q.L * sizeof(float);
  if (!a.det) {
    for (int k = 0; k < q.ndirs; ++k) {
      if (p->grad[k].dB) {
        cudaError_t e = cudaMemsetAsync(p->grad[k].dB, 0, bcbytes, s);
        if (e != cudaSuccess) return (int)e;
      }
      if (p->grad[k].dC) {
        cudaError_t e = cudaMemsetAsync(p->grad[k].dC, 0, bcbytes, s);
        if (e != cudaSuccess) return (int)e;
      }
    }
  }
  const size_t smem = (2 * kNG * kChunk + 2 * (size_t)q.Wb * 2 * kChunk +
                       2 * (size_t)q.ndirs * q.Wb * q.N * 32) *  // dA sums + compensations
                      sizeof(float);
  int rc = launch_bwd(p->dtype, a, smem, s);
  if (rc) return rc;
  for (int k = 0; k < q.ndirs; ++k) {
    const dim_scan_dir_grads& g = p->grad[k];
    const int64_t per = q.dim * (q.N + 2);
    finalize_param_grads<<<(unsigned)((per + 255) / 256), 256, 0, s>>>(
        a.red_part + (int64_t)k * q.batch * per, q.batch, q.dim, q.N, g.dA, g.dD,
        g.ddelta_bias);
    if (a.det) {
      const int64_t n = q.batch * q.G * (int64_t)q.N * q.L;
      const int64_t stride_k = (int64_t)q.ndirs * 2 * n;
      for (int which = 0; which < 2; ++which) {
        float* out = which ? g.dC : g.dB;
        if (!out) continue;
        const float* src = a.bc_part + ((int64_t)k * 2 + which) * n;
        const int64_t thr = (n + 3) / 4;
        finalize_bc<<<(unsigned)((thr + 255) / 256), 256, 0, s>>>(src, q.K, stride_k, n, out);
      }
    }
  }
  return (int)cudaGetLastError();
}

extern "C" const char* dim_scan_cuda_error_string(int code) {
  return cudaGetErrorString((cudaError_t)code);
}

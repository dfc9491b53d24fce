// Selective-scan CUDA kernels (forward, backward; one direction or fused
// bidirectional). Design notes: docs/kernels.md. This header holds the kernel
// templates; scan_f32.cu / scan_bf16.cu / scan_f16.cu instantiate them for one
// dtype each, scan_api.cu holds the C ABI of selective_scan.h.
//
// Work decomposition: one warp owns one channel (b, d) and sweeps L in chunks
// of 256 positions; lane j owns positions 8j .. 8j+7 of the chunk. For each
// state index n the lane scans its 8 items sequentially, the warp combines the
// 32 lane aggregates with a shuffle scan, and the chunk-to-chunk state is
// carried in registers (state n lives in lane n % 32). A block holds W warps =
// W consecutive channels of one (batch, group), so B and C of a chunk are
// staged in shared memory once for all of them (and, in the backward, the
// dB/dC contributions of the W channels are summed there before going out).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "selective_scan.h"

namespace dimscan {

constexpr int kChunk = 256;      // positions per chunk (32 lanes x 8 items)
constexpr int kItems = 8;        // items per lane
constexpr int kNG = 16;          // state indices staged in shared memory at once
constexpr int kMaxN = 64;        // lane-distributed carries: 2 registers
#ifndef DIMSCAN_BWD_MINB
#define DIMSCAN_BWD_MINB 3
#endif
constexpr float kLog2e = 1.4426950408889634f;

// ---------------------------------------------------------------- params ---

struct DirArgs {
  const void* u;
  const void* delta;
  const float* A;
  const void* B;
  const void* C;
  const float* D;
  const float* bias;
  // backward outputs
  void* du;
  void* ddelta;
  float* dB;
  float* dC;
};

struct KArgs {
  int64_t batch, dim, L;
  int N, G, dpg, W, nc;
  int ndirs, softplus, vec, vec4, rev0;
  DirArgs dir[2];
  const void* z;
  void* y;
  const void* dy;
  void* dz;
  float* saved;      // [ndirs][batch*dim][nc][N]
  float* ypart;      // [batch*dim][L] f32 partial y (bidirectional)
  float* red_part;   // backward: [ndirs][batch][dim][N+2] per-channel dA | dD | dbias
  float* bc_part;    // deterministic backward: [K][ndirs][batch][G][2][N][L]
  int K, rounds, det;
};

// ------------------------------------------------------------- utilities ---

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

// Loads M (a multiple of 8) consecutive items starting at pos0 of a row
// (positions >= L read 0). vec: L % 8 == 0 and the row base is 16-byte
// aligned, so 16-byte vector accesses are aligned. NC: read-only path (only
// for data that no thread of this kernel writes).
template <typename T, bool NC = true, int M>
__device__ __forceinline__ void loadv(const T* __restrict__ row, int64_t pos0, int64_t L, bool vec,
                                      float (&out)[M]) {
#pragma unroll
  for (int k = 0; k < M / 8; ++k) {
    const int64_t q = pos0 + 8 * k;
    if (vec && q < L) {
      if constexpr (sizeof(T) == 4) {
        const float4* p = reinterpret_cast<const float4*>(row + q);
        float4 a = NC ? __ldg(p) : p[0], b = NC ? __ldg(p + 1) : p[1];
        out[8 * k + 0] = a.x; out[8 * k + 1] = a.y; out[8 * k + 2] = a.z; out[8 * k + 3] = a.w;
        out[8 * k + 4] = b.x; out[8 * k + 5] = b.y; out[8 * k + 6] = b.z; out[8 * k + 7] = b.w;
      } else {
        uint4 v = __ldg(reinterpret_cast<const uint4*>(row + q));
        const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
        for (int i = 0; i < 8; ++i) out[8 * k + i] = to_f(e[i]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) out[8 * k + i] = (q + i < L) ? to_f(row[q + i]) : 0.f;
    }
  }
}
template <typename T, bool NC = true>
__device__ __forceinline__ void load8(const T* __restrict__ row, int64_t pos0, int64_t L, bool vec,
                                      float (&out)[8]) {
  loadv<T, NC, 8>(row, pos0, L, vec, out);
}

template <typename T, int M>
__device__ __forceinline__ void storev(T* __restrict__ row, int64_t pos0, int64_t L, bool vec,
                                       const float (&v)[M]) {
#pragma unroll
  for (int k = 0; k < M / 8; ++k) {
    const int64_t q = pos0 + 8 * k;
    if (vec && q < L) {
      if constexpr (sizeof(T) == 4) {
        float4* p = reinterpret_cast<float4*>(row + q);
        p[0] = make_float4(v[8 * k + 0], v[8 * k + 1], v[8 * k + 2], v[8 * k + 3]);
        p[1] = make_float4(v[8 * k + 4], v[8 * k + 5], v[8 * k + 6], v[8 * k + 7]);
      } else {
        uint4 w;
        T* e = reinterpret_cast<T*>(&w);
#pragma unroll
        for (int i = 0; i < 8; ++i) e[i] = from_f<T>(v[8 * k + i]);
        *reinterpret_cast<uint4*>(row + q) = w;
      }
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (q + i < L) row[q + i] = from_f<T>(v[8 * k + i]);
    }
  }
}
template <typename T>
__device__ __forceinline__ void store8(T* __restrict__ row, int64_t pos0, int64_t L, bool vec,
                                       const float (&v)[8]) {
  storev<T, 8>(row, pos0, L, vec, v);
}

// Shared-memory row of 32*M positions, interleaved so that each group of 4
// items of a lane is one conflict-free 16-byte access: item i of lane j sits
// at (i / 4) * 128 + j * 4 + i % 4.
template <int M>
__device__ __forceinline__ void ldsv(const float* row, int lane, float (&v)[M]) {
#pragma unroll
  for (int g = 0; g < M / 4; ++g) {
    float4 a = *reinterpret_cast<const float4*>(row + g * 128 + lane * 4);
    v[4 * g] = a.x; v[4 * g + 1] = a.y; v[4 * g + 2] = a.z; v[4 * g + 3] = a.w;
  }
}
template <int M>
__device__ __forceinline__ void stsv(float* row, int lane, const float (&v)[M]) {
#pragma unroll
  for (int g = 0; g < M / 4; ++g)
    *reinterpret_cast<float4*>(row + g * 128 + lane * 4) =
        make_float4(v[4 * g], v[4 * g + 1], v[4 * g + 2], v[4 * g + 3]);
}
__device__ __forceinline__ void lds8(const float* row, int lane, float (&v)[8]) { ldsv<8>(row, lane, v); }
__device__ __forceinline__ void sts8(float* row, int lane, const float (&v)[8]) { stsv<8>(row, lane, v); }

// Inclusive warp scan of linear maps h -> P*h + H, composed in lane order
// (DOWN = false: lane 0 first; DOWN = true: lane 31 first).
template <bool DOWN>
__device__ __forceinline__ void warp_scan(float& P, float& H, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    float Pp = DOWN ? __shfl_down_sync(0xffffffffu, P, o) : __shfl_up_sync(0xffffffffu, P, o);
    float Hp = DOWN ? __shfl_down_sync(0xffffffffu, H, o) : __shfl_up_sync(0xffffffffu, H, o);
    const bool ok = DOWN ? (lane + o < 32) : (lane >= o);
    Pp = ok ? Pp : 1.f;  // identity map for lanes without a predecessor
    Hp = ok ? Hp : 0.f;
    H = fmaf(P, Hp, H);
    P = P * Pp;
  }
}

// Applies the scanned lane maps to the carry S (the state entering the chunk
// in scan order): returns the state entering this lane, and updates S to the
// state leaving the chunk.
template <bool DOWN>
__device__ __forceinline__ float warp_apply(float P, float H, float& S, int lane) {
  float incl = fmaf(P, S, H);
  float prev = DOWN ? __shfl_down_sync(0xffffffffu, incl, 1) : __shfl_up_sync(0xffffffffu, incl, 1);
  float start = (DOWN ? lane == 31 : lane == 0) ? S : prev;
  S = __shfl_sync(0xffffffffu, incl, DOWN ? 0 : 31);
  return start;
}

// Lane-distributed per-n carry (n < 64): state n lives in lane n & 31, reg n >> 5.
struct Carry {
  float r0, r1;
  __device__ __forceinline__ float get(int n) const {
    return __shfl_sync(0xffffffffu, n < 32 ? r0 : r1, n & 31);
  }
  __device__ __forceinline__ void set(int n, float v, int lane) {
    if (lane == (n & 31)) {
      if (n < 32) r0 = v; else r1 = v;
    }
  }
};

__device__ __forceinline__ float softplusf(float x) { return x <= 20.f ? log1pf(__expf(x)) : x; }
__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + __expf(-x)); }

// Stages rows [n0, n0+nn) of B and C for the chunk of 32*M positions starting
// at pos_base into shared memory as f32 (rows of 32*M floats, ldsv layout).
template <typename T, int M>
__device__ __forceinline__ void stage_bc(float* sB, float* sC, const T* __restrict__ Bg,
                                         const T* __restrict__ Cg, int n0, int nn, int64_t L,
                                         int64_t pos_base, bool vec) {
  constexpr int kUnits = 4 * M;  // 8-position units per row
  constexpr int kRow = 32 * M;
  const int nthr = blockDim.x;
  const int tasks = 2 * nn * kUnits;
  for (int t = threadIdx.x; t < tasks; t += nthr) {
    const int which = t / (nn * kUnits);
    const int r = (t / kUnits) % nn;
    const int q = t % kUnits;
    const int ln = q / (M / 8), sub = q % (M / 8);
    const T* src = (which ? Cg : Bg) + (int64_t)(n0 + r) * L;
    float v[8];
    load8<T>(src, pos_base + q * 8, L, vec, v);
    float* dst = (which ? sC : sB) + r * kRow + ln * 4;
    *reinterpret_cast<float4*>(dst + (2 * sub) * 128) = make_float4(v[0], v[1], v[2], v[3]);
    *reinterpret_cast<float4*>(dst + (2 * sub + 1) * 128) = make_float4(v[4], v[5], v[6], v[7]);
  }
}

// --------------------------------------------------------------- forward ---

enum Role { ONLY = 0, FIRST = 1, SECOND = 2 };

// The forward visits chunks of kFChunk = 512 positions (16 items a lane); the
// states it saves for the backward are those entering every 256-chunk.
constexpr int kFItems = 16;
constexpr int kFChunk = 32 * kFItems;

template <typename T, bool REV>
__device__ __forceinline__ void fwd_visit(const KArgs& a, int k, int64_t c, int role, Carry& S,
                                          float* sB, float* sC, int64_t b, int64_t d, int g,
                                          int lane) {
  constexpr int IT = kFItems;
  const DirArgs& dr = a.dir[k];
  const int64_t L = a.L;
  const int N = a.N;
  const int64_t row = b * a.dim + d;
  const int64_t roff = row * L;
  const int64_t pos0 = c * kFChunk + lane * IT;
  const bool vec = a.vec;
  // 256-chunks covered: c2 (lanes 0..15) and c2 + 1 (lanes 16..31, may not exist).
  const int64_t c2 = 2 * c;
  const bool has_hi = c2 + 1 < a.nc;
  float* sv = a.saved + ((int64_t)k * a.batch * a.dim + row) * a.nc * N;
  // State entering the chunk (in scan order) for the backward.
  {
    const int64_t ci = REV ? c2 + 1 : c2;
    if (!REV || has_hi) {
      if (lane < N) sv[ci * N + lane] = S.r0;
      if (lane + 32 < N) sv[ci * N + lane + 32] = S.r1;
    }
  }
  // The lane whose start state is the state entering the other 256-chunk.
  const int mid_lane = REV ? 15 : 16;
  const bool mid_write = REV ? true : has_hi;
  float* sv_mid = sv + (REV ? c2 : c2 + 1) * N;

  float dt[IT], dtu[IT], y[IT];
  float dsum = 0.f;
  {
    float u[IT];
    loadv<T>(reinterpret_cast<const T*>(dr.u) + roff, pos0, L, vec, u);
    loadv<T>(reinterpret_cast<const T*>(dr.delta) + roff, pos0, L, vec, dt);
    const float bias = dr.bias ? __ldg(dr.bias + d) : 0.f;
    const float Dd = dr.D ? __ldg(dr.D + d) : 0.f;
#pragma unroll
    for (int i = 0; i < IT; ++i) {
      float x = dt[i] + bias;
      float v = a.softplus ? softplusf(x) : x;
      v = (pos0 + i < L) ? v : 0.f;
      dt[i] = v;
      dtu[i] = v * u[i];
      y[i] = Dd * u[i];
      dsum += v;
    }
  }
  const T* Bg = reinterpret_cast<const T*>(dr.B) + ((b * a.G + g) * (int64_t)N) * L;
  const T* Cg = reinterpret_cast<const T*>(dr.C) + ((b * a.G + g) * (int64_t)N) * L;
  const float* Ad = dr.A + d * N;

  for (int n0 = 0; n0 < N; n0 += kNG) {
    const int nn = min(kNG, N - n0);
    __syncthreads();
    stage_bc<T, IT>(sB, sC, Bg, Cg, n0, nn, L, c * kFChunk, vec);
    __syncthreads();
#pragma unroll 1
    for (int r = 0; r < nn; ++r) {
      const int n = n0 + r;
      const float A2 = __ldg(Ad + n) * kLog2e;
      float av[IT], bv[IT];
      ldsv<IT>(sB + r * kFChunk, lane, bv);
      float H = 0.f;
#pragma unroll
      for (int j = 0; j < IT; ++j) {
        const int i = REV ? IT - 1 - j : j;
        av[i] = ex2(dt[i] * A2);
        bv[i] = dtu[i] * bv[i];
        H = fmaf(av[i], H, bv[i]);
      }
      float P = ex2(dsum * A2);
      warp_scan<REV>(P, H, lane);
      float Sn = S.get(n);
      float h = warp_apply<REV>(P, H, Sn, lane);
      S.set(n, Sn, lane);
      if (lane == mid_lane && mid_write) sv_mid[n] = h;
      float Cv[IT];
      ldsv<IT>(sC + r * kFChunk, lane, Cv);
#pragma unroll
      for (int j = 0; j < IT; ++j) {
        const int i = REV ? IT - 1 - j : j;
        h = fmaf(av[i], h, bv[i]);
        y[i] = fmaf(Cv[i], h, y[i]);
      }
    }
  }

  if (role == FIRST) {
    storev<float, IT>(a.ypart + roff, pos0, L, vec, y);
    return;
  }
  if (role == SECOND) {
    float p[IT];
    loadv<float, false>(a.ypart + roff, pos0, L, vec, p);
#pragma unroll
    for (int i = 0; i < IT; ++i) y[i] += p[i];
  }
  if (a.z) {
    float zv[IT];
    loadv<T>(reinterpret_cast<const T*>(a.z) + roff, pos0, L, vec, zv);
#pragma unroll
    for (int i = 0; i < IT; ++i) y[i] *= zv[i] * sigmoidf_(zv[i]);
  }
  storev<T, IT>(reinterpret_cast<T*>(a.y) + roff, pos0, L, vec, y);
}

template <typename T>
__global__ void __launch_bounds__(256, 2) scan_fwd_kernel(const KArgs a) {
  extern __shared__ __align__(16) float smem[];
  float* sB = smem;
  float* sC = smem + kNG * kFChunk;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t cpb = a.dim / a.W;  // channel blocks per batch row
  const int64_t b = blockIdx.x / cpb;
  const int64_t d = (blockIdx.x % cpb) * a.W + warp;
  const int g = (int)(((blockIdx.x % cpb) * a.W) / a.dpg);
  Carry S0{0.f, 0.f}, S1{0.f, 0.f};
  const int nc = (int)((a.L + kFChunk - 1) / kFChunk);
  for (int i = 0; i < nc; ++i) {
    if (a.ndirs == 1) {
      if (a.rev0) fwd_visit<T, true>(a, 0, nc - 1 - i, ONLY, S0, sB, sC, b, d, g, lane);
      else fwd_visit<T, false>(a, 0, i, ONLY, S0, sB, sC, b, d, g, lane);
    } else {
      fwd_visit<T, false>(a, 0, i, (2 * i > nc - 1) ? SECOND : FIRST, S0, sB, sC, b, d, g, lane);
      fwd_visit<T, true>(a, 1, nc - 1 - i, (2 * i >= nc - 1) ? SECOND : FIRST, S1, sB, sC, b, d,
                         g, lane);
    }
  }
}

// -------------------------------------------------------------- backward ---

// Per-warp accumulators of one direction over a round.
struct BwdAcc {
  Carry M;       // adjoint carry (mu entering the chunk from the scan's far side)
  float dD, dbias, cD, cb;  // sums and their Kahan compensations
};

__device__ __forceinline__ void kahan_add(float& sum, float& comp, float v) {
  const float y = v - comp;
  const float t = sum + y;
  comp = (t - sum) - y;
  sum = t;
}

// Shared memory of the backward kernel (floats):
//   sB, sC: kNG*256 each; red: 2 (double buffer) x W x 2 x 256;
//   dA: ndirs x W x N x 32, then as many Kahan compensations (L can be ~1e6).
template <typename T, bool REV>
__device__ __forceinline__ void bwd_visit(const KArgs& a, int k, int64_t c, int role, BwdAcc& acc,
                                          float* sB, float* sC, float* sred, float* sdA,
                                          int& rbuf, int64_t b, int64_t d, int g, int warp,
                                          int lane, int round, int kblk) {
  const DirArgs& dr = a.dir[k];
  const int64_t L = a.L;
  const int N = a.N;
  const int W = a.W;
  const int64_t row = b * a.dim + d;
  const int64_t roff = row * L;
  const int64_t pos0 = c * kChunk + lane * kItems;
  const bool vec = a.vec;
  const bool has_z = a.z != nullptr;

  Carry Sin;
  {
    const float* sv = a.saved + (((int64_t)k * a.batch * a.dim + row) * a.nc + c) * N;
    Sin.r0 = lane < N ? sv[lane] : 0.f;
    Sin.r1 = lane + 32 < N ? sv[lane + 32] : 0.f;
  }

  float dt[kItems], gg[kItems], dtu[kItems], y[kItems], s1[kItems], s2[kItems];
  const float bias = dr.bias ? __ldg(dr.bias + d) : 0.f;
  const float Dd = dr.D ? __ldg(dr.D + d) : 0.f;
  float dsum = 0.f;
  {
    float u[kItems], zv[kItems], dyv[kItems];
    load8<T>(reinterpret_cast<const T*>(dr.u) + roff, pos0, L, vec, u);
    load8<T>(reinterpret_cast<const T*>(dr.delta) + roff, pos0, L, vec, dt);
    load8<T>(reinterpret_cast<const T*>(a.dy) + roff, pos0, L, vec, dyv);
    if (has_z) load8<T>(reinterpret_cast<const T*>(a.z) + roff, pos0, L, vec, zv);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const bool in = pos0 + i < L;
      float x = dt[i] + bias;
      float v = a.softplus ? softplusf(x) : x;
      v = in ? v : 0.f;
      dt[i] = v;
      dtu[i] = v * u[i];
      y[i] = Dd * u[i];
      float gate = has_z ? zv[i] * sigmoidf_(zv[i]) : 1.f;
      gg[i] = in ? dyv[i] * gate : 0.f;
      s1[i] = 0.f;
      s2[i] = 0.f;
      dsum += v;
    }
  }
  const int64_t bcoff = ((b * a.G + g) * (int64_t)N) * L;
  const T* Bg = reinterpret_cast<const T*>(dr.B) + bcoff;
  const T* Cg = reinterpret_cast<const T*>(dr.C) + bcoff;
  const float* Ad = dr.A + d * N;
  float* sdAw = sdA + warp * N * 32;
  float* sdAc = sdAw + (int64_t)a.ndirs * a.W * N * 32;

  for (int n0 = 0; n0 < N; n0 += kNG) {
    const int nn = min(kNG, N - n0);
    __syncthreads();
    stage_bc<T, kItems>(sB, sC, Bg, Cg, n0, nn, L, c * kChunk, vec);
    __syncthreads();
    for (int r = 0; r < nn; ++r) {
      const int n = n0 + r;
      const float An = __ldg(Ad + n);
      const float A2 = An * kLog2e;
      float Bv[kItems], Cv[kItems], av[kItems], bv[kItems], ah[kItems];
      lds8(sB + r * kChunk, lane, Bv);
      lds8(sC + r * kChunk, lane, Cv);
      // Forward recomputation of the states.
      float H = 0.f;
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int i = REV ? kItems - 1 - j : j;
        av[i] = ex2(dt[i] * A2);
        bv[i] = dtu[i] * Bv[i];
        H = fmaf(av[i], H, bv[i]);
      }
      const float P0 = ex2(dsum * A2);
      float P = P0;
      warp_scan<REV>(P, H, lane);
      float Sn = Sin.get(n);
      float h = warp_apply<REV>(P, H, Sn, lane);
      float* red = sred + rbuf * (W * 2 * kChunk);
      {
        float dcv[kItems];
#pragma unroll
        for (int j = 0; j < kItems; ++j) {
          const int i = REV ? kItems - 1 - j : j;
          ah[i] = av[i] * h;  // a_l * h_{l-1}
          h = ah[i] + bv[i];
          if (has_z) y[i] = fmaf(Cv[i], h, y[i]);
          dcv[i] = gg[i] * h;
        }
        sts8(red + (warp * 2 + 1) * kChunk, lane, dcv);
      }
      float vv[kItems];
#pragma unroll
      for (int i = 0; i < kItems; ++i) vv[i] = gg[i] * Cv[i];
      // Adjoint: lambda_l = v_l + mu_{next}, mu_l = a_l * lambda_l, run against
      // the scan order.
      float Mloc = 0.f;
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int i = REV ? j : kItems - 1 - j;
        Mloc = av[i] * (vv[i] + Mloc);
      }
      P = P0;
      warp_scan<!REV>(P, Mloc, lane);
      float Mn = acc.M.get(n);
      float mu = warp_apply<!REV>(P, Mloc, Mn, lane);
      acc.M.set(n, Mn, lane);
      float dAacc = 0.f;
      float dbv[kItems];
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int i = REV ? j : kItems - 1 - j;
        const float lam = vv[i] + mu;
        mu = av[i] * lam;
        s1[i] = fmaf(lam, Bv[i], s1[i]);
        const float t = lam * ah[i];
        s2[i] = fmaf(An, t, s2[i]);
        dAacc = fmaf(dt[i], t, dAacc);
        dbv[i] = lam * dtu[i];
      }
      kahan_add(sdAw[n * 32 + lane], sdAc[n * 32 + lane], dAacc);
      // dB, dC: sum over the W channels of the block, then out.
      sts8(red + (warp * 2 + 0) * kChunk, lane, dbv);
      __syncthreads();
      {
        // Each task sums 4 consecutive positions over the W warps.
        const int nthr = W * 32;
        const int64_t per = a.batch * a.G * (int64_t)N * L;
        for (int e = threadIdx.x; e < 2 * kChunk / 4; e += nthr) {
          const int which = e / (kChunk / 4);
          const int e4 = e % (kChunk / 4);
          const int q = e4 >> 1, half = e4 & 1;  // positions q*8 + half*4 .. +3
          const int si = half * 128 + q * 4;
          float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
          for (int w = 0; w < W; ++w) {
            const float4 v = *reinterpret_cast<const float4*>(red + (w * 2 + which) * kChunk + si);
            sum.x += v.x; sum.y += v.y; sum.z += v.z; sum.w += v.w;
          }
          const int64_t pos = c * kChunk + q * 8 + half * 4;
          float* dst = which ? dr.dC : dr.dB;
          if (dst == nullptr || pos >= L) continue;
          const int64_t o = bcoff + (int64_t)n * L + pos;
          float* pp = a.det ? a.bc_part + (((int64_t)kblk * a.ndirs + k) * 2 + which) * per + o
                            : dst + o;
          if (a.vec4) {
            float4* p4 = reinterpret_cast<float4*>(pp);
            if (!a.det) {
              atomicAdd(p4, sum);
            } else if (round == 0) {
              *p4 = sum;
            } else {
              float4 old = *p4;
              old.x += sum.x; old.y += sum.y; old.z += sum.z; old.w += sum.w;
              *p4 = old;
            }
          } else {
            const float sv[4] = {sum.x, sum.y, sum.z, sum.w};
#pragma unroll
            for (int t = 0; t < 4; ++t) {
              if (pos + t >= L) break;
              if (!a.det) atomicAdd(pp + t, sv[t]);
              else if (round == 0) pp[t] = sv[t];
              else pp[t] += sv[t];
            }
          }
        }
      }
      rbuf ^= 1;
    }
  }

  float du[kItems], ddl[kItems];
  {
    float u[kItems], x[kItems];
    float vD = 0.f, vb = 0.f;
    load8<T>(reinterpret_cast<const T*>(dr.u) + roff, pos0, L, vec, u);
    load8<T>(reinterpret_cast<const T*>(dr.delta) + roff, pos0, L, vec, x);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const bool in = pos0 + i < L;
      du[i] = fmaf(dt[i], s1[i], Dd * gg[i]);
      float ddt = fmaf(u[i], s1[i], s2[i]);
      ddl[i] = a.softplus ? ddt * sigmoidf_(x[i] + bias) : ddt;
      if (in) {
        vD = fmaf(gg[i], u[i], vD);
        vb += ddl[i];
      }
    }
    // Compensated accumulation over the chunks (L can be ~1e6).
    kahan_add(acc.dD, acc.cD, vD);
    kahan_add(acc.dbias, acc.cb, vb);
  }
  if (dr.du) store8<T>(reinterpret_cast<T*>(dr.du) + roff, pos0, L, vec, du);
  if (dr.ddelta) store8<T>(reinterpret_cast<T*>(dr.ddelta) + roff, pos0, L, vec, ddl);
  if (has_z) {
    if (role == FIRST) {
      store8<float>(a.ypart + roff, pos0, L, vec, y);
    } else {
      if (role == SECOND) {
        float p[kItems];
        load8<float, false>(a.ypart + roff, pos0, L, vec, p);
#pragma unroll
        for (int i = 0; i < kItems; ++i) y[i] += p[i];
      }
      float zv[kItems], dyv[kItems];
      load8<T>(reinterpret_cast<const T*>(a.z) + roff, pos0, L, vec, zv);
      load8<T>(reinterpret_cast<const T*>(a.dy) + roff, pos0, L, vec, dyv);
      float dzv[kItems];
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const float s = sigmoidf_(zv[i]);
        dzv[i] = dyv[i] * y[i] * s * (1.f + zv[i] * (1.f - s));
      }
      if (a.dz) store8<T>(reinterpret_cast<T*>(a.dz) + roff, pos0, L, vec, dzv);
    }
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__global__ void __launch_bounds__(128, DIMSCAN_BWD_MINB) scan_bwd_kernel(const KArgs a) {
  extern __shared__ __align__(16) float smem[];
  const int W = a.W;
  const int N = a.N;
  float* sB = smem;
  float* sC = sB + kNG * kChunk;
  float* sred = sC + kNG * kChunk;
  float* sdA = sred + 2 * W * 2 * kChunk;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  // blockIdx.x = (b*G + g)*K + kblk
  const int kblk = blockIdx.x % a.K;
  const int64_t bg = blockIdx.x / a.K;
  const int g = (int)(bg % a.G);
  const int64_t b = bg / a.G;
  const int cbpg = a.dpg / W;
  const int nc = a.nc;
  int rbuf = 0;
  for (int round = 0; round < a.rounds; ++round) {
    const int cb = kblk + round * a.K;
    if (cb >= cbpg) break;  // uniform over the block
    const int64_t d = (int64_t)g * a.dpg + (int64_t)cb * W + warp;
    BwdAcc acc0{{0.f, 0.f}, 0.f, 0.f, 0.f, 0.f}, acc1{{0.f, 0.f}, 0.f, 0.f, 0.f, 0.f};
    float* sdA0 = sdA;
    float* sdA1 = sdA + W * N * 32;
    const int64_t comp = (int64_t)a.ndirs * W * N * 32;  // offset of the compensations
    for (int e = lane; e < N * 32; e += 32) {
      sdA0[warp * N * 32 + e] = 0.f;
      sdA0[comp + warp * N * 32 + e] = 0.f;
      if (a.ndirs == 2) {
        sdA1[warp * N * 32 + e] = 0.f;
        sdA1[comp + warp * N * 32 + e] = 0.f;
      }
    }
    __syncwarp();
    for (int i = 0; i < nc; ++i) {
      if (a.ndirs == 1) {
        if (a.rev0)
          bwd_visit<T, true>(a, 0, i, ONLY, acc0, sB, sC, sred, sdA0, rbuf, b, d, g, warp, lane,
                             round, kblk);
        else
          bwd_visit<T, false>(a, 0, nc - 1 - i, ONLY, acc0, sB, sC, sred, sdA0, rbuf, b, d, g,
                              warp, lane, round, kblk);
      } else {
        bwd_visit<T, false>(a, 0, nc - 1 - i, (2 * i > nc - 1) ? SECOND : FIRST, acc0, sB, sC,
                            sred, sdA0, rbuf, b, d, g, warp, lane, round, kblk);
        bwd_visit<T, true>(a, 1, i, (2 * i >= nc - 1) ? SECOND : FIRST, acc1, sB, sC, sred, sdA1,
                           rbuf, b, d, g, warp, lane, round, kblk);
      }
    }
    __syncwarp();
    // Per-channel partials: red_part[k][b][d][0..N-1] = dA, [N] = dD, [N+1] = dbias.
    auto flush = [&](int k, const BwdAcc& acc, const float* sdk) {
      const float* sd = sdk + warp * N * 32;
      float* outp = a.red_part + (((int64_t)k * a.batch + b) * a.dim + d) * (N + 2);
      for (int n = 0; n < N; ++n) {
        float v = warp_sum(sd[n * 32 + lane]);
        if (lane == 0) outp[n] = v;
      }
      float vD = warp_sum(acc.dD), vb = warp_sum(acc.dbias);
      if (lane == 0) {
        outp[N] = vD;
        outp[N + 1] = vb;
      }
    };
    flush(0, acc0, sdA0);
    if (a.ndirs == 2) flush(1, acc1, sdA1);
    __syncwarp();
  }
}

// Host-side launchers, one pair per dtype, defined in scan_<dtype>.cu.
int launch_fwd_f32(const KArgs& a, size_t smem, cudaStream_t s);
int launch_bwd_f32(const KArgs& a, size_t smem, cudaStream_t s);
int launch_fwd_bf16(const KArgs& a, size_t smem, cudaStream_t s);
int launch_bwd_bf16(const KArgs& a, size_t smem, cudaStream_t s);
int launch_fwd_f16(const KArgs& a, size_t smem, cudaStream_t s);
int launch_bwd_f16(const KArgs& a, size_t smem, cudaStream_t s);

template <typename T>
int launch_fwd_impl(const KArgs& a, size_t smem, cudaStream_t s) {
  cudaError_t e = cudaFuncSetAttribute(scan_fwd_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       (int)smem);
  if (e != cudaSuccess) return (int)e;
  const int64_t blocks = a.batch * (a.dim / a.W);
  scan_fwd_kernel<T><<<(unsigned)blocks, a.W * 32, smem, s>>>(a);
  return (int)cudaGetLastError();
}

template <typename T>
int launch_bwd_impl(const KArgs& a, size_t smem, cudaStream_t s) {
  cudaError_t e = cudaFuncSetAttribute(scan_bwd_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       (int)smem);
  if (e != cudaSuccess) return (int)e;
  const int64_t blocks = a.batch * a.G * a.K;
  scan_bwd_kernel<T><<<(unsigned)blocks, a.W * 32, smem, s>>>(a);
  return (int)cudaGetLastError();
}

}  // namespace dimscan

#include "scan_fwd2.cuh"

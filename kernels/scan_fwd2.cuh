// Forward kernel, "thread per (channel, state)" design (see docs/kernels.md).
//
// A thread owns one channel d and one state index n (two, n and n + 32, when
// N > 32) and walks L sequentially, so the recurrence needs no cross-thread
// scan: per (l, n) it does one ex2, two multiplies, one FMA and the C * h
// product. NL lanes (16 or 32) share a channel; y_l = sum_n C h is reduced
// through shared memory once per chunk of kTC positions. Per chunk the block
// stages dt = softplus(delta + bias), dt * u, D * u of its channels and B, C
// of their group in shared memory (double buffered; the next chunk's global
// loads are issued into registers before the current chunk is computed).
// Two directions run in lockstep (chunk i forward, chunk nc-1-i reverse); the
// direction that reaches a position first leaves its partial y in `ypart`
// (f32), the second adds it, gates by silu(z) and writes y.
#pragma once

#include "scan_impl.cuh"

namespace dimscan {

constexpr int kTC = 64;          // positions per chunk
constexpr int kTCP = kTC + 4;    // padded row of B / C
constexpr int kTR = 32;          // positions per reduction step
constexpr int kTRP = kTR + 4;    // padded row of the reduce buffer
constexpr int kF2Threads = 128;  // 4 warps
#ifndef DIMSCAN_FWD2_MINB
#define DIMSCAN_FWD2_MINB 4
#endif

template <int NL, int NPT>
struct F2Cfg {
  static constexpr int kCPW = 32 / NL;            // channels per warp
  static constexpr int kCPB = 4 * kCPW;           // channels per block
  static constexpr int kNN = NL * NPT;            // staged state rows
  static constexpr int kQuadsCh = kCPB * kTC / 4;  // u / delta quads per chunk
  static constexpr int kQuadsBC = kNN * kTC / 4;   // B or C quads per chunk
  static constexpr int kQB = (kQuadsBC + kF2Threads - 1) / kF2Threads;
  // floats of one direction's staging buffer
  static constexpr int kBuf = 3 * kCPB * kTC + 2 * kNN * kTCP;
  // reduce buffer: [kCPB][NL][kTRP]
  static constexpr int kRed = kCPB * NL * kTRP;
  static constexpr int kRL = kTR / NL;  // positions per lane in one reduction step
  // raw (dtype) elements of one direction's chunk: u, delta [kCPB][kTC], B, C [kNN][kTC]
  static constexpr int kRaw = 2 * kCPB * kTC + 2 * kNN * kTC;
  // cp.async pipeline depth (chunks in flight)
  static constexpr int kStages = kNN <= 16 ? 3 : 2;
};

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int NPEND>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(NPEND));
}
// Copies 4 items (8 or 16 bytes) global -> shared; zero-fills when !valid.
template <typename T>
__device__ __forceinline__ void cp_quad(T* sdst, const T* gsrc, bool valid) {
  const unsigned sa = (unsigned)__cvta_generic_to_shared(sdst);
  const int n = valid ? 4 * (int)sizeof(T) : 0;
  if constexpr (sizeof(T) == 4) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sa), "l"(gsrc), "r"(n));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(sa), "l"(gsrc), "r"(n));
  }
}
// Synchronous fallback (unaligned rows): 4 items with bounds.
template <typename T>
__device__ __forceinline__ void copy_quad_sync(T* sdst, const T* grow, int64_t pos, int64_t L,
                                               bool rowok) {
#pragma unroll
  for (int i = 0; i < 4; ++i) sdst[i] = (rowok && pos + i < L) ? grow[pos + i] : from_f<T>(0.f);
}

// 4 consecutive items (positions >= L read 0).
template <typename T>
__device__ __forceinline__ float4 loadq(const T* __restrict__ p, int64_t pos, int64_t L, bool vec) {
  if (vec && pos < L) {
    if constexpr (sizeof(T) == 4) {
      return __ldg(reinterpret_cast<const float4*>(p + pos));
    } else {
      uint2 v = __ldg(reinterpret_cast<const uint2*>(p + pos));
      const T* e = reinterpret_cast<const T*>(&v);
      return make_float4(to_f(e[0]), to_f(e[1]), to_f(e[2]), to_f(e[3]));
    }
  }
  float r[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) r[i] = (pos + i < L) ? to_f(p[pos + i]) : 0.f;
  return make_float4(r[0], r[1], r[2], r[3]);
}

// Issues the global -> shared copies of one direction's chunk (positions
// p0 .. p0+kTC-1) into a raw slot: u, delta [kCPB][kTC], B, C [kNN][kTC].
template <typename T, int NL, int NPT>
__device__ __forceinline__ void f2_fetch(const KArgs& a, int k, int64_t p0, int64_t b, int64_t d0,
                                         int g, T* raw) {
  using Cfg = F2Cfg<NL, NPT>;
  const DirArgs& dr = a.dir[k];
  const int t = threadIdx.x;
  const int64_t L = a.L;
  const bool vec = a.vec;
  T* rU = raw;
  T* rD = rU + Cfg::kCPB * kTC;
  T* rB = rD + Cfg::kCPB * kTC;
  T* rC = rB + Cfg::kNN * kTC;
  if (t < Cfg::kQuadsCh) {
    const int ch = t / (kTC / 4), q = t % (kTC / 4);
    const int64_t off = (b * a.dim + d0 + ch) * L;
    const int64_t pos = p0 + 4 * q;
    const T* gu = reinterpret_cast<const T*>(dr.u) + off;
    const T* gd = reinterpret_cast<const T*>(dr.delta) + off;
    if (vec) {
      const bool ok = pos < L;
      cp_quad<T>(rU + ch * kTC + 4 * q, ok ? gu + pos : gu, ok);
      cp_quad<T>(rD + ch * kTC + 4 * q, ok ? gd + pos : gd, ok);
    } else {
      copy_quad_sync<T>(rU + ch * kTC + 4 * q, gu, pos, L, true);
      copy_quad_sync<T>(rD + ch * kTC + 4 * q, gd, pos, L, true);
    }
  }
  const int64_t bcoff = ((b * a.G + g) * (int64_t)a.N) * L;
  const T* gB = reinterpret_cast<const T*>(dr.B) + bcoff;
  const T* gC = reinterpret_cast<const T*>(dr.C) + bcoff;
#pragma unroll
  for (int m = 0; m < Cfg::kQB; ++m) {
    const int e = t + m * kF2Threads;
    if (e < Cfg::kQuadsBC) {
      const int row = e / (kTC / 4), q = e % (kTC / 4);
      const int64_t pos = p0 + 4 * q;
      const bool rowok = row < a.N;
      const int64_t o = (int64_t)(rowok ? row : 0) * L;
      if (vec) {
        const bool ok = rowok && pos < L;
        cp_quad<T>(rB + row * kTC + 4 * q, ok ? gB + o + pos : gB, ok);
        cp_quad<T>(rC + row * kTC + 4 * q, ok ? gC + o + pos : gC, ok);
      } else {
        copy_quad_sync<T>(rB + row * kTC + 4 * q, gB + o, pos, L, rowok);
        copy_quad_sync<T>(rC + row * kTC + 4 * q, gC + o, pos, L, rowok);
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ float4 lds_quad(const T* p) {
  if constexpr (sizeof(T) == 4) {
    return *reinterpret_cast<const float4*>(p);
  } else {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    const T* e = reinterpret_cast<const T*>(&v);
    return make_float4(to_f(e[0]), to_f(e[1]), to_f(e[2]), to_f(e[3]));
  }
}

// Raw slot -> f32 working buffer: sDT, sDU, sSK ([kCPB][kTC]), sB, sC ([kNN][kTCP]).
template <typename T, int NL, int NPT>
__device__ __forceinline__ void f2_stage(const KArgs& a, int k, int64_t p0, int64_t d0,
                                         const T* raw, float* buf) {
  using Cfg = F2Cfg<NL, NPT>;
  const DirArgs& dr = a.dir[k];
  const int t = threadIdx.x;
  const T* rU = raw;
  const T* rD = rU + Cfg::kCPB * kTC;
  const T* rB = rD + Cfg::kCPB * kTC;
  const T* rC = rB + Cfg::kNN * kTC;
  float* sDT = buf;
  float* sDU = sDT + Cfg::kCPB * kTC;
  float* sSK = sDU + Cfg::kCPB * kTC;
  float* sB = sSK + Cfg::kCPB * kTC;
  float* sC = sB + Cfg::kNN * kTCP;
  if (t < Cfg::kQuadsCh) {
    const int ch = t / (kTC / 4), q = t % (kTC / 4);
    const float bias = dr.bias ? __ldg(dr.bias + d0 + ch) : 0.f;
    const float Dd = dr.D ? __ldg(dr.D + d0 + ch) : 0.f;
    const float4 u4 = lds_quad<T>(rU + ch * kTC + 4 * q);
    const float4 d4 = lds_quad<T>(rD + ch * kTC + 4 * q);
    const float uu[4] = {u4.x, u4.y, u4.z, u4.w};
    const float dd[4] = {d4.x, d4.y, d4.z, d4.w};
    float dt[4], du[4], sk[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float x = dd[i] + bias;
      float v = a.softplus ? softplusf(x) : x;
      v = (p0 + 4 * q + i < a.L) ? v : 0.f;
      dt[i] = v;
      du[i] = v * uu[i];
      sk[i] = Dd * uu[i];
    }
    const int o = ch * kTC + 4 * q;
    *reinterpret_cast<float4*>(sDT + o) = make_float4(dt[0], dt[1], dt[2], dt[3]);
    *reinterpret_cast<float4*>(sDU + o) = make_float4(du[0], du[1], du[2], du[3]);
    *reinterpret_cast<float4*>(sSK + o) = make_float4(sk[0], sk[1], sk[2], sk[3]);
  }
#pragma unroll
  for (int m = 0; m < Cfg::kQB; ++m) {
    const int e = t + m * kF2Threads;
    if (e < Cfg::kQuadsBC) {
      const int row = e / (kTC / 4), q = e % (kTC / 4);
      *reinterpret_cast<float4*>(sB + row * kTCP + 4 * q) = lds_quad<T>(rB + row * kTC + 4 * q);
      *reinterpret_cast<float4*>(sC + row * kTCP + 4 * q) = lds_quad<T>(rC + row * kTC + 4 * q);
    }
  }
}

// One direction's chunk: the recurrence of this thread's (channel, n) over kTC
// positions, then the per-warp reduction over n and the output.
template <typename T, int NL, int NPT, bool REV>
__device__ __forceinline__ void f2_compute(const KArgs& a, int k, int64_t j, int64_t ncT, int role,
                                           const float* buf, float* sred, float (&h)[NPT],
                                           const float (&A2)[NPT], int64_t b, int64_t d0) {
  using Cfg = F2Cfg<NL, NPT>;
  const int t = threadIdx.x;
  const int warp = t >> 5, lane = t & 31;
  const int chw = lane / NL;                 // channel within warp
  const int ch = warp * Cfg::kCPW + chw;     // channel within block
  const int nl = lane % NL;
  const int64_t L = a.L;
  const int N = a.N;
  const int64_t p0 = j * kTC;
  const int64_t row = b * a.dim + d0 + ch;
  const float* sDT = buf;
  const float* sDU = sDT + Cfg::kCPB * kTC;
  const float* sSK = sDU + Cfg::kCPB * kTC;
  const float* sB = sSK + Cfg::kCPB * kTC;
  const float* sC = sB + Cfg::kNN * kTCP;

  // Saved state entering each 256-chunk (in scan order), for the backward.
  {
    constexpr int kPer = kChunk / kTC;
    const bool first = REV ? ((j % kPer) == kPer - 1 || j == ncT - 1) : (j % kPer) == 0;
    if (first) {
      float* sv = a.saved + (((int64_t)k * a.batch * a.dim + row) * a.nc + j / kPer) * N;
#pragma unroll
      for (int m = 0; m < NPT; ++m)
        if (nl + 32 * m < N) sv[nl + 32 * m] = h[m];
    }
  }
  // Early loads for the output stage (latency hidden behind the recurrence).
  constexpr int RL = Cfg::kRL;
  constexpr int NH = kTC / kTR;  // reduction steps per chunk
  float zq[NH][RL], pq[NH][RL];
  const bool out_stage = role != FIRST;
#pragma unroll
  for (int hh = 0; hh < NH; ++hh) {
    const int64_t q0 = p0 + hh * kTR + nl * RL;
#pragma unroll
    for (int i = 0; i < RL; ++i) {
      zq[hh][i] = 1.f;
      pq[hh][i] = 0.f;
      if (out_stage && a.z && q0 + i < L)
        zq[hh][i] = to_f(reinterpret_cast<const T*>(a.z)[row * L + q0 + i]);
      if (role == SECOND && q0 + i < L) pq[hh][i] = a.ypart[row * L + q0 + i];
    }
  }

  float* sY = sred + (ch * NL) * kTRP;  // [NL][kTRP] of this channel
  const float* dtrow = sDT + ch * kTC;
  const float* durow = sDU + ch * kTC;
#pragma unroll
  for (int hs = 0; hs < NH; ++hs) {
    const int hh = REV ? NH - 1 - hs : hs;
#pragma unroll 2
    for (int s = 0; s < kTR / 4; ++s) {
      const int l4r = REV ? kTR / 4 - 1 - s : s;  // quad within the reduction step
      const int l4 = hh * (kTR / 4) + l4r;
      const float4 dt4 = *reinterpret_cast<const float4*>(dtrow + 4 * l4);
      const float4 du4 = *reinterpret_cast<const float4*>(durow + 4 * l4);
      const float dtv[4] = {dt4.x, dt4.y, dt4.z, dt4.w};
      const float duv[4] = {du4.x, du4.y, du4.z, du4.w};
      float yv[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int m = 0; m < NPT; ++m) {
        const int nr = nl + 32 * m;
        const float4 B4 = *reinterpret_cast<const float4*>(sB + nr * kTCP + 4 * l4);
        const float4 C4 = *reinterpret_cast<const float4*>(sC + nr * kTCP + 4 * l4);
        const float Bv[4] = {B4.x, B4.y, B4.z, B4.w};
        const float Cv[4] = {C4.x, C4.y, C4.z, C4.w};
        float av[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = ex2(dtv[i] * A2[m]);
#pragma unroll
        for (int ii = 0; ii < 4; ++ii) {
          const int i = REV ? 3 - ii : ii;
          h[m] = fmaf(av[i], h[m], duv[i] * Bv[i]);
          yv[i] = fmaf(Cv[i], h[m], yv[i]);
        }
      }
      *reinterpret_cast<float4*>(sY + nl * kTRP + 4 * l4r) = make_float4(yv[0], yv[1], yv[2], yv[3]);
    }
    __syncwarp();
    // Reduction over n: lane nl of the channel sums positions nl*RL .. +RL-1 of this step.
    const int64_t q0 = p0 + hh * kTR + nl * RL;
    float y[RL];
#pragma unroll
    for (int i = 0; i < RL; ++i) y[i] = sSK[ch * kTC + hh * kTR + nl * RL + i];
#pragma unroll 4
    for (int r = 0; r < NL; ++r) {
      if constexpr (RL == 2) {
        const float2 v = *reinterpret_cast<const float2*>(sY + r * kTRP + nl * 2);
        y[0] += v.x;
        y[1] += v.y;
      } else {
#pragma unroll
        for (int i = 0; i < RL; ++i) y[i] += sY[r * kTRP + nl * RL + i];
      }
    }
    __syncwarp();
    if (role == FIRST) {
#pragma unroll
      for (int i = 0; i < RL; ++i)
        if (q0 + i < L) a.ypart[row * L + q0 + i] = y[i];
    } else {
#pragma unroll
      for (int i = 0; i < RL; ++i) {
        float v = y[i] + pq[hh][i];
        if (a.z) v *= zq[hh][i] * sigmoidf_(zq[hh][i]);
        if (q0 + i < L) reinterpret_cast<T*>(a.y)[row * L + q0 + i] = from_f<T>(v);
      }
    }
  }
}

template <typename T, int NL, int NPT>
__global__ void __launch_bounds__(kF2Threads, DIMSCAN_FWD2_MINB) scan_fwd2_kernel(const KArgs a) {
  using Cfg = F2Cfg<NL, NPT>;
  constexpr int S = Cfg::kStages;
  extern __shared__ __align__(16) float smem[];
  // [ndirs][kBuf] f32 working buffers, [kRed] reduce buffer, then the raw
  // ring: [S][ndirs][kRaw] items of T.
  float* sred = smem + a.ndirs * Cfg::kBuf;
  T* ring = reinterpret_cast<T*>(sred + Cfg::kRed);
  const int t = threadIdx.x;
  const int lane = t & 31, warp = t >> 5;
  const int64_t cpb = a.dim / Cfg::kCPB;
  const int64_t b = blockIdx.x / cpb;
  const int64_t d0 = (blockIdx.x % cpb) * Cfg::kCPB;
  const int g = (int)(d0 / a.dpg);
  const int ch = warp * Cfg::kCPW + lane / NL;
  const int nl = lane % NL;
  const int64_t ncT = (a.L + kTC - 1) / kTC;

  float A2[2][NPT], h[2][NPT];
#pragma unroll
  for (int k = 0; k < 2; ++k) {
#pragma unroll
    for (int m = 0; m < NPT; ++m) {
      const int n = nl + 32 * m;
      A2[k][m] = (k < a.ndirs && n < a.N) ? __ldg(a.dir[k].A + (d0 + ch) * a.N + n) * kLog2e : 0.f;
      h[k][m] = 0.f;
    }
  }
  const bool rev0 = a.ndirs == 1 && a.rev0;
  auto chunk_of = [&](int k, int64_t i) -> int64_t {
    const bool rev = a.ndirs == 2 ? k == 1 : rev0;
    return rev ? ncT - 1 - i : i;
  };
  auto slot = [&](int64_t i, int k) -> T* {
    return ring + ((int)(i % S) * a.ndirs + k) * Cfg::kRaw;
  };
  auto fetch = [&](int64_t i) {
    if (i < ncT) {
      f2_fetch<T, NL, NPT>(a, 0, chunk_of(0, i) * kTC, b, d0, g, slot(i, 0));
      if (a.ndirs == 2) f2_fetch<T, NL, NPT>(a, 1, chunk_of(1, i) * kTC, b, d0, g, slot(i, 1));
    }
    cp_async_commit();
  };
#pragma unroll 1
  for (int s0 = 0; s0 < S - 1; ++s0) fetch(s0);
  float* buf0 = smem;
  float* buf1 = smem + Cfg::kBuf;
  for (int64_t i = 0; i < ncT; ++i) {
    cp_async_wait<S - 2>();
    __syncthreads();
    fetch(i + S - 1);
    f2_stage<T, NL, NPT>(a, 0, chunk_of(0, i) * kTC, d0, slot(i, 0), buf0);
    if (a.ndirs == 2) f2_stage<T, NL, NPT>(a, 1, chunk_of(1, i) * kTC, d0, slot(i, 1), buf1);
    __syncthreads();
    if (a.ndirs == 1) {
      if (rev0)
        f2_compute<T, NL, NPT, true>(a, 0, ncT - 1 - i, ncT, ONLY, buf0, sred, h[0], A2[0], b, d0);
      else
        f2_compute<T, NL, NPT, false>(a, 0, i, ncT, ONLY, buf0, sred, h[0], A2[0], b, d0);
    } else {
      f2_compute<T, NL, NPT, false>(a, 0, i, ncT, (2 * i > ncT - 1) ? SECOND : FIRST, buf0, sred,
                                    h[0], A2[0], b, d0);
      f2_compute<T, NL, NPT, true>(a, 1, ncT - 1 - i, ncT, (2 * i >= ncT - 1) ? SECOND : FIRST,
                                   buf1, sred, h[1], A2[1], b, d0);
    }
  }
  cp_async_wait<0>();
}

template <typename T, int NL, int NPT>
size_t fwd2_smem(const KArgs& a) {
  using Cfg = F2Cfg<NL, NPT>;
  return (size_t)(a.ndirs * Cfg::kBuf + Cfg::kRed) * sizeof(float) +
         (size_t)Cfg::kStages * a.ndirs * Cfg::kRaw * sizeof(T);
}

template <typename T, int NL, int NPT>
int launch_fwd2_cfg(const KArgs& a, cudaStream_t s) {
  using Cfg = F2Cfg<NL, NPT>;
  const size_t smem = fwd2_smem<T, NL, NPT>(a);
  cudaError_t e = cudaFuncSetAttribute(scan_fwd2_kernel<T, NL, NPT>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (e != cudaSuccess) return (int)e;
  const int64_t blocks = a.batch * (a.dim / Cfg::kCPB);
  scan_fwd2_kernel<T, NL, NPT><<<(unsigned)blocks, kF2Threads, smem, s>>>(a);
  return (int)cudaGetLastError();
}

// Chooses the forward: the warp-per-channel kernel (scan_impl.cuh) for the
// fused bidirectional pass at L > 512; else this one with NL = 16 lanes a
// channel when N <= 16 and 8 channels of a block share a group, else 32 (with
// 2 states a thread when N > 32); the warp-per-channel kernel also when no
// variant fits (dim / ngroups not a multiple of 4, or too much shared memory).
extern int g_fwd_variant;  // 0: auto, 1: warp-per-channel forward, 2: fwd2 (harness knob)

template <typename T>
int launch_fwd2(const KArgs& a, size_t smem_old, cudaStream_t s) {
  if (g_fwd_variant == 1) return launch_fwd_impl<T>(a, smem_old, s);
  // Measured on H100 (docs/kernels.md): the fused bidirectional pass is faster
  // with the warp-per-channel kernel once L spans more than one 512-chunk.
  if (g_fwd_variant == 0 && a.ndirs == 2 && a.L > 512) return launch_fwd_impl<T>(a, smem_old, s);
  constexpr size_t kMaxSmem = 220 * 1024;
  if (a.N <= 16 && a.dpg % 8 == 0 && fwd2_smem<T, 16, 1>(a) <= kMaxSmem)
    return launch_fwd2_cfg<T, 16, 1>(a, s);
  if (a.N <= 32 && a.dpg % 4 == 0 && fwd2_smem<T, 32, 1>(a) <= kMaxSmem)
    return launch_fwd2_cfg<T, 32, 1>(a, s);
  if (a.N <= 64 && a.dpg % 4 == 0 && fwd2_smem<T, 32, 2>(a) <= kMaxSmem)
    return launch_fwd2_cfg<T, 32, 2>(a, s);
  return launch_fwd_impl<T>(a, smem_old, s);
}

}  // namespace dimscan

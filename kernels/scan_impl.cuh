// Selective-scan CUDA kernels: forward and backward, one direction or fused
// bidirectional. The math is in selective_scan.h and docs/scan.md, the design
// and what bounds each kernel in docs/kernels.md. scan_f32.cu / scan_bf16.cu /
// scan_f16.cu instantiate these templates for one dtype each; scan_api.cu holds
// the C ABI (sizes, checks, launches).
//
// Work decomposition (forward and backward alike): a thread owns one channel d
// and NT state indices (4; 2 in the forward when batch x dim is too small to
// fill the card), and walks L sequentially, so the recurrence needs no
// cross-thread scan. LPC = N / NT (rounded up to a power of two) lanes share a
// channel. A block holds CH channels of one (batch, group) and, in the fused
// forward, both directions. L is visited in chunks of kT positions: per chunk
// the block stages u, delta (, dy, z, y) of its channels and B, C of their
// group into shared memory with cp.async (the next chunk's copy is issued as
// soon as this one is converted), and converts them once to f32 tiles in
// *scan order* (a reverse direction's tile is stored mirrored), so the inner
// loop is the same for both directions:
//   per (l, n): dA = ex2(dt*A*log2e); h = dA*h + (dt*u)*B; y += C*h
// which is one MUFU op and four FMA-pipe ops. The per-position work
// (softplus, the gate, loads and stores) is done by the same threads, each on
// whole quads of positions of its own channel.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "selective_scan.h"

namespace dimscan {

constexpr int kT = 32;          // positions per chunk (staging unit, checkpoint interval)
constexpr int kTP = kT + 4;     // f32 tile row: 16-byte rows, 4-bank shift per channel
constexpr int kQuads = kT / 4;  // quads of positions per chunk
constexpr int kNT = 4;          // states per thread (backward; forward default)
constexpr int kFwdMaxStages = 3;  // forward: raw chunk buffers (small grids: copy i+2 while i computes)
constexpr int kS = 4;           // backward: positions per register sub-chunk (one float4)
constexpr int kNSub = kT / kS;  // backward sub-chunks per chunk
constexpr int kMaxN = 64;
constexpr int kThreadsFwd = 256;  // forward block size (both directions)
constexpr int kThreadsBwd = 128;  // backward block size (one direction)
// Resident blocks an SM the register allocation must allow (shared memory
// allows as many at the common sizes). Stated explicitly: built as relocatable
// device code (cc compiles several .cu files with --device-c) ptxas otherwise
// gives the forward 113 and the backward 205 registers, one block an SM fewer
// each, and both run 15-50% slower than built whole (measured on an H200).
constexpr int kMinBlocksFwd = 4;
constexpr int kMinBlocksBwd = 3;
// The small-grid forward (NT = 2: under 8 warps an SM) has no occupancy to
// keep, and at 4 blocks (64 registers) it spills: 2 blocks give it 128, and
// 1 x 2304 x 16384 runs 1.36x faster (H200, kernels/harness/sweep.sh; 1 block
// is no faster, and 2 blocks in the backward slow the large grids by 28%).
constexpr int kMinBlocksFwdSmall = 2;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------- params ---

struct DirArgs {
  const void* u;
  const void* delta;
  const float* A;
  const void* B;
  const void* C;
  const float* D;
  const float* bias;
  int64_t u_bs, delta_bs, B_bs, C_bs;  // batch strides (elements)
  // backward outputs
  void* du;
  void* ddelta;
  float* dB;
  float* dC;
};

struct KArgs {
  int64_t batch, dim, L;
  int N, G, dpg, CH, nc, ndirs, softplus, vec, rev0, det;
  int fstages;  // forward: raw chunk buffers, 1 (copy i+1 after converting i) or 3
  DirArgs dir[2];
  const void* z;
  int64_t z_bs;
  void* y;
  const void* dy;
  void* dz;
  float* states;    // [ndirs][batch*dim][nc][N]: state entering each chunk in scan order, or null
  void* ypre;       // [batch*dim][L] dtype: y before the gate (for dz), or null
  float* ypart;     // [batch*dim][L] f32: first direction's partial y (fused forward)
  float* red_part;  // backward: [ndirs][batch][dim][N+2] per-channel dA | dD | dbias
  float* bc_part;   // deterministic backward: [dim/CH][ndirs][2][batch][G][N][L]
};

// Shared-memory carve of both kernels (floats and raw elements), computed
// identically on host and device. Raw rows are padded to 16 bytes past kT.
template <typename T>
struct Smem {
  static constexpr int kRawRow = kT + 16 / (int)sizeof(T);
  // forward, per direction: f32 dt, dtu, y [CH][kTP]; B, C [kT][NP]; `stages` x
  // raw u, delta [CH], B, C [N]
  __host__ __device__ static size_t fwd_f32(int CH, int NP) {
    return (size_t)3 * CH * kTP + (size_t)2 * kT * NP;
  }
  __host__ __device__ static size_t fwd_raw(int CH, int N) { return (size_t)(2 * CH + 2 * N) * kRawRow; }
  __host__ __device__ static size_t fwd_bytes(int nd, int CH, int N, int NP, int stages) {
    return nd * (fwd_f32(CH, NP) * 4 + stages * fwd_raw(CH, N) * sizeof(T));
  }
  // backward: f32 dt, dtu, g, u, sigmoid(x) [CH][kTP]; B, C [kT][NP]; dB / dC
  // contributions [2][NP][CH][kS]; sub-chunk entry states [kNSub][CH*LPC][4];
  // raw u, delta, dy, z, y [CH], B, C [N]
  __host__ __device__ static size_t bwd_f32(int CH, int NP) {
    return (size_t)5 * CH * kTP + (size_t)2 * kT * NP + (size_t)2 * NP * CH * kS +
           (size_t)kNSub * CH * NP;
  }
  __host__ __device__ static size_t bwd_raw(int CH, int N) { return (size_t)(5 * CH + 2 * N) * kRawRow; }
  __host__ __device__ static size_t bwd_bytes(int CH, int N, int NP) {
    return bwd_f32(CH, NP) * 4 + bwd_raw(CH, N) * sizeof(T);
  }
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

__device__ __forceinline__ float lg2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// softplus(x) = log(1 + e^x) with two MUFU ops: where e^x < 1/8 a series
// (accurate where the result is tiny: dt can be ~1e-4), else lg2(1 + e^x);
// x > 20 gives x. Also returns sigmoid(x) = e^x / (1 + e^x), its derivative.
__device__ __forceinline__ float softplus_sig(float x, float& sig) {
  const float t = ex2(x * kLog2e);
  float p = -1.f / 8.f;
  p = fmaf(p, t, 1.f / 7.f);
  p = fmaf(p, t, -1.f / 6.f);
  p = fmaf(p, t, 1.f / 5.f);
  p = fmaf(p, t, -1.f / 4.f);
  p = fmaf(p, t, 1.f / 3.f);
  p = fmaf(p, t, -1.f / 2.f);
  p = fmaf(p, t, 1.f);
  const float u = 1.f + t;
  // Both branches, then a select: a data-dependent branch would diverge.
  const float lg = lg2(u) * kLn2;
  const float r = t < 0.125f ? p * t : lg;
  sig = x > 20.f ? 1.f : __fdividef(t, u);
  return x > 20.f ? x : r;
}
__device__ __forceinline__ float softplusf(float x) {
  float s;
  return softplus_sig(x, s);
}
__device__ __forceinline__ float sigmoidf_(float x) { return __fdividef(1.f, 1.f + __expf(-x)); }

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int NPEND>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(NPEND));
}

// Copies row r = 0..rows-1 of kT elements (positions pos0 .. pos0+kT-1 of the
// global row gbase + r*gstride) into sdst + r*Smem::kRawRow; positions >= L
// and rows >= valid_rows read 0. vec: rows and pos0 are 16-byte aligned and
// L is a multiple of 16 bytes, so cp.async moves whole 16-byte units.
template <typename T>
__device__ __forceinline__ void stage_rows(T* sdst, const T* gbase, int64_t gstride, int rows,
                                           int valid_rows, int64_t pos0, int64_t L, bool vec) {
  constexpr int R = Smem<T>::kRawRow;
  if (vec) {
    constexpr int E = 16 / (int)sizeof(T);  // elements per unit
    constexpr int U = kT / E;                // units per row
    for (int t = threadIdx.x; t < rows * U; t += blockDim.x) {
      const int r = t / U, q = t % U;
      const int64_t pos = pos0 + (int64_t)q * E;
      const bool ok = r < valid_rows && pos < L;
      const T* src = ok ? gbase + r * gstride + pos : gbase;
      const unsigned sa = (unsigned)__cvta_generic_to_shared(sdst + r * R + q * E);
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sa), "l"(src),
                   "r"(ok ? 16 : 0));
    }
  } else {
    for (int t = threadIdx.x; t < rows * kT; t += blockDim.x) {
      const int r = t / kT, q = t % kT;
      const int64_t pos = pos0 + q;
      sdst[r * R + q] = (r < valid_rows && pos < L) ? gbase[r * gstride + pos] : from_f<T>(0.f);
    }
  }
}

// Four consecutive elements at p (aligned when vec) to f32 / from f32.
template <typename T>
__device__ __forceinline__ void ld4(const T* p, bool vec, int n, float (&v)[4]) {
  if (vec && n == 4) {
    if constexpr (sizeof(T) == 4) {
      const float4 q = *reinterpret_cast<const float4*>(p);
      v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
    } else {
      const uint2 q = *reinterpret_cast<const uint2*>(p);
      const T* e = reinterpret_cast<const T*>(&q);
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = to_f(e[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = i < n ? to_f(p[i]) : 0.f;
  }
}
template <typename T>
__device__ __forceinline__ void st4(T* p, bool vec, int n, const float (&v)[4]) {
  if (vec && n == 4) {
    if constexpr (sizeof(T) == 4) {
      *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
      uint2 q;
      T* e = reinterpret_cast<T*>(&q);
#pragma unroll
      for (int i = 0; i < 4; ++i) e[i] = from_f<T>(v[i]);
      *reinterpret_cast<uint2*>(p) = q;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (i < n) p[i] = from_f<T>(v[i]);
  }
}

// The lanes of a direction's threads: thread t owns channel ch and state lane
// sl. A warp holds wc = min(CH, 32 / LPC) channels x LPC lanes, channel-minor,
// so that the wc lanes of one state lane are consecutive (shared-memory rows
// of consecutive channels: no bank conflicts) and a channel's lanes are wc
// apart (shuffles xor m * wc).
struct Lanes {
  int ch, sl, wc;
};
__device__ __forceinline__ Lanes lanes_of(int t, int CH, int LPC) {
  const int wc = CH < 32 / LPC ? CH : 32 / LPC;
  return {(t / (wc * LPC)) * wc + t % wc, (t / wc) % LPC, wc};
}

// Reduce-scatter of Q values over the LPC lanes of a channel (wc apart).
// Afterwards, with Q >= LPC, v[0 .. Q/LPC) of lane sl hold the sums (over the
// LPC lanes) of the values at indices sl*(Q/LPC) + r; with Q < LPC, v[0] of
// lane sl holds the sum at index sl / (LPC/Q) (lanes that share it agree).
template <int LPC, int Q>
__device__ __forceinline__ void reduce_scatter(float (&v)[Q], int sl, int wc, unsigned mask) {
  int K = Q;
#pragma unroll
  for (int m = LPC / 2; m >= 1; m /= 2) {
    if (K == 1) {
      v[0] += __shfl_xor_sync(mask, v[0], m * wc);
      continue;
    }
    const int half = K / 2;
    const bool up = (sl & m) != 0;
#pragma unroll
    for (int i = 0; i < half; ++i) {
      const float send = up ? v[i] : v[i + half];
      const float keep = up ? v[i + half] : v[i];
      v[i] = keep + __shfl_xor_sync(mask, send, m * wc);
    }
    K = half;
  }
}

// The quads of a chunk that lane sl of a channel handles in the per-position
// passes: quads sl*kPer .. sl*kPer + kPer - 1 (lanes past kQuads own none).
template <int LPC>
struct QuadsOf {
  static constexpr int kPer = kQuads >= LPC ? kQuads / LPC : 1;
  __device__ static int count(int sl) { return sl * kPer < kQuads ? kPer : 0; }
};

// NT consecutive floats of shared memory (16-, 8- or 4-byte aligned).
template <int NT>
__device__ __forceinline__ void lds_nt(const float* p, float (&v)[NT]) {
  if constexpr (NT == 4) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
  } else if constexpr (NT == 2) {
    const float2 q = *reinterpret_cast<const float2*>(p);
    v[0] = q.x; v[1] = q.y;
  } else {
    v[0] = *p;
  }
}
__device__ __forceinline__ void lds4(const float* p, float (&v)[4]) { lds_nt<4>(p, v); }
__device__ __forceinline__ void sts4(float* p, const float (&v)[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
// Calls f(std::true_type) or f(std::false_type): code specialised for a
// direction that is uniform over each warp.
template <typename F>
__device__ __forceinline__ void with_rev(bool rev, F&& f) {
  if (rev) f(std::true_type{});
  else f(std::false_type{});
}

// The quads of a chunk that lane `sl` prepares, `nq` of them, specialised
// for the direction as in with_rev: f(rc, p), p the quad's first position in
// the chunk. The forward and the backward prepare their tiles this way.
template <int LPC, typename F>
__device__ __forceinline__ void for_each_quad(bool rev, int sl, int nq, F&& f) {
  with_rev(rev, [&](auto rc) {
    for (int r = 0; r < nq; ++r) f(rc, 4 * (sl * QuadsOf<LPC>::kPer + r));
  });
}

// A quad in memory order <-> its slot in a scan-order tile row.
__device__ __forceinline__ int tile_quad(int p, bool rev) { return rev ? kT - 4 - p : p; }
__device__ __forceinline__ void flip4(float (&v)[4]) {
  float t = v[0]; v[0] = v[3]; v[3] = t;
  t = v[1]; v[1] = v[2]; v[2] = t;
}

// Positions of a chunk starting at pos0 that lie inside [0, L): kT or fewer.
__device__ __forceinline__ int chunk_valid(int64_t L, int64_t pos0) {
  return L - pos0 < kT ? (int)(L - pos0) : kT;
}

// min(4, r) as an int (r may exceed int range).
__device__ __forceinline__ int rem4(int64_t r) { return r < 4 ? (int)r : 4; }

__device__ __forceinline__ void kahan_add(float& sum, float& comp, float v) {
  const float y = v - comp;
  const float t = sum + y;
  comp = (t - sum) - y;
  sum = t;
}

// Transposes one direction's raw B, C ([N][R], memory order) into f32 tiles
// [kT][NP] in scan order (zero rows n >= N); threads t0 .. t0+nthr-1 share it.
template <typename T>
__device__ __forceinline__ void prep_bc(float* tB, float* tC, const T* rB, const T* rC, int N,
                                        int NP, bool rev, int t0, int nthr) {
  constexpr int R = Smem<T>::kRawRow;
  for (int t = t0; t < 2 * NP * kQuads; t += nthr) {
    const int which = t / (NP * kQuads);
    const int rem = t % (NP * kQuads);
    const int n = rem % NP, p = 4 * (rem / NP);
    float v[4] = {0.f, 0.f, 0.f, 0.f};
    if (n < N) ld4<T>((which ? rC : rB) + n * R + p, true, 4, v);
    float* dst = which ? tC : tB;
#pragma unroll
    for (int e = 0; e < 4; ++e) dst[(rev ? kT - 1 - p - e : p + e) * NP + n] = v[e];
  }
}

// --------------------------------------------------------------- forward ---
//
// Block: ndirs x CH channels x LPC lanes (direction-major); grid: batch x
// (dim / CH). Step i visits chunk i of the forward direction and chunk
// nc-1-i of the reverse one; the direction that reaches a chunk first leaves
// its partial y (f32) in ypart, the second adds it, gates and writes y (the
// middle chunk of an odd count is finished from both tiles at once).
template <typename T, int NT, int LPC>
__global__ void __launch_bounds__(kThreadsFwd, NT == kNT ? kMinBlocksFwd : kMinBlocksFwdSmall)
    scan_fwd_kernel(const KArgs a) {
  extern __shared__ __align__(16) float smem[];
  constexpr int R = Smem<T>::kRawRow;
  constexpr int NP = LPC * NT;
  constexpr int Q = LPC < 4 ? 4 : LPC;  // positions per reduce-scatter
  const int CH = a.CH, N = a.N, ND = a.ndirs;
  const int64_t L = a.L;
  const int tpd = CH * LPC;
  const int k = threadIdx.x / tpd;
  const int tk = threadIdx.x % tpd;
  const Lanes ln = lanes_of(tk, CH, LPC);
  const int ch = ln.ch, sl = ln.sl, wc = ln.wc;
  const unsigned mask = blockDim.x >= 32 ? 0xffffffffu : (1u << blockDim.x) - 1u;
  const int64_t cpb = a.dim / CH;
  const int64_t b = blockIdx.x / cpb;
  const int64_t d0 = (blockIdx.x % cpb) * CH;
  const int64_t d = d0 + ch;
  const int g = (int)(d0 / a.dpg);
  const int nc = a.nc;

  // Carve: per direction f32 dt, dtu, y [CH][kTP], B, C [kT][NP]; then raw.
  const size_t f32n = Smem<T>::fwd_f32(CH, NP);
  const size_t rawn = Smem<T>::fwd_raw(CH, N);
  T* raw0 = reinterpret_cast<T*>(smem + ND * f32n);
  auto f32_of = [&](int q) { return smem + q * f32n; };
  // Raw stage of chunk step i, direction q.
  const int S = a.fstages;
  auto raw_of = [&](int i, int q) { return raw0 + ((i % S) * ND + q) * rawn; };
  auto rev_of = [&](int q) { return ND == 2 ? q == 1 : a.rev0 != 0; };
  auto chunk_of = [&](int q, int i) { return rev_of(q) ? nc - 1 - i : i; };
  auto issue = [&](int i) {
    for (int q = 0; q < ND; ++q) {
      const DirArgs& dr = a.dir[q];
      const int64_t pos0 = (int64_t)chunk_of(q, i) * kT;
      T* r = raw_of(i, q);
      stage_rows<T>(r, reinterpret_cast<const T*>(dr.u) + b * dr.u_bs + d0 * L, L, CH, CH, pos0, L,
                    a.vec);
      stage_rows<T>(r + CH * R, reinterpret_cast<const T*>(dr.delta) + b * dr.delta_bs + d0 * L, L,
                    CH, CH, pos0, L, a.vec);
      stage_rows<T>(r + 2 * CH * R,
                    reinterpret_cast<const T*>(dr.B) + b * dr.B_bs + (int64_t)g * N * L, L, N, N,
                    pos0, L, a.vec);
      stage_rows<T>(r + (2 * CH + N) * R,
                    reinterpret_cast<const T*>(dr.C) + b * dr.C_bs + (int64_t)g * N * L, L, N, N,
                    pos0, L, a.vec);
    }
    cp_async_commit();
  };

  // This thread's direction and channel.
  const DirArgs& me = a.dir[k];
  const bool rev = rev_of(k);
  float A2[NT], h[NT];
#pragma unroll
  for (int s = 0; s < NT; ++s) {
    const int n = sl * NT + s;
    A2[s] = n < N ? __ldg(me.A + d * N + n) * kLog2e : 0.f;
    h[s] = 0.f;
  }
  const float Dk = me.D ? __ldg(me.D + d) : 0.f;
  const float bias = me.bias ? __ldg(me.bias + d) : 0.f;
  float* st_row = a.states ? a.states + (((int64_t)k * a.batch + b) * a.dim + d) * nc * N : nullptr;
  float* t_dt = f32_of(k) + ch * kTP;
  float* t_dtu = t_dt + CH * kTP;
  float* t_y = t_dt + 2 * CH * kTP;
  const float* t_B = f32_of(k) + 3 * CH * kTP;
  const float* t_C = t_B + kT * NP;
  const int nq = QuadsOf<LPC>::count(sl);

  // Copies run max(1, S - 1) chunks ahead; one commit group per chunk step
  // (empty past the end) keeps the wait count uniform.
  const int ahead = S > 1 ? S - 1 : 1;
  for (int i = 0; i < ahead; ++i) {
    if (i < nc) issue(i);
    else cp_async_commit();
  }
  for (int i = 0; i < nc; ++i) {
    if (S == 1) cp_async_wait<0>();
    else cp_async_wait<kFwdMaxStages - 2>();
    __syncthreads();  // raw chunk i is in; the previous chunk's tiles are free
    const T* r_u = raw_of(i, k) + ch * R;
    const T* r_d = raw_of(i, k) + (CH + ch) * R;
    const int c = chunk_of(k, i);
    const int64_t pos0 = (int64_t)c * kT;
    const int lim = chunk_valid(L, pos0);
    // Per position, once: dt = softplus(delta + bias), dt*u, and y := D*u.
    for_each_quad<LPC>(rev, sl, nq, [&](auto rc, const int p) {
      constexpr bool RV = decltype(rc)::value;
      float uv[4], xv[4], dt[4], du[4], yd[4];
      ld4<T>(r_u + p, true, 4, uv);
      ld4<T>(r_d + p, true, 4, xv);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int o = RV ? 3 - e : e;  // scan order within the quad
        const float x = xv[o] + bias;
        const float v = a.softplus ? softplusf(x) : x;
        dt[e] = p + o < lim ? v : 0.f;
        du[e] = dt[e] * uv[o];
        yd[e] = Dk * uv[o];
      }
      const int j = tile_quad(p, RV);
      sts4(t_dt + j, dt);
      sts4(t_dtu + j, du);
      sts4(t_y + j, yd);
    });
    {
      const T* rb = raw_of(i, k) + 2 * CH * R;
      prep_bc<T>(f32_of(k) + 3 * CH * kTP, f32_of(k) + 3 * CH * kTP + kT * NP, rb, rb + N * R, N,
                 NP, rev, tk, tpd);
    }
    __syncthreads();  // tiles ready, this raw stage free
    if (i + ahead < nc) issue(i + ahead);
    else cp_async_commit();
    if (st_row) {
#pragma unroll
      for (int s = 0; s < NT; ++s)
        if (sl * NT + s < N) st_row[(int64_t)c * N + sl * NT + s] = h[s];
    }
    // The scan over the chunk's tile.
#pragma unroll 2
    for (int j0 = 0; j0 < kT; j0 += Q) {
      float ys[Q], dtv[Q], duv[Q];
#pragma unroll
      for (int p = 0; p < Q; p += 4) {
        float x[4], w[4];
        lds4(t_dt + j0 + p, x);
        lds4(t_dtu + j0 + p, w);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          dtv[p + e] = x[e];
          duv[p + e] = w[e];
        }
      }
#pragma unroll
      for (int p = 0; p < Q; ++p) {
        float bv[NT], cv[NT];
        lds_nt<NT>(t_B + (j0 + p) * NP + sl * NT, bv);
        lds_nt<NT>(t_C + (j0 + p) * NP + sl * NT, cv);
        float acc = 0.f;
#pragma unroll
        for (int s = 0; s < NT; ++s) {
          const float dA = ex2(dtv[p] * A2[s]);
          h[s] = fmaf(dA, h[s], duv[p] * bv[s]);
          acc = fmaf(cv[s], h[s], acc);
        }
        ys[p] = acc;
      }
      reduce_scatter<LPC, Q>(ys, sl, wc, mask);
#pragma unroll
      for (int r = 0; r < Q / LPC; ++r) t_y[j0 + sl * (Q / LPC) + r] += ys[r];
    }
    __syncthreads();  // y tiles complete
    // Output of this thread's quads.
    const int c0 = chunk_of(0, i), c1 = chunk_of(ND - 1, i);
    const bool first = ND == 2 && c0 < c1;
    const bool middle = ND == 2 && c0 == c1;
    if (middle && k == 1) continue;
    const int64_t row = b * a.dim + d;
    const float* t_y1 = f32_of(ND - 1) + (2 * CH + ch) * kTP;
    for (int r = 0; r < nq; ++r) {
      const int p = 4 * (sl * QuadsOf<LPC>::kPer + r);
      const int n = lim - p < 4 ? lim - p : 4;
      if (n <= 0) break;
      float v[4];
      lds4(t_y + tile_quad(p, rev), v);
      if (rev) flip4(v);
      if (middle) {
        float w[4];
        lds4(t_y1 + tile_quad(p, true), w);
        flip4(w);
#pragma unroll
        for (int e = 0; e < 4; ++e) v[e] += w[e];
      }
      const int64_t o = row * L + pos0 + p;
      if (first) {
        st4<float>(a.ypart + o, a.vec, n, v);
        continue;
      }
      if (ND == 2 && !middle) {
        float w[4];
        ld4<float>(a.ypart + o, a.vec, n, w);
#pragma unroll
        for (int e = 0; e < 4; ++e) v[e] += w[e];
      }
      if (a.ypre) st4<T>(reinterpret_cast<T*>(a.ypre) + o, a.vec, n, v);
      if (a.z) {
        float zv[4];
        ld4<T>(reinterpret_cast<const T*>(a.z) + b * a.z_bs + d * L + pos0 + p, a.vec, n, zv);
#pragma unroll
        for (int e = 0; e < 4; ++e) v[e] *= zv[e] * sigmoidf_(zv[e]);
      }
      st4<T>(reinterpret_cast<T*>(a.y) + o, a.vec, n, v);
    }
  }
  cp_async_wait<0>();
}

// -------------------------------------------------------------- backward ---
//
// Block: CH channels x LPC lanes of one direction; grid: ndirs x batch x
// (dim / CH); the directions are independent (dz comes from the saved
// ungated y, not from the other direction). Chunks are visited against the
// scan order. Per chunk a thread recomputes its states from the saved
// chunk-entry state, keeping the state entering each kS-position sub-chunk;
// then, sub-chunk by sub-chunk from the end, it recomputes dA and dA*h in
// registers and runs the adjoint
//   lambda_l = g_l C_l + dA_{l+1} lambda_{l+1}
// accumulating dA in registers, sum_n lambda B and sum_n A lambda dA h_{l-1}
// per position (reduced over the channel's lanes, then du and ddelta go out),
// and leaving the dB / dC contributions in shared memory, where all threads
// sum them over the block's channels; they go out as float4 atomics (or as
// per-block partials reduced in fixed order afterwards: deterministic mode).
template <typename T, int LPC>
__global__ void __launch_bounds__(kThreadsBwd, kMinBlocksBwd) scan_bwd_kernel(const KArgs a) {
  extern __shared__ __align__(16) float smem[];
  constexpr int R = Smem<T>::kRawRow;
  constexpr int NT = kNT;
  constexpr int NP = LPC * NT;
  const int CH = a.CH, N = a.N;
  const int64_t L = a.L;
  const int nthr = blockDim.x;
  const int tid = threadIdx.x;
  const Lanes ln = lanes_of(tid, CH, LPC);
  const int ch = ln.ch, sl = ln.sl, wc = ln.wc;
  const unsigned mask = nthr >= 32 ? 0xffffffffu : (1u << nthr) - 1u;
  const int64_t cpb = a.dim / CH;
  const int k = (int)(blockIdx.x / (a.batch * cpb));
  const int64_t rest = blockIdx.x % (a.batch * cpb);
  const int64_t b = rest / cpb;
  const int64_t kblk = rest % cpb;
  const int64_t d0 = kblk * CH;
  const int64_t d = d0 + ch;
  const int g = (int)(d0 / a.dpg);
  const int nc = a.nc;
  const bool rev = a.ndirs == 2 ? k == 1 : a.rev0 != 0;
  const DirArgs& dr = a.dir[k];
  const bool has_z = a.z != nullptr;
  const bool do_dz = has_z && k == 0 && a.dz != nullptr;

  // Carve.
  float* s_dt = smem;
  float* s_dtu = s_dt + CH * kTP;
  float* s_g = s_dtu + CH * kTP;
  float* s_u = s_g + CH * kTP;
  float* s_sx = s_u + CH * kTP;
  float* s_B = s_sx + CH * kTP;
  float* s_C = s_B + kT * NP;
  float* s_red = s_C + kT * NP;  // [2][NP][CH][kS]
  float4* s_hs = reinterpret_cast<float4*>(s_red + 2 * NP * CH * kS);  // [kNSub][nthr]
  T* raw = reinterpret_cast<T*>(smem + Smem<T>::bwd_f32(CH, NP));
  // raw: u, delta, dy, z, ypre [CH][R]; B, C [N][R]

  auto chunk_at = [&](int i) { return rev ? i : nc - 1 - i; };
  const int64_t row0 = b * a.dim + d0;
  auto issue = [&](int i) {
    const int64_t pos0 = (int64_t)chunk_at(i) * kT;
    stage_rows<T>(raw, reinterpret_cast<const T*>(dr.u) + b * dr.u_bs + d0 * L, L, CH, CH, pos0, L,
                  a.vec);
    stage_rows<T>(raw + CH * R, reinterpret_cast<const T*>(dr.delta) + b * dr.delta_bs + d0 * L, L,
                  CH, CH, pos0, L, a.vec);
    stage_rows<T>(raw + 2 * CH * R, reinterpret_cast<const T*>(a.dy) + row0 * L, L, CH, CH, pos0,
                  L, a.vec);
    if (has_z)
      stage_rows<T>(raw + 3 * CH * R, reinterpret_cast<const T*>(a.z) + b * a.z_bs + d0 * L, L, CH,
                    CH, pos0, L, a.vec);
    if (do_dz)
      stage_rows<T>(raw + 4 * CH * R, reinterpret_cast<const T*>(a.ypre) + row0 * L, L, CH, CH,
                    pos0, L, a.vec);
    stage_rows<T>(raw + 5 * CH * R,
                  reinterpret_cast<const T*>(dr.B) + b * dr.B_bs + (int64_t)g * N * L, L, N, N, pos0,
                  L, a.vec);
    stage_rows<T>(raw + (5 * CH + N) * R,
                  reinterpret_cast<const T*>(dr.C) + b * dr.C_bs + (int64_t)g * N * L, L, N, N, pos0,
                  L, a.vec);
    cp_async_commit();
  };

  float A2[NT], An[NT], mu[NT], dAs[NT], dAc[NT];
#pragma unroll
  for (int s = 0; s < NT; ++s) {
    const int n = sl * NT + s;
    An[s] = n < N ? __ldg(dr.A + d * N + n) : 0.f;
    A2[s] = An[s] * kLog2e;
    mu[s] = 0.f;
    dAs[s] = 0.f;
    dAc[s] = 0.f;
  }
  const float* st_row = a.states + (((int64_t)k * a.batch + b) * a.dim + d) * nc * N;
  const float bias = dr.bias ? __ldg(dr.bias + d) : 0.f;
  const float Dd = dr.D ? __ldg(dr.D + d) : 0.f;
  float dDs = 0.f, dDc = 0.f, dbs = 0.f, dbc = 0.f;
  const int64_t per = a.batch * a.G * (int64_t)N * L;  // elements of one dB
  const int64_t bcoff = ((b * a.G + g) * (int64_t)N) * L;
  const int64_t row = b * a.dim + d;
  const int nq = QuadsOf<LPC>::count(sl);
  float* t_dt = s_dt + ch * kTP;
  float* t_dtu = s_dtu + ch * kTP;
  float* t_g = s_g + ch * kTP;
  float* t_u = s_u + ch * kTP;
  float* t_sx = s_sx + ch * kTP;
  // dB / dC reduction tasks: (which, n) x CG channel groups of span channels.
  int CG = 1;
  while (CG * 2 <= CH && 2 * N * CG * 2 <= nthr) CG *= 2;
  const int span = CH / CG;

  issue(0);
  for (int i = 0; i < nc; ++i) {
    cp_async_wait<0>();
    __syncthreads();  // raw chunk i is in; the previous chunk's tiles are free
    const int c = chunk_at(i);
    const int64_t pos0 = (int64_t)c * kT;
    const int lim = chunk_valid(L, pos0);
    // Per position: dt, dt*u, g = dy * silu(z), u, sigmoid(x) into tiles; dz out.
    for_each_quad<LPC>(rev, sl, nq, [&](auto rc, const int p) {
      constexpr bool RV = decltype(rc)::value;
      float uv[4], xv[4], dyv[4], zv[4], dt[4], du[4], gv[4], sx[4];
      ld4<T>(raw + ch * R + p, true, 4, uv);
      ld4<T>(raw + (CH + ch) * R + p, true, 4, xv);
      ld4<T>(raw + (2 * CH + ch) * R + p, true, 4, dyv);
      if (has_z) ld4<T>(raw + (3 * CH + ch) * R + p, true, 4, zv);
      float dz[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool in = p + e < lim;
        const float x = xv[e] + bias;
        float sg = 1.f;
        const float v = a.softplus ? softplus_sig(x, sg) : x;
        dt[e] = in ? v : 0.f;
        sx[e] = sg;
        du[e] = dt[e] * uv[e];
        float gate = 1.f;
        if (has_z) {
          const float sz = sigmoidf_(zv[e]);
          gate = zv[e] * sz;
          dz[e] = sz * (1.f + zv[e] * (1.f - sz)) * dyv[e];
        }
        gv[e] = in ? dyv[e] * gate : 0.f;
      }
      if (do_dz) {
        float yv[4];
        ld4<T>(raw + (4 * CH + ch) * R + p, true, 4, yv);
#pragma unroll
        for (int e = 0; e < 4; ++e) dz[e] *= yv[e];
        const int n = lim - p < 4 ? lim - p : 4;
        if (n > 0) st4<T>(reinterpret_cast<T*>(a.dz) + row * L + pos0 + p, a.vec, n, dz);
      }
      if (RV) {
        flip4(dt);
        flip4(du);
        flip4(gv);
        flip4(uv);
        flip4(sx);
      }
      const int j = tile_quad(p, RV);
      sts4(t_dt + j, dt);
      sts4(t_dtu + j, du);
      sts4(t_g + j, gv);
      sts4(t_u + j, uv);
      sts4(t_sx + j, sx);
    });
    prep_bc<T>(s_B, s_C, raw + 5 * CH * R, raw + (5 * CH + N) * R, N, NP, rev, tid, nthr);
    __syncthreads();  // tiles ready, raw free
    if (i + 1 < nc) issue(i + 1);

    // Pass 1: the states entering each sub-chunk.
    {
      float h[NT];
#pragma unroll
      for (int s = 0; s < NT; ++s) h[s] = sl * NT + s < N ? st_row[(int64_t)c * N + sl * NT + s] : 0.f;
#pragma unroll
      for (int q = 0; q < kNSub; ++q) {
        s_hs[q * nthr + tid] = make_float4(h[0], h[1], h[2], h[3]);
        float dtv[4], duv[4];
        lds4(t_dt + q * kS, dtv);
        lds4(t_dtu + q * kS, duv);
#pragma unroll
        for (int e = 0; e < kS; ++e) {
          float bv[NT];
          lds4(s_B + (q * kS + e) * NP + sl * NT, bv);
#pragma unroll
          for (int s = 0; s < NT; ++s) h[s] = fmaf(ex2(dtv[e] * A2[s]), h[s], duv[e] * bv[s]);
        }
      }
    }
    float dAl[NT] = {0.f, 0.f, 0.f, 0.f};
    float vD = 0.f, vb = 0.f;
#pragma unroll 1
    for (int q = kNSub - 1; q >= 0; --q) {
      float dtv[kS], duv[kS], gv[kS];
      lds4(t_dt + q * kS, dtv);
      lds4(t_dtu + q * kS, duv);
      lds4(t_g + q * kS, gv);
      // Recompute dA and dA * h_{l-1} of the sub-chunk.
      float av[kS][NT], ah[kS][NT];
      {
        const float4 h4 = s_hs[q * nthr + tid];
        float h[NT] = {h4.x, h4.y, h4.z, h4.w};
#pragma unroll
        for (int p = 0; p < kS; ++p) {
          float bv[NT];
          lds4(s_B + (q * kS + p) * NP + sl * NT, bv);
#pragma unroll
          for (int s = 0; s < NT; ++s) {
            av[p][s] = ex2(dtv[p] * A2[s]);
            ah[p][s] = av[p][s] * h[s];
            h[s] = fmaf(duv[p], bv[s], ah[p][s]);
          }
        }
      }
      // Adjoint, against the scan order.
      float v1[kS], v2[kS], cB[NT][kS], cC[NT][kS];
#pragma unroll
      for (int p = kS - 1; p >= 0; --p) {
        float bv[NT], cv[NT];
        lds4(s_B + (q * kS + p) * NP + sl * NT, bv);
        lds4(s_C + (q * kS + p) * NP + sl * NT, cv);
        float s1 = 0.f, s2 = 0.f;
#pragma unroll
        for (int s = 0; s < NT; ++s) {
          const float lam = fmaf(gv[p], cv[s], mu[s]);
          const float hj = fmaf(duv[p], bv[s], ah[p][s]);
          const float t = lam * ah[p][s];
          s1 = fmaf(lam, bv[s], s1);
          s2 = fmaf(An[s], t, s2);
          dAl[s] = fmaf(dtv[p], t, dAl[s]);
          mu[s] = av[p][s] * lam;
          cB[s][p] = lam * duv[p];
          cC[s][p] = gv[p] * hj;
        }
        v1[p] = s1;
        v2[p] = s2;
      }
#pragma unroll
      for (int s = 0; s < NT; ++s) {
        const int n = sl * NT + s;
        sts4(s_red + ((0 * NP + n) * CH + ch) * kS, cB[s]);
        sts4(s_red + ((1 * NP + n) * CH + ch) * kS, cC[s]);
      }
      // du, ddelta of the positions this lane holds after the reduce-scatter.
      reduce_scatter<LPC, kS>(v1, sl, wc, mask);
      reduce_scatter<LPC, kS>(v2, sl, wc, mask);
      {
        constexpr int PR = kS >= LPC ? kS / LPC : 1;
        constexpr int SH = kS >= LPC ? 1 : LPC / kS;  // lanes sharing a position
        const bool holds = sl % SH == 0;
        const int jb = q * kS + (kS >= LPC ? sl * PR : sl / SH);
#pragma unroll
        for (int e = 0; e < PR; ++e) {
          const int j = jb + e;
          const int64_t pos = pos0 + (rev ? kT - 1 - j : j);
          if (!holds || pos >= L) continue;
          const float dtj = t_dt[j], gj = t_g[j], uj = t_u[j];
          const float dd = fmaf(uj, v1[e], v2[e]) * t_sx[j];
          if (dr.du) reinterpret_cast<T*>(dr.du)[row * L + pos] = from_f<T>(fmaf(dtj, v1[e], Dd * gj));
          if (dr.ddelta) reinterpret_cast<T*>(dr.ddelta)[row * L + pos] = from_f<T>(dd);
          vD = fmaf(gj, uj, vD);
          vb += dd;
        }
      }
      __syncthreads();  // dB / dC contributions complete
      // Sum them over the block's channels: task (which, n, channel group).
      for (int w0 = 0; w0 < 2 * N; w0 += nthr / CG) {
        const int wn = w0 + tid / CG, cg = tid % CG;
        float sum[4] = {0.f, 0.f, 0.f, 0.f};
        if (wn < 2 * N) {
          const int which = wn / N, n = wn % N;
          const float* base = s_red + ((which * NP + n) * CH + cg * span) * kS;
#pragma unroll 8
          for (int it = 0; it < span; ++it) {
            float v[4];
            lds4(base + ((it + tid) & (span - 1)) * kS, v);
#pragma unroll
            for (int e = 0; e < 4; ++e) sum[e] += v[e];
          }
        }
        // Combine the channel groups (consecutive lanes), fixed order.
        for (int m = 1; m < CG; m *= 2) {
#pragma unroll
          for (int e = 0; e < 4; ++e) sum[e] += __shfl_xor_sync(mask, sum[e], m);
        }
        if (wn < 2 * N && cg == 0) {
          const int which = wn / N, n = wn % N;
          // Tile positions q*kS .. +3 are memory positions pm .. pm+3.
          const int pm = tile_quad(q * kS, rev);
          const int64_t pos = pos0 + pm;
          float* dst = which ? dr.dC : dr.dB;
          if (rev) flip4(sum);
          if (pos < L && dst != nullptr) {
            const int nv = rem4(L - pos);
            const int64_t off = bcoff + (int64_t)n * L + pos;
            if (a.det) {
              const int64_t kin = kblk % (a.dpg / CH);  // channel block within the group
              st4<float>(a.bc_part + ((kin * a.ndirs + k) * 2 + which) * per + off, a.vec, nv, sum);
            } else {
              float* pp = dst + off;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
              if (a.vec && nv == 4)
                atomicAdd(reinterpret_cast<float4*>(pp), make_float4(sum[0], sum[1], sum[2], sum[3]));
              else
#endif
                for (int e = 0; e < nv; ++e) atomicAdd(pp + e, sum[e]);
            }
          }
        }
      }
      __syncthreads();  // contributions consumed
    }
    // Fold the chunk's sums into compensated totals: L can be ~1e6.
#pragma unroll
    for (int s = 0; s < NT; ++s) kahan_add(dAs[s], dAc[s], dAl[s]);
    kahan_add(dDs, dDc, vD);
    kahan_add(dbs, dbc, vb);
  }
  cp_async_wait<0>();
  // Per-channel partials: red_part[k][b][d][0..N-1] = dA, [N] = dD, [N+1] = dbias.
  float* outp = a.red_part + (((int64_t)k * a.batch + b) * a.dim + d) * (N + 2);
#pragma unroll
  for (int s = 0; s < NT; ++s)
    if (sl * NT + s < N) outp[sl * NT + s] = dAs[s];
#pragma unroll
  for (int m = LPC / 2; m >= 1; m /= 2) {
    dDs += __shfl_xor_sync(mask, dDs, m * wc);
    dbs += __shfl_xor_sync(mask, dbs, m * wc);
  }
  if (sl == 0) {
    outp[N] = dDs;
    outp[N + 1] = dbs;
  }
}

// Host-side launchers, one pair per dtype, defined in scan_<dtype>.cu. nt is
// the forward's states per thread (4, or 2 with N <= 16), lpc the lanes per
// channel.
int launch_fwd_f32(const KArgs& a, int nt, int lpc, cudaStream_t s);
int launch_bwd_f32(const KArgs& a, int lpc, cudaStream_t s);
int launch_fwd_bf16(const KArgs& a, int nt, int lpc, cudaStream_t s);
int launch_bwd_bf16(const KArgs& a, int lpc, cudaStream_t s);
int launch_fwd_f16(const KArgs& a, int nt, int lpc, cudaStream_t s);
int launch_bwd_f16(const KArgs& a, int lpc, cudaStream_t s);

template <typename T, int NT, int LPC>
int launch_fwd_t(const KArgs& a, cudaStream_t s) {
  const size_t smem = Smem<T>::fwd_bytes(a.ndirs, a.CH, a.N, LPC * NT, a.fstages);
  cudaError_t e = cudaFuncSetAttribute(scan_fwd_kernel<T, NT, LPC>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (e != cudaSuccess) return (int)e;
  const int64_t blocks = a.batch * (a.dim / a.CH);
  scan_fwd_kernel<T, NT, LPC><<<(unsigned)blocks, a.ndirs * a.CH * LPC, smem, s>>>(a);
  return (int)cudaGetLastError();
}

template <typename T, int LPC>
int launch_bwd_t(const KArgs& a, cudaStream_t s) {
  const size_t smem = Smem<T>::bwd_bytes(a.CH, a.N, LPC * kNT);
  cudaError_t e = cudaFuncSetAttribute(scan_bwd_kernel<T, LPC>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (e != cudaSuccess) return (int)e;
  const int64_t blocks = a.ndirs * a.batch * (a.dim / a.CH);
  scan_bwd_kernel<T, LPC><<<(unsigned)blocks, a.CH * LPC, smem, s>>>(a);
  return (int)cudaGetLastError();
}

template <typename T>
int launch_fwd_impl(const KArgs& a, int nt, int lpc, cudaStream_t s) {
  if (nt == 2) return launch_fwd_t<T, 2, 8>(a, s);
  switch (lpc) {
    case 1: return launch_fwd_t<T, 4, 1>(a, s);
    case 2: return launch_fwd_t<T, 4, 2>(a, s);
    case 4: return launch_fwd_t<T, 4, 4>(a, s);
    case 8: return launch_fwd_t<T, 4, 8>(a, s);
    default: return launch_fwd_t<T, 4, 16>(a, s);
  }
}
template <typename T>
int launch_bwd_impl(const KArgs& a, int lpc, cudaStream_t s) {
  switch (lpc) {
    case 1: return launch_bwd_t<T, 1>(a, s);
    case 2: return launch_bwd_t<T, 2>(a, s);
    case 4: return launch_bwd_t<T, 4>(a, s);
    case 8: return launch_bwd_t<T, 8>(a, s);
    default: return launch_bwd_t<T, 16>(a, s);
  }
}

}  // namespace dimscan

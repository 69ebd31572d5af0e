// Skinny GEMM for decode: y[m, n] = Σ_k x[m, k] · W[n, k] for 1–8 rows of x (W in the checkpoint's
// [out, in] layout), optionally with the MLP's gelu_tanh(gate) * up fused (W = [gate; up]), or with
// gelu_tanh(y) * aux for a given aux [m, n] (the per-layer-input gate of E2B/E4B times its per-layer input).
// Both epilogues round y (gate, up) to T first, as the unfused ops do, so the bits are theirs. Two more run after
// y's columns are written (GemvNorm): the norms after a projection (on the launch's last CTA), and a q/k/v
// projection's q/k norms, RoPE and KV store (on each head's last CTA). Two kernels:
// gemv_kernel (CUDA cores): one warp per output column, lanes stream W's row in 16-byte vectors and reuse
// each for every row of x, a warp reduction at the end; gemv_mma_kernel (tensor cores, CUDA only): below.
// Both accumulate in fp32; gemv_use_mma() picks one.
#include <cstdlib>
#include <cstring>

#include "common/common.cuh"
#include "common/launchers.h"
#include "rope/norm_rope.cuh"
#ifndef G4_ROCM
#include "common/mma.cuh"
#endif

namespace g4 {
namespace {

constexpr int kWarpsPerCta = 8;

// the aux epilogue: y rounded to T, then gelu_tanh(y) * aux in fp32, rounded once (as gelu_tanh_mul)
template <typename T>
__device__ __forceinline__ T gelu_aux(float y, T a) {
  return from_f<T>(gelu_tanh(to_f(from_f<T>(y))) * to_f(a));
}

// 16 bytes written by another CTA of this launch, read after a fence: through L2 on CUDA (its L1 is not
// coherent); on ROCm the acquiring fence has already invalidated the L1
template <typename T>
__device__ __forceinline__ Vec16<T> ld16_l2(const T* p) {
#ifdef G4_ROCM
  return ld16(p);
#else
  Vec16<T> v;
  *reinterpret_cast<uint4*>(&v) = __ldcg(reinterpret_cast<const uint4*>(p));
  return v;
#endif
}

// The q/k/v epilogue (GemvNorm::has_qkv), per head: y's columns are [q heads | k heads | v heads] (D each, the
// wrapper checks), and a CTA's `cols` columns from c0 lie in one head (cols divides D). The CTAs of a head count
// themselves in its own counter slot; the last one runs that head's items of qkv_norm_rope_store_kernel (a q head;
// a k head, with its v head when V is K; a v head) for every token, a warp an item, with the same per-item code
// (norm_rope.cuh), y read through L2. So the heads' epilogues run in parallel, each as soon as its own columns
// are written. H200, bench/kernels/gemv_chain.py, E2B µs a layer: one CTA walking every head after the whole grid
// 51.7, per head 49.6, the separate launch 48.0 (so it stays off by default). Head dims 256 and 512 only.
template <typename T>
__device__ void gemv_qkv_tail(const GemvNorm& ep, int c0, int cols) {
  const QkvNormRopeStore& p = ep.qkv;
  const int head = c0 / p.D;
  if (head >= ep.qkv_heads) return;             // a CTA past the last column (none when cols divides D)
  if (!last_arrival(ep.counter + head, p.D / cols)) return;
  const int lane = threadIdx.x % kWarp;
  const int HH = p.H + 2 * p.KVH;
  const bool k_eq_v = ep.qkv_heads == p.H + p.KVH;
  // this head's items of one token: y head `head` is item h = head, and a k head of a [q; k] layout also v's
  const int per_token = k_eq_v && head >= p.H ? 2 : 1;
  for (int j = threadIdx.x / kWarp; j < p.T * per_token; j += blockDim.x / kWarp) {
    const int64_t t = j / per_token;
    const int h = head + (j % per_token) * p.KVH;
    if (p.D <= 256) rope::qkv_item<T, 4, true>(p, t * HH + h, lane);
    else rope::qkv_item<T, 8, true>(p, t * HH + h, lane);
  }
}

// The norm epilogue (GemvNorm, launchers.h): every CTA has written its y columns; the last one to count itself
// normalises each row as norm_kernel (norm.cu, VEC = 16 bytes, ep.nt threads a row, modes 2 and 3) would: each
// real thread stands in for the virtual threads t, t + blockDim, ... of that kernel, whose per-thread sums,
// warp trees and in-order sum over warps it repeats, so the bits are the same. y is read through L2 (other
// CTAs wrote it). Every thread of the CTA calls this.
template <typename T>
__device__ void gemv_norm_tail(const GemvNorm& ep, const T* y, int64_t sy, int M, int N) {
  constexpr int V = 16 / sizeof(T);
  constexpr int RMAX = 1024 / (kWarpsPerCta * kWarp);     // virtual threads a real one: nt <= 1024
  __shared__ float sh[1024 / kWarp];
  if (!last_arrival(ep.counter, (int)gridDim.x)) return;
  const int NT = ep.nt, nb = blockDim.x, lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int R = (NT + nb - 1) / nb, nw = NT / kWarp;
  // the sum over the virtual block of per-virtual-thread values v[r] (as block_sum in the norm kernel)
  auto vsum = [&](const float (&v)[RMAX]) {
    __syncthreads();          // sh is reused
#pragma unroll
    for (int r = 0; r < RMAX; ++r) {
      if (r >= R) break;
      const float t = warp_sum(v[r]);
      const int vw = warp + r * (nb / kWarp);
      if (lane == 0 && vw < nw) sh[vw] = t;
    }
    __syncthreads();
    float t = 0.f;
    for (int i = 0; i < nw; ++i) t += sh[i];
    return t;
  };
  const T* w1 = static_cast<const T*>(ep.w1);
  const T* w2 = static_cast<const T*>(ep.w2);
  const float sc = ep.scale ? ep.scale[0] : 1.f;
  for (int m = 0; m < M; ++m) {
    const T* yr = y + m * sy;
    const T* rr = static_cast<const T*>(ep.res) + m * ep.sres;
    T* hr = static_cast<T*>(ep.h) + m * ep.sh;
    float ss[RMAX], ss2[RMAX];
#pragma unroll
    for (int r = 0; r < RMAX; ++r) ss[r] = ss2[r] = 0.f;
#pragma unroll
    for (int r = 0; r < RMAX; ++r) {
      const int vt = threadIdx.x + r * nb;
      if (r >= R || vt >= NT) break;
      for (int i = vt * V; i < N; i += NT * V) {
        Vec16<T> v;
        v = ld16_l2(yr + i);
#pragma unroll
        for (int j = 0; j < V; ++j) { const float f = to_f(v.v[j]); ss[r] += f * f; }
      }
    }
    const float inv = rsqrtf(vsum(ss) / N + ep.eps);
#pragma unroll
    for (int r = 0; r < RMAX; ++r) {
      const int vt = threadIdx.x + r * nb;
      if (r >= R || vt >= NT) break;
      for (int i = vt * V; i < N; i += NT * V) {
        Vec16<T> v, rv, o;
        v = ld16_l2(yr + i);
        rv = ld16(rr + i);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          float f = to_f(v.v[j]) * inv;
          if (w1) f *= to_f(w1[i + j]);
          T t = from_f<T>(f);
          t = from_f<T>(to_f(rv.v[j]) + to_f(t));
          if (ep.scale) t = from_f<T>(to_f(t) * sc);
          const float g = to_f(t);
          ss2[r] += g * g;
          o.v[j] = t;
        }
        st16(hr + i, o);
      }
    }
    if (ep.w2 == nullptr) continue;
    const float inv2 = rsqrtf(vsum(ss2) / N + ep.eps);
    // the norms of h: normed (w2), and normed3 / normed4 (w3 / w4) when given, as the norm kernel's third pass
    const T* wn[3] = {w2, static_cast<const T*>(ep.w3), static_cast<const T*>(ep.w4)};
    T* const outs[3] = {static_cast<T*>(ep.normed), static_cast<T*>(ep.normed3), static_cast<T*>(ep.normed4)};
#pragma unroll
    for (int r = 0; r < RMAX; ++r) {
      const int vt = threadIdx.x + r * nb;
      if (r >= R || vt >= NT) break;
      for (int i = vt * V; i < N; i += NT * V) {     // this thread's own h elements
        const Vec16<T> hv = ld16(hr + i);
#pragma unroll
        for (int k = 0; k < 3; ++k) {
          if (!wn[k]) break;
          Vec16<T> o;
#pragma unroll
          for (int j = 0; j < V; ++j) o.v[j] = from_f<T>(to_f(hv.v[j]) * inv2 * to_f(wn[k][i + j]));
          st16(outs[k] + m * ep.sn + i, o);
        }
      }
    }
  }
}

constexpr int kVec = 8;                // elements per 16-byte vector
constexpr int kWarpStep = kWarp * kVec;  // elements per warp-wide vector load

// Weight vectors a lane of gemv_kernel loads before pdl_wait() (W_STATIC launches): the first PRE of each of its
// weight rows, at k = lane * 8 + p * 256. The E2B/E4B projections' rows (K = 1536 / 2560) are then mostly in
// registers when the previous kernel ends, so the DRAM latency of the first loads overlaps it.
template <typename T, bool GLU, int PRE>
struct GemvPre {
  static constexpr int NR = GLU ? 2 : 1;
  Vec16<T> v[PRE > 0 ? PRE : 1][NR];
  __device__ __forceinline__ void load(const T* __restrict__ w, int64_t sw, int N, int K, int n, int lane) {
#pragma unroll
    for (int p = 0; p < PRE; ++p) {
      const int k = lane * kVec + p * kWarpStep;
#pragma unroll
      for (int r = 0; r < NR; ++r)
        if (k < K) v[p][r] = ld16(w + (int64_t)(n + r * N) * sw + k);
    }
  }
};

// one warp's output column n of gemv_kernel; pre: its first PRE weight vectors a row, already loaded
template <typename T, int MR, bool GLU, int PRE>
__device__ __forceinline__ void gemv_columns(const T* __restrict__ x, int64_t sx, const T* __restrict__ w,
                                             int64_t sw, T* __restrict__ y, int64_t sy, int N, int K,
                                             const T* __restrict__ aux, int64_t saux, int n, int lane,
                                             const GemvPre<T, GLU, PRE>& pre) {
  constexpr int NR = GLU ? 2 : 1;      // weight rows per warp: n, and with GLU the up row n + N
  const T* wr[NR];
#pragma unroll
  for (int r = 0; r < NR; ++r) wr[r] = w + (int64_t)(n + r * N) * sw;
  float acc[NR][MR];
#pragma unroll
  for (int r = 0; r < NR; ++r)
#pragma unroll
    for (int m = 0; m < MR; ++m) acc[r][m] = 0.f;
  constexpr int V = kVec;
  constexpr int STEP = kWarpStep;
  auto fma_vec = [&](const Vec16<T> (&wv)[NR], int k) {
#pragma unroll
    for (int m = 0; m < MR; ++m) {
      const Vec16<T> xv = ld16(x + m * sx + k);
#pragma unroll
      for (int r = 0; r < NR; ++r)
#pragma unroll
        for (int j = 0; j < V; ++j) acc[r][m] += to_f(wv[r].v[j]) * to_f(xv.v[j]);
    }
  };
  auto load = [&](Vec16<T> (&wv)[NR], int k) {
#pragma unroll
    for (int r = 0; r < NR; ++r) wv[r] = ld16(wr[r] + k);
  };
  int k = lane * V;
  // the preloaded vectors first, in the same k order as the loop below (so the same sums)
#pragma unroll
  for (int p = 0; p < PRE; ++p)
    if (k < K) {
      fma_vec(pre.v[p], k);
      k += STEP;
    }
  // Two weight vectors per row in flight per lane. Measured on an H200 against four in flight, an L2
  // prefetch of the row before pdl_wait(), and both: this simplest form was fastest (the 805 MB E2B LM
  // head in 178 µs = 4.5 TB/s vs 182 / 203 / 205 µs; E2B batch-1 decode 3.66 vs 3.88 / 4.08 / 3.97 ms).
  // (The register preload of W_STATIC launches, GemvPre, is another thing: only for one-wave grids.)
  for (; k + STEP < K; k += 2 * STEP) {
    Vec16<T> w0[NR], w1[NR];
    load(w0, k);
    load(w1, k + STEP);
    fma_vec(w0, k);
    fma_vec(w1, k + STEP);
  }
  if (k < K) {
    Vec16<T> w0[NR];
    load(w0, k);
    fma_vec(w0, k);
  }
#pragma unroll
  for (int m = 0; m < MR; ++m) {
    float s[NR];
#pragma unroll
    for (int r = 0; r < NR; ++r) s[r] = warp_sum(acc[r][m]);
    if (lane == m) {
      if constexpr (GLU) {
        // as the unfused path: gate and up rounded to T, gelu_tanh(gate) * up in fp32, rounded once
        const float g = to_f(from_f<T>(s[0])), u = to_f(from_f<T>(s[1]));
        y[m * sy + n] = from_f<T>(gelu_tanh(g) * u);
      } else {
        y[m * sy + n] = aux ? gelu_aux<T>(s[0], aux[m * saux + n]) : from_f<T>(s[0]);
      }
    }
  }
}

template <typename T, int MR, bool GLU, int PRE>
__global__ void __launch_bounds__(kWarpsPerCta * kWarp)
gemv_kernel(const T* __restrict__ x, int64_t sx, const T* __restrict__ w, int64_t sw, T* __restrict__ y,
            int64_t sy, int N, int K, const T* __restrict__ aux, int64_t saux, const GemvNorm ep) {
  const int n = blockIdx.x * kWarpsPerCta + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  GemvPre<T, GLU, PRE> pre;
  if (PRE > 0 && n < N) pre.load(w, sw, N, K, n, lane);     // W_STATIC: no kernel in flight writes w
  pdl_wait();     // see common.cuh
  pdl_trigger();
  if (n < N) gemv_columns<T, MR, GLU, PRE>(x, sx, w, sw, y, sy, N, K, aux, saux, n, lane, pre);
  if constexpr (!GLU) {
    if (ep.counter) {
      if (ep.has_qkv) gemv_qkv_tail<T>(ep, blockIdx.x * kWarpsPerCta, kWarpsPerCta);
      else gemv_norm_tail<T>(ep, y, sy, MR, N);
    }
  }
}

// Whether a W_STATIC launch preloads its weights before pdl_wait(): not with GEMMA4RT_GEMV_PRELOAD=0 (read at each
// launch, as GEMMA4RT_GEMV_MMA), and only for a grid that the GPU holds at once (fits_one_wave): the blocks of a
// second wave start after the wait anyway, and the preload's registers lower the blocks an SM holds.
inline bool preload_enabled(bool w_static) {
  if (!w_static) return false;
  const char* e = std::getenv("GEMMA4RT_GEMV_PRELOAD");
  return !(e && std::strcmp(e, "0") == 0);
}
template <auto Kern>
bool fits_one_wave(unsigned blocks) {
  static const int64_t resident = [] {     // per kernel; the devices of a server are alike
    int dev = 0, sms = 0, per_sm = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, Kern, kWarpsPerCta * kWarp, 0) != cudaSuccess)
      return (int64_t)0;
    return (int64_t)sms * per_sm;
  }();
  return blocks <= resident;
}

#ifndef G4_ROCM
// Tensor-core skinny GEMM for 1-8 rows (CUDA, sm_80+). One mma.sync m16n8k16 computes 8 output columns
// for up to 8 rows of x: A = x (16 rows, the 8 past the real ones zero), B = Wᵀ (one weight row per
// column). The k order inside a 32-wide chunk is permuted so that every operand is one 16-byte vector per
// lane: lane (g, c) = (lane / 4, lane % 4) loads W[n0 + g][kb + 8c, +8) and x[g][kb + 8c, +8); its first
// two 32-bit pairs are the k slots {2c, 2c+1, 2c+8, 2c+9} of one mma, the last two those of a second. A
// and B share the permutation, so the sum is over the same products. One x load serves 8 weight rows and
// no element is converted, where gemv_kernel loads and converts each x vector once per weight vector and
// row, so its time grows with the rows (H200, 31B down projection: 4 rows 123 µs, one 73 µs; here 66 and
// 65 µs). An output element depends only on its own x row, the weights and the (fixed) split, never on
// how many rows there are. KS warps split K (contiguous ranges, summed in order through shared memory)
// so that narrow layers still fill the GPU: 8 / KS column groups of 8 per CTA. With GLU a warp also
// streams the up rows N + n and the epilogue is gelu_tanh(gate) * up.
constexpr int kMmaChunk = 32;          // k per lane-group step: 4 lanes x 8 elements
constexpr int kMmaUnroll = 4;          // chunks in flight per warp

// 16-byte read-only loads: weights are read once (no L1 allocation); x is re-read by every warp (L1).
__device__ __forceinline__ uint4 ldg_stream(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}
__device__ __forceinline__ uint4 ldg_cached(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

// PRE (W_STATIC launches): the first block's weight vectors are loaded before pdl_wait(), x's after it.
template <typename T, bool GLU, int KS, bool PRE>
__global__ void __launch_bounds__(kWarpsPerCta * kWarp)
gemv_mma_kernel(const T* __restrict__ x, int64_t sx, const T* __restrict__ w, int64_t sw, T* __restrict__ y,
                int64_t sy, int M, int N, int K, const T* __restrict__ aux, int64_t saux, const GemvNorm ep) {
  constexpr int CG = kWarpsPerCta / KS;       // column groups (8 columns each) per CTA
  constexpr int NR = GLU ? 2 : 1;
  __shared__ float red[KS > 1 ? kWarpsPerCta : 1][kWarp][2 * NR];
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int cg = warp / KS, ks = warp % KS;
  const int n0 = (blockIdx.x * CG + cg) * 8;
  const int g = lane / 4, c = lane % 4;
  const bool group_live = n0 < N;             // a dead group still reaches the barrier below
  const T* wr[NR];
#pragma unroll
  for (int r = 0; r < NR; ++r) wr[r] = w + (int64_t)(min(n0 + g, N - 1) + r * N) * sw;
  const bool xrow = g < M;
  const T* xr = x + (int64_t)(xrow ? g : 0) * sx;
  const int chunks = (K + kMmaChunk - 1) / kMmaChunk;
  const int per = (chunks + KS - 1) / KS;
  const int c_begin = ks * per, c_end = min(chunks, c_begin + per);
  float acc[NR][4];
#pragma unroll
  for (int r = 0; r < NR; ++r)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[r][i] = 0.f;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  auto mma_chunk = [&](const uint4 (&wv)[NR], uint4 xv) {
    if (!xrow) xv = zero;                // rows past M: x row 0 was read, zeros enter the product
    const uint32_t a0[4] = {xv.x, 0u, xv.y, 0u}, a1[4] = {xv.z, 0u, xv.w, 0u};
#pragma unroll
    for (int r = 0; r < NR; ++r) {
      Mma<T>::run(acc[r], a0, wv[r].x, wv[r].y);
      Mma<T>::run(acc[r], a1, wv[r].z, wv[r].w);
    }
  };
  // whole chunks, kMmaUnroll at a time, double-buffered: the next block's loads are in flight while this
  // block's mmas run (a single buffer made each mma wait for the load just issued: ~2.4 TB/s)
  struct Block {
    uint4 w[kMmaUnroll][NR], x[kMmaUnroll];
  };
  auto load_w = [&](Block& b, int c0) {
#pragma unroll
    for (int u = 0; u < kMmaUnroll; ++u)
#pragma unroll
      for (int r = 0; r < NR; ++r) b.w[u][r] = ldg_stream(wr[r] + (c0 + u) * kMmaChunk + c * 8);
  };
  auto load_x = [&](Block& b, int c0) {
#pragma unroll
    for (int u = 0; u < kMmaUnroll; ++u) b.x[u] = ldg_cached(xr + (c0 + u) * kMmaChunk + c * 8);
  };
  auto load_block = [&](Block& b, int c0) {
    load_w(b, c0);
    load_x(b, c0);
  };
  const int c_full = min(c_end, K / kMmaChunk);
  const bool first_block = group_live && c_begin + kMmaUnroll <= c_full;
  Block cur;
  if (PRE && first_block) load_w(cur, c_begin);       // W_STATIC: no kernel in flight writes w
  pdl_wait();
  pdl_trigger();
  if (group_live) {
    int ci = c_begin;
    if (first_block) {
      if (PRE) load_x(cur, ci);
      else load_block(cur, ci);
      for (ci += kMmaUnroll; ci + kMmaUnroll <= c_full; ci += kMmaUnroll) {
        Block nxt;
        load_block(nxt, ci);
#pragma unroll
        for (int u = 0; u < kMmaUnroll; ++u) mma_chunk(cur.w[u], cur.x[u]);
        cur = nxt;
      }
#pragma unroll
      for (int u = 0; u < kMmaUnroll; ++u) mma_chunk(cur.w[u], cur.x[u]);
    }
    for (; ci < c_end; ++ci) {           // the rest, and a last chunk that K ends inside (K % 8 == 0)
      const int k = ci * kMmaChunk + c * 8;
      uint4 wv[NR], xv = zero;
#pragma unroll
      for (int r = 0; r < NR; ++r) wv[r] = zero;
      if (k < K) {
#pragma unroll
        for (int r = 0; r < NR; ++r) wv[r] = *reinterpret_cast<const uint4*>(wr[r] + k);
        xv = *reinterpret_cast<const uint4*>(xr + k);
      }
      mma_chunk(wv, xv);
    }
  }
  // acc[r][0..1] = rows g, columns n0 + 2c + {0, 1}; acc[r][2..3] are the zero rows g + 8.
  if constexpr (KS > 1) {
#pragma unroll
    for (int r = 0; r < NR; ++r) {
      red[warp][lane][2 * r] = acc[r][0];
      red[warp][lane][2 * r + 1] = acc[r][1];
    }
    __syncthreads();
    if (ks == 0) {
#pragma unroll
      for (int r = 0; r < NR; ++r)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          float s = red[warp][lane][2 * r + j];
#pragma unroll
          for (int q = 1; q < KS; ++q) s += red[warp + q][lane][2 * r + j];
          acc[r][j] = s;
        }
    }
  }
  if (group_live && xrow && (KS == 1 || ks == 0)) {     // (no early return: the norm tail needs every thread)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int n = n0 + 2 * c + j;
      if (n >= N) continue;
      if constexpr (GLU) {
        const float gt = to_f(from_f<T>(acc[0][j])), up = to_f(from_f<T>(acc[1][j]));
        y[g * sy + n] = from_f<T>(gelu_tanh(gt) * up);
      } else {
        y[g * sy + n] = aux ? gelu_aux<T>(acc[0][j], aux[g * saux + n]) : from_f<T>(acc[0][j]);
      }
    }
  }
  if constexpr (!GLU) {
    if (ep.counter) {
      if (ep.has_qkv) gemv_qkv_tail<T>(ep, blockIdx.x * CG * 8, CG * 8);
      else gemv_norm_tail<T>(ep, y, sy, M, N);
    }
  }
}

// K split: the fewest warps per column group that give ~4096 warps in all (enough 2 KB streams in flight
// to cover the memory latency), each keeping at least 8 chunks. A function of (N, K) only.
inline int mma_ks(int N, int K) {
  const int64_t groups = (N + 7) / 8;
  const int chunks = (K + kMmaChunk - 1) / kMmaChunk;
  int ks = 1;
  while (ks < kWarpsPerCta && groups * ks < 4096 && chunks / (2 * ks) >= 8) ks *= 2;
  return ks;
}

template <typename T, bool GLU, int KS>
auto mma_kernel(bool w_static, unsigned blocks) {
  constexpr auto pre = gemv_mma_kernel<T, GLU, KS, true>;
  return preload_enabled(w_static) && fits_one_wave<pre>(blocks) ? pre : gemv_mma_kernel<T, GLU, KS, false>;
}

template <typename T, bool GLU>
cudaError_t run_mma(int M, const void* x, int64_t sx, const void* w, int64_t sw, void* y, int64_t sy, int N,
                    int K, bool w_static, const void* aux, int64_t saux, const GemvNorm& ep, cudaStream_t st) {
  const int ks = mma_ks(N, K);
  const int64_t warps = (int64_t)((N + 7) / 8) * ks;
  const unsigned blocks = (unsigned)((warps + kWarpsPerCta - 1) / kWarpsPerCta);
  auto kern = ks == 1 ? mma_kernel<T, GLU, 1>(w_static, blocks) : ks == 2 ? mma_kernel<T, GLU, 2>(w_static, blocks)
            : ks == 4 ? mma_kernel<T, GLU, 4>(w_static, blocks) : mma_kernel<T, GLU, 8>(w_static, blocks);
  return launch(kern, blocks, kWarpsPerCta * kWarp, 0, st, x, sx, w, sw, y, sy, M, N, K, static_cast<const T*>(aux),
                saux, ep);
}

// Which kernel: the caller's choice (kernel 1: CUDA cores, 2: tensor cores; the GPU tests force each), else
// (kernel 0) GEMMA4RT_GEMV_MMA=1 the tensor-core kernel for every row count, =0 the CUDA-core kernel;
// by default the CUDA-core kernel for 1-2 rows (H200, M = 1: E2B LM head 179 vs 197 µs, 31B gate/up 106 vs
// 121 µs; batch-1 decode 26B-A4B 4.37 vs 4.95 ms) and the tensor-core kernel for 3-8 (M = 4: E2B LM head 200
// vs 294 µs, 31B down 66 vs 123 µs; speculative decoding with 3 drafts, 31B 22.2 vs 28.3 ms a step).
// With =1 a row's result never depends on the row count (speculative verification rows then get the
// projections of single-row decode steps bit for bit). Read at each launch (a getenv is far below a
// launch's cost, and graph replays do not launch), so that a test can compare the kernels in one process.
inline bool gemv_use_mma(int M, int kernel) {
  static const bool sm80 = [] {
    int dev = 0, major = 0;
    return cudaGetDevice(&dev) == cudaSuccess &&
           cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major >= 8;
  }();
  if (!sm80 || kernel == 1) return false;
  if (kernel == 2) return true;
  const char* e = std::getenv("GEMMA4RT_GEMV_MMA");
  if (e && std::strcmp(e, "0") == 0) return false;
  if (e && std::strcmp(e, "1") == 0) return true;
  return M >= 3;
}
#endif

// The preload (MR = 1: batch-1 decode) keeps 8 weight vectors a lane in registers, 4 a row with GLU.
template <typename T, int MR>
cudaError_t run(const void* x, int64_t sx, const void* w, int64_t sw, void* y, int64_t sy, int N, int K, bool glu,
                bool w_static, const void* aux, int64_t saux, const GemvNorm& ep, cudaStream_t st) {
  const unsigned blocks = (unsigned)((N + kWarpsPerCta - 1) / kWarpsPerCta);
  auto kern = glu ? gemv_kernel<T, MR, true, 0> : gemv_kernel<T, MR, false, 0>;
  if constexpr (MR == 1) {
    if (preload_enabled(w_static)) {
      if (glu && fits_one_wave<gemv_kernel<T, 1, true, 4>>(blocks)) kern = gemv_kernel<T, 1, true, 4>;
      if (!glu && fits_one_wave<gemv_kernel<T, 1, false, 8>>(blocks)) kern = gemv_kernel<T, 1, false, 8>;
    }
  }
  return launch(kern, blocks, kWarpsPerCta * kWarp, 0, st, x, sx, w, sw, y, sy, N, K, static_cast<const T*>(aux),
                saux, ep);
}

template <typename T>
cudaError_t dispatch(int M, const void* x, int64_t sx, const void* w, int64_t sw, void* y, int64_t sy, int N,
                     int K, bool glu, int kernel, const void* aux, int64_t saux, const GemvNorm& ep,
                     cudaStream_t st) {
  const bool ws = (kernel & kGemvWStatic) != 0;
  kernel &= 3;
#ifndef G4_ROCM
  if (M >= 1 && M <= 8 && gemv_use_mma(M, kernel))
    return glu ? run_mma<T, true>(M, x, sx, w, sw, y, sy, N, K, ws, nullptr, 0, ep, st)
               : run_mma<T, false>(M, x, sx, w, sw, y, sy, N, K, ws, aux, saux, ep, st);
#else
  (void)kernel;    // ROCm: the CUDA-core kernel only
#endif
  switch (M) {
    case 1: return run<T, 1>(x, sx, w, sw, y, sy, N, K, glu, ws, aux, saux, ep, st);
    case 2: return run<T, 2>(x, sx, w, sw, y, sy, N, K, glu, ws, aux, saux, ep, st);
    case 3: return run<T, 3>(x, sx, w, sw, y, sy, N, K, glu, ws, aux, saux, ep, st);
    case 4: return run<T, 4>(x, sx, w, sw, y, sy, N, K, glu, ws, aux, saux, ep, st);
    case 5: return run<T, 5>(x, sx, w, sw, y, sy, N, K, glu, ws, aux, saux, ep, st);
    case 6: return run<T, 6>(x, sx, w, sw, y, sy, N, K, glu, ws, aux, saux, ep, st);
    case 7: return run<T, 7>(x, sx, w, sw, y, sy, N, K, glu, ws, aux, saux, ep, st);
    case 8: return run<T, 8>(x, sx, w, sw, y, sy, N, K, glu, ws, aux, saux, ep, st);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_gemv(int dtype, int M, const void* x, int64_t sx, const void* w, int64_t sw, void* y, int64_t sy,
                        int N, int K, bool glu, int kernel, cudaStream_t st, const void* aux, int64_t saux,
                        const GemvNorm& norm) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (K % 8 != 0 || sx % 8 != 0 || sw % 8 != 0 || !aligned16(x) || !aligned16(w)) return cudaErrorInvalidValue;
  if ((glu && aux) || (norm.counter && (glu || aux))) return cudaErrorInvalidValue;       // one epilogue
  // the norm tail reads y, res and writes h, normed in 16-byte vectors, as the norm kernel's vector path
  if (norm.has_qkv && (!norm.counter || norm.qkv.D % 64 != 0 || norm.qkv.D > 512 || norm.qkv.D <= 128 ||
                       norm.qkv.T != M || N != norm.qkv_heads * norm.qkv.D ||
                       (norm.qkv_heads != norm.qkv.H + norm.qkv.KVH && norm.qkv_heads != norm.qkv.H + 2 * norm.qkv.KVH)))
    return cudaErrorInvalidValue;
  if (norm.counter && !norm.has_qkv && (N % 8 != 0 || sy % 8 != 0 || norm.sres % 8 != 0 || norm.sh % 8 != 0 ||
                       (norm.w2 && norm.sn % 8 != 0) || !aligned16(y) || !aligned16(norm.res) ||
                       !aligned16(norm.h) || (norm.w2 && !aligned16(norm.normed)) || norm.nt < 32 || norm.nt > 1024 ||
                       norm.nt != norm_threads(N, true, 8)))
    return cudaErrorInvalidValue;
  // normed3 / normed4 come with their weights, after normed's (w2) and in order, 16-byte aligned as normed
  if (norm.counter && ((!norm.w3 != !norm.normed3) || (!norm.w4 != !norm.normed4) || (norm.w3 && !norm.w2) ||
                       (norm.w4 && !norm.w3) || (norm.normed3 && !aligned16(norm.normed3)) ||
                       (norm.normed4 && !aligned16(norm.normed4))))
    return cudaErrorInvalidValue;
  G4_DISPATCH_HALF(dtype, T, return dispatch<T>(M, x, sx, w, sw, y, sy, N, K, glu, kernel, aux, saux, norm, st));
  return cudaSuccess;
}

}  // namespace g4

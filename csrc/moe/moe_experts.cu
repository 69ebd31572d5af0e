// MoE experts as grouped GEMMs over expert-sorted row tiles (from moe_align):
//   up   : h[row]  = gelu_tanh(x[tok] Gₑᵀ) ⊙ (x[tok] Uₑᵀ)        (gate and up in one pass over Wₑ)
//   down : y[t·k+j] = w[t,j] · (h[row] Dₑᵀ)                       (fp32)
//   sum  : out[t]  = Σ_j y[t·k+j]
// Only tiles of experts that received tokens run, so a small batch streams only the active
// experts' weights. mma.sync m16n8k16 with a 3-stage cp.async pipeline; BM = 16 (small batch,
// weight-streaming) or 64 rows per tile.
#include "common/mma.cuh"
#include "common/launchers.h"

namespace g4 {
namespace {

constexpr int BK = 64, STAGES = 3, NTHR = 128;

__device__ __forceinline__ void ldsm_x2(uint32_t& r0, uint32_t& r1, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r0), "=r"(r1) : "r"(smem_u32(p)));
}

// DUAL: W rows [n0, n0+BN) of gate and [N + n0, …) of up (N = I); epilogue gelu·mul -> hbuf.
// !DUAL: A = hbuf rows, W = down[e] (N = d); epilogue × routing weight -> ybuf (fp32).
template <typename T, int BM, int BN, bool DUAL>
__global__ void __launch_bounds__(NTHR)
expert_gemm(const T* __restrict__ A, int64_t sa, const T* __restrict__ W, int64_t w_expert_stride,
            const int32_t* __restrict__ sorted, const int32_t* __restrict__ tile_expert,
            const int32_t* __restrict__ num_tiles, int k_top, int N, int K, const float* __restrict__ rw,
            T* __restrict__ hbuf, float* __restrict__ ybuf) {
  pdl_wait();     // see common.cuh: before any read of an earlier kernel's output
  pdl_trigger();
  constexpr int WMW = BM == 16 ? 1 : 2, WNW = 4 / WMW;  // warp grid
  constexpr int MT = BM / 16 / WMW, NTW = BN / 8 / WNW;   // m16 / n8 tiles per warp
  constexpr int WROWS = DUAL ? 2 * BN : BN;
  static_assert(NTW >= 1, "BN too small");
  const int tile = blockIdx.y;
  if (tile >= num_tiles[0]) return;
  const int e = tile_expert[tile];
  const int n0 = blockIdx.x * BN;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* As = reinterpret_cast<T*>(smem_raw);
  T* Ws = As + STAGES * BM * BK;
  const T* We = W + (int64_t)e * w_expert_stride;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wm = warp % WMW, wn = warp / WMW;
  const int g = lane / 4, t4 = lane % 4;

  // A row sources for this tile (DUAL: gathered tokens; down: contiguous hbuf rows)
  auto load_stage = [&](int kt, int s) {
    const int kbase = kt * BK;
    T* as = As + s * BM * BK;
    T* ws = Ws + s * WROWS * BK;
    for (int id = tid; id < BM * (BK / 8); id += NTHR) {
      const int r = id / (BK / 8), c = id % (BK / 8);
      const int row = tile * BM + r;
      const int kk = kbase + c * 8;
      const T* src;
      bool ok = kk < K;
      if (DUAL) {
        const int ent = sorted[row];
        ok = ok && ent >= 0;
        src = A + (int64_t)(ent >= 0 ? ent / k_top : 0) * sa + (ok ? kk : 0);
      } else {
        src = A + (int64_t)row * sa + (ok ? kk : 0);
      }
      cp_async16(as + swz<BK>(r, c * 8), src, ok);
    }
    for (int id = tid; id < WROWS * (BK / 8); id += NTHR) {
      const int r = id / (BK / 8), c = id % (BK / 8);
      const int kk = kbase + c * 8;
      const int n = n0 + (DUAL ? (r % BN) : r);
      const bool ok = kk < K && n < N;
      const int64_t wrow = DUAL ? (r < BN ? n : N + n) : n;
      cp_async16(ws + swz<BK>(r, c * 8), We + (ok ? wrow * K + kk : 0), ok);
    }
  };

  float acc[MT][NTW][4];
  float acc2[DUAL ? MT : 1][DUAL ? NTW : 1][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NTW; ++j)
#pragma unroll
      for (int x = 0; x < 4; ++x) { acc[i][j][x] = 0.f; if (DUAL) acc2[i][j][x] = 0.f; }

  const int KT = (K + BK - 1) / BK;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    if (kt + STAGES - 1 < KT) load_stage(kt + STAGES - 1, (kt + STAGES - 1) % STAGES);
    cp_async_commit();
    const T* as = As + (kt % STAGES) * BM * BK;
    const T* ws = Ws + (kt % STAGES) * WROWS * BK;
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        ldsm_x4(a[mt], as + swz<BK>((wm * MT + mt) * 16 + (lane % 16), kk * 16 + (lane / 16) * 8));
#pragma unroll
      for (int nt = 0; nt < NTW; ++nt) {
        const int nr = (wn * NTW + nt) * 8 + (lane % 8);
        const int kc = kk * 16 + ((lane / 8) % 2) * 8;
        uint32_t b0, b1;
        ldsm_x2(b0, b1, ws + swz<BK>(nr, kc));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) Mma<T>::run(acc[mt][nt], a[mt], b0, b1);
        if (DUAL) {
          uint32_t c0, c1;
          ldsm_x2(c0, c1, ws + swz<BK>(BN + nr, kc));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) Mma<T>::run(acc2[mt][nt], a[mt], c0, c1);
        }
      }
    }
  }
  cp_async_wait<0>();
  // epilogue
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = tile * BM + (wm * MT + mt) * 16 + g + h * 8;
      const int ent = sorted[row];
      const float w = (!DUAL && ent >= 0) ? rw[ent] : 0.f;
#pragma unroll
      for (int nt = 0; nt < NTW; ++nt)
#pragma unroll
        for (int x = 0; x < 2; ++x) {
          const int n = n0 + (wn * NTW + nt) * 8 + 2 * t4 + x;
          if (n >= N) continue;
          const float v = acc[mt][nt][2 * h + x];
          if (DUAL) {
            const float u = acc2[mt][nt][2 * h + x];
            hbuf[(int64_t)row * N + n] = from_f<T>(gelu_tanh(v) * u);
          } else if (ent >= 0) {
            ybuf[(int64_t)ent * N + n] = w * v;
          }
        }
    }
}

template <typename T>
__global__ void combine_kernel(const float* __restrict__ y, T* __restrict__ out, int64_t so, int64_t T_, int k, int d) {
  pdl_wait();     // see common.cuh: before any read of an earlier kernel's output
  pdl_trigger();
  const int64_t total = T_ * (d / 4);
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t t = i / (d / 4);
    const int n = (int)(i % (d / 4)) * 4;
    float a[4] = {0.f, 0.f, 0.f, 0.f};
    for (int j = 0; j < k; ++j) {
      const float4 v = *reinterpret_cast<const float4*>(y + (t * k + j) * d + n);
      a[0] += v.x; a[1] += v.y; a[2] += v.z; a[3] += v.w;
    }
#pragma unroll
    for (int x = 0; x < 4; ++x) out[t * so + n + x] = from_f<T>(a[x]);
  }
}

// Entry mode (block_m == 1; the default up to 32 entries, GEMMA4RT_MOE_GEMV=0 turns it off): for a few tokens,
// no tile alignment at all (H200, 26B-A4B, one token: 32.5 µs a layer against 57.9 through the tiles).
// Each (token, slot) entry is one skinny GEMV against its expert's weights, one warp per output column
// streaming the weight row in 16-byte vectors (two in flight per lane, as csrc/gemm/gemv.cu), the input row
// from L1/L2: up writes h[entry] = gelu_tanh(x[token] Gᵀ) ⊙ (x[token] Uᵀ), down writes
// y[entry] = w[entry] · (h[entry] Dᵀ) in fp32; the combine kernel sums the slots. Skips the align launch
// and reaches every SM at one token (the tile kernels run 176 + 352 CTAs there). An expert chosen by two
// tokens is read twice: for small batches only.
constexpr int kGemvWarps = 8;

template <typename T, bool DUAL>
__global__ void __launch_bounds__(kGemvWarps * 32)
entry_gemv(const T* __restrict__ A, int64_t sa, const int32_t* __restrict__ ids, int k_top, const T* __restrict__ W,
           int64_t w_expert_stride, int E, int N, int K, const float* __restrict__ rw, T* __restrict__ hbuf,
           float* __restrict__ ybuf) {
  pdl_wait();     // see common.cuh
  pdl_trigger();
  const int ent = blockIdx.y;
  const int n = blockIdx.x * kGemvWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (n >= N) return;
  const int e = ids[ent];
  if (e < 0 || e >= E) {              // not routed (cannot come from moe_route): contributes nothing
    if (lane == 0) {
      if (DUAL) hbuf[(int64_t)ent * N + n] = from_f<T>(0.f);
      else ybuf[(int64_t)ent * N + n] = 0.f;
    }
    return;
  }
  const T* a = A + (DUAL ? (int64_t)(ent / k_top) * sa : (int64_t)ent * sa);
  const T* We = W + (int64_t)e * w_expert_stride;
  constexpr int NR = DUAL ? 2 : 1;     // gate row n and up row N + n
  const T* wr[NR];
#pragma unroll
  for (int r = 0; r < NR; ++r) wr[r] = We + (int64_t)(n + r * N) * K;
  float acc[NR];
#pragma unroll
  for (int r = 0; r < NR; ++r) acc[r] = 0.f;
  constexpr int V = 8, STEP = 32 * V;
  auto fma_vec = [&](const Vec16<T> (&wv)[NR], int kk) {
    const Vec16<T> av = ld16(a + kk);
#pragma unroll
    for (int r = 0; r < NR; ++r)
#pragma unroll
      for (int j = 0; j < V; ++j) acc[r] += to_f(wv[r].v[j]) * to_f(av.v[j]);
  };
  int kk = lane * V;
  for (; kk + STEP < K; kk += 2 * STEP) {
    Vec16<T> w0[NR], w1[NR];
#pragma unroll
    for (int r = 0; r < NR; ++r) { w0[r] = ld16(wr[r] + kk); w1[r] = ld16(wr[r] + kk + STEP); }
    fma_vec(w0, kk);
    fma_vec(w1, kk + STEP);
  }
  if (kk < K) {
    Vec16<T> w0[NR];
#pragma unroll
    for (int r = 0; r < NR; ++r) w0[r] = ld16(wr[r] + kk);
    fma_vec(w0, kk);
  }
  float s[NR];
#pragma unroll
  for (int r = 0; r < NR; ++r) s[r] = warp_sum(acc[r]);
  if (lane == 0) {
    if (DUAL) hbuf[(int64_t)ent * N + n] = from_f<T>(gelu_tanh(s[0]) * s[1]);   // as expert_gemm's epilogue
    else ybuf[(int64_t)ent * N + n] = rw[ent] * s[0];
  }
}

template <typename T>
cudaError_t run_entries(const void* x, int64_t sx, const void* gate_up, const void* down, const float* weights,
                        const int32_t* ids, void* hbuf, float* ybuf, void* out, int64_t so, int64_t T_, int k, int E,
                        int d, int I, cudaStream_t st) {
  const unsigned entries = (unsigned)(T_ * k);
  cudaError_t e = launch(entry_gemv<T, true>, dim3((I + kGemvWarps - 1) / kGemvWarps, entries), kGemvWarps * 32, 0,
                         st, (const T*)x, sx, ids, k, (const T*)gate_up, (int64_t)2 * I * d, E, I, d,
                         (const float*)nullptr, (T*)hbuf, (float*)nullptr);
  if (e != cudaSuccess) return e;
  e = launch(entry_gemv<T, false>, dim3((d + kGemvWarps - 1) / kGemvWarps, entries), kGemvWarps * 32, 0, st,
             (const T*)hbuf, (int64_t)I, ids, k, (const T*)down, (int64_t)d * I, E, d, I, weights, (T*)nullptr, ybuf);
  if (e != cudaSuccess) return e;
  const int64_t work = T_ * (d / 4);
  const unsigned blocks = (unsigned)std::min<int64_t>((work + 255) / 256, 132 * 8);
  return launch(combine_kernel<T>, blocks, 256, 0, st, ybuf, out, so, T_, k, d);
}

template <typename T, int BM, int BN, bool DUAL>
cudaError_t gemm(dim3 grid, cudaStream_t st, const T* A, int64_t sa, const T* W, int64_t wes, const int32_t* sorted,
                 const int32_t* te, const int32_t* nt, int k, int N, int K, const float* rw, T* hbuf, float* ybuf) {
  constexpr int WROWS = DUAL ? 2 * BN : BN;
  constexpr int SMEM = STAGES * (BM + WROWS) * BK * 2;
  auto kern = expert_gemm<T, BM, BN, DUAL>;
  cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM);
  if (e != cudaSuccess) return e;
  return launch(kern, grid, NTHR, SMEM, st, A, sa, W, wes, sorted, te, nt, k, N, K, rw, hbuf, ybuf);
}

template <typename T, int BM>
cudaError_t run(const void* x, int64_t sx, const void* gate_up, const void* down, const float* weights,
                const int32_t* sorted, const int32_t* te, const int32_t* ntiles, int cap_tiles, void* hbuf,
                float* ybuf, void* out, int64_t so, int64_t T_, int k, int d, int I, cudaStream_t st) {
  constexpr int BN_UP = BM == 16 ? 32 : 64, BN_DN = 64;
  cudaError_t e = gemm<T, BM, BN_UP, true>(dim3((I + BN_UP - 1) / BN_UP, cap_tiles), st, (const T*)x, sx,
                                           (const T*)gate_up, (int64_t)2 * I * d, sorted, te, ntiles, k, I, d,
                                           nullptr, (T*)hbuf, nullptr);
  if (e != cudaSuccess) return e;
  e = gemm<T, BM, BN_DN, false>(dim3((d + BN_DN - 1) / BN_DN, cap_tiles), st, (const T*)hbuf, I,
                                (const T*)down, (int64_t)d * I, sorted, te, ntiles, k, d, I, weights, nullptr, ybuf);
  if (e != cudaSuccess) return e;
  const int64_t work = T_ * (d / 4);
  const unsigned blocks = (unsigned)std::min<int64_t>((work + 255) / 256, 132 * 8);
  return launch(combine_kernel<T>, blocks, 256, 0, st, ybuf, out, so, T_, k, d);
}

}  // namespace

cudaError_t launch_moe_experts(int dtype, const void* x, int64_t sx, const void* gate_up, const void* down,
                               const float* weights, const int32_t* sorted, const int32_t* tile_expert,
                               const int32_t* num_tiles, int cap_tiles, int BM, void* hbuf, float* ybuf, void* out,
                               int64_t so, int64_t T_, int k, int E, int d, int I, cudaStream_t st) {
  if (T_ == 0) return cudaSuccess;
  if (d % 8 != 0 || I % 8 != 0 || sx % 8 != 0 || !aligned16(x)) return cudaErrorInvalidValue;
  if (BM == 1) {      // entry mode: `sorted` holds the routing ids [T, k]; tile_expert / num_tiles unused
    if (T_ * k > 65535) return cudaErrorInvalidValue;
    if (dtype == kBF16) return run_entries<__nv_bfloat16>(x, sx, gate_up, down, weights, sorted, hbuf, ybuf, out,
                                                          so, T_, k, E, d, I, st);
    if (dtype == kF16) return run_entries<__half>(x, sx, gate_up, down, weights, sorted, hbuf, ybuf, out, so, T_, k,
                                                  E, d, I, st);
    return cudaErrorInvalidValue;
  }
  if (cap_tiles == 0) return cudaSuccess;
#define G4_MOE(T)                                                                                           \
  if (BM == 16) return run<T, 16>(x, sx, gate_up, down, weights, sorted, tile_expert, num_tiles, cap_tiles, \
                                  hbuf, ybuf, out, so, T_, k, d, I, st);                                    \
  if (BM == 64) return run<T, 64>(x, sx, gate_up, down, weights, sorted, tile_expert, num_tiles, cap_tiles, \
                                  hbuf, ybuf, out, so, T_, k, d, I, st);                                    \
  return cudaErrorInvalidValue;
  if (dtype == kBF16) { G4_MOE(__nv_bfloat16) }
  if (dtype == kF16) { G4_MOE(__half) }
#undef G4_MOE
  return cudaErrorInvalidValue;
}

}  // namespace g4

// Skinny GEMM for decode: y[m, n] = Σ_k x[m, k] · W[n, k] for 1–8 rows of x (W in the checkpoint's
// [out, in] layout). cuBLAS reads a weight at ~40% of the copy rate at one row; here one warp owns one
// output column n, its lanes stream W's row n in 16-byte vectors (two in flight per lane) and reuse each
// vector for every row of x (x stays in L1/L2), fp32 accumulation, a warp reduction at the end.
#include <cstdlib>
#include <cstring>

#include "common/common.cuh"
#include "common/launchers.h"

namespace g4 {
namespace {

constexpr int kWarpsPerCta = 8;

template <typename T, int MR, bool GLU>
__global__ void __launch_bounds__(kWarpsPerCta * kWarp)
gemv_kernel(const T* __restrict__ x, int64_t sx, const T* __restrict__ w, int64_t sw, T* __restrict__ y,
            int64_t sy, int N, int K) {
  pdl_wait();     // see common.cuh
  pdl_trigger();
  const int n = blockIdx.x * kWarpsPerCta + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (n >= N) return;
  constexpr int NR = GLU ? 2 : 1;      // weight rows per warp: n, and with GLU the up row n + N
  const T* wr[NR];
#pragma unroll
  for (int r = 0; r < NR; ++r) wr[r] = w + (int64_t)(n + r * N) * sw;
  float acc[NR][MR];
#pragma unroll
  for (int r = 0; r < NR; ++r)
#pragma unroll
    for (int m = 0; m < MR; ++m) acc[r][m] = 0.f;
  constexpr int V = 8;                 // elements per 16-byte vector
  constexpr int STEP = kWarp * V;      // elements per warp-wide vector load
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
  // Two weight vectors per row in flight per lane. Measured on an H200 against four in flight, an L2
  // prefetch of the row before pdl_wait(), and both: this simplest form was fastest (the 805 MB E2B LM
  // head in 178 µs = 4.5 TB/s vs 182 / 203 / 205 µs; E2B batch-1 decode 3.66 vs 3.88 / 4.08 / 3.97 ms).
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
        y[m * sy + n] = from_f<T>(s[0]);
      }
    }
  }
}

// Several rows of x (2-8: speculative verification, small decode batches): the kernel above reads each x
// vector once per weight vector and row from L1, MR times the weight traffic, and converts it MR times
// (H200, 31B: 4 rows cost 1.75x one row). Here one warp owns NC output columns, so each x vector it loads
// and converts serves NC weight rows, and NC (x2 with GLU) weight vectors are in flight per lane. The
// per-lane order of the additions is the kernel above's, so the results are bit-identical.
// Experimental, off unless GEMMA4RT_GEMV_COLS=1 (not yet measured on a GPU).
template <typename T, int MR, bool GLU, int NC>
__global__ void __launch_bounds__(kWarpsPerCta * kWarp)
gemv_cols_kernel(const T* __restrict__ x, int64_t sx, const T* __restrict__ w, int64_t sw, T* __restrict__ y,
                 int64_t sy, int N, int K) {
  pdl_wait();
  pdl_trigger();
  const int n0 = (blockIdx.x * kWarpsPerCta + threadIdx.x / kWarp) * NC;
  const int lane = threadIdx.x % kWarp;
  if (n0 >= N) return;
  constexpr int NR = GLU ? 2 : 1;
  constexpr int R = NC * NR;           // weight rows per warp: column c's row (and its up row) at c * NR + r
  const T* wr[R];
#pragma unroll
  for (int c = 0; c < NC; ++c)
#pragma unroll
    for (int r = 0; r < NR; ++r)       // a column past N reads column N - 1 and stores nothing
      wr[c * NR + r] = w + (int64_t)(min(n0 + c, N - 1) + r * N) * sw;
  float acc[R][MR];
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int m = 0; m < MR; ++m) acc[i][m] = 0.f;
  constexpr int V = 8;
  constexpr int STEP = kWarp * V;
  for (int k = lane * V; k < K; k += STEP) {
    Vec16<T> wv[R];
#pragma unroll
    for (int i = 0; i < R; ++i) wv[i] = ld16(wr[i] + k);
#pragma unroll
    for (int m = 0; m < MR; ++m) {
      const Vec16<T> xv = ld16(x + m * sx + k);
      float xf[V];
#pragma unroll
      for (int j = 0; j < V; ++j) xf[j] = to_f(xv.v[j]);
#pragma unroll
      for (int i = 0; i < R; ++i)
#pragma unroll
        for (int j = 0; j < V; ++j) acc[i][m] += to_f(wv[i].v[j]) * xf[j];
    }
  }
#pragma unroll
  for (int m = 0; m < MR; ++m) {
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      float s[NR];
#pragma unroll
      for (int r = 0; r < NR; ++r) s[r] = warp_sum(acc[c * NR + r][m]);
      if (lane == (m * NC + c) % kWarp && n0 + c < N) {
        if constexpr (GLU) {
          const float g = to_f(from_f<T>(s[0])), u = to_f(from_f<T>(s[1]));
          y[m * sy + n0 + c] = from_f<T>(gelu_tanh(g) * u);
        } else {
          y[m * sy + n0 + c] = from_f<T>(s[0]);
        }
      }
    }
  }
}

// GEMMA4RT_GEMV_COLS=1: rows 2-8 through gemv_cols_kernel. Read at each launch (a getenv is far below a
// launch's cost, and graph replays do not launch), so that a test can compare both kernels in one process.
inline bool gemv_cols_enabled() {
  const char* e = std::getenv("GEMMA4RT_GEMV_COLS");
  return e && std::strcmp(e, "1") == 0;
}

template <typename T, int MR>
cudaError_t run(const void* x, int64_t sx, const void* w, int64_t sw, void* y, int64_t sy, int N, int K, bool glu,
                cudaStream_t st) {
  if constexpr (MR >= 2) {
    if (gemv_cols_enabled()) {
      // four weight rows per warp at most (with GLU two columns of gate + up): up to ~100 registers
      constexpr int NC = MR == 2 ? 2 : 4;
      const int nc = glu ? 2 : NC;
      const unsigned blocks = (unsigned)((N + kWarpsPerCta * nc - 1) / (kWarpsPerCta * nc));
      return launch(glu ? gemv_cols_kernel<T, MR, true, 2> : gemv_cols_kernel<T, MR, false, NC>, blocks,
                    kWarpsPerCta * kWarp, 0, st, x, sx, w, sw, y, sy, N, K);
    }
  }
  const unsigned blocks = (unsigned)((N + kWarpsPerCta - 1) / kWarpsPerCta);
  return launch(glu ? gemv_kernel<T, MR, true> : gemv_kernel<T, MR, false>, blocks, kWarpsPerCta * kWarp, 0, st, x,
                sx, w, sw, y, sy, N, K);
}

template <typename T>
cudaError_t dispatch(int M, const void* x, int64_t sx, const void* w, int64_t sw, void* y, int64_t sy, int N,
                     int K, bool glu, cudaStream_t st) {
  switch (M) {
    case 1: return run<T, 1>(x, sx, w, sw, y, sy, N, K, glu, st);
    case 2: return run<T, 2>(x, sx, w, sw, y, sy, N, K, glu, st);
    case 3: return run<T, 3>(x, sx, w, sw, y, sy, N, K, glu, st);
    case 4: return run<T, 4>(x, sx, w, sw, y, sy, N, K, glu, st);
    case 5: return run<T, 5>(x, sx, w, sw, y, sy, N, K, glu, st);
    case 6: return run<T, 6>(x, sx, w, sw, y, sy, N, K, glu, st);
    case 7: return run<T, 7>(x, sx, w, sw, y, sy, N, K, glu, st);
    case 8: return run<T, 8>(x, sx, w, sw, y, sy, N, K, glu, st);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_gemv(int dtype, int M, const void* x, int64_t sx, const void* w, int64_t sw, void* y, int64_t sy,
                        int N, int K, bool glu, cudaStream_t st) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (K % 8 != 0 || sx % 8 != 0 || sw % 8 != 0 || !aligned16(x) || !aligned16(w)) return cudaErrorInvalidValue;
  G4_DISPATCH_HALF(dtype, T, return dispatch<T>(M, x, sx, w, sw, y, sy, N, K, glu, st));
  return cudaSuccess;
}

}  // namespace g4

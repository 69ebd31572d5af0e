// Skinny GEMM for decode: y[m, n] = Σ_k x[m, k] · W[n, k] for 1–8 rows of x (W in the checkpoint's
// [out, in] layout). cuBLAS reads a weight at ~40% of the copy rate at one row; here one warp owns one
// output column n, its lanes stream W's row n in 16-byte vectors (two in flight per lane) and reuse each
// vector for every row of x (x stays in L1/L2), fp32 accumulation, a warp reduction at the end.
#include "common/common.cuh"
#include "common/launchers.h"

namespace g4 {
namespace {

constexpr int kWarpsPerCta = 8;

template <typename T, int MR>
__global__ void __launch_bounds__(kWarpsPerCta * 32)
gemv_kernel(const T* __restrict__ x, int64_t sx, const T* __restrict__ w, int64_t sw, T* __restrict__ y,
            int64_t sy, int N, int K) {
  const int n = blockIdx.x * kWarpsPerCta + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (n >= N) return;
  const T* wr = w + (int64_t)n * sw;
  float acc[MR];
#pragma unroll
  for (int m = 0; m < MR; ++m) acc[m] = 0.f;
  constexpr int V = 8;                 // elements per 16-byte vector
  constexpr int STEP = 32 * V;         // elements per warp-wide vector load
  auto fma_vec = [&](const Vec16<T>& wv, int k) {
#pragma unroll
    for (int m = 0; m < MR; ++m) {
      const Vec16<T> xv = ld16(x + m * sx + k);
#pragma unroll
      for (int j = 0; j < V; ++j) acc[m] += to_f(wv.v[j]) * to_f(xv.v[j]);
    }
  };
  int k = lane * V;
  for (; k + STEP < K; k += 2 * STEP) {          // two weight vectors in flight per lane
    const Vec16<T> w0 = ld16(wr + k), w1 = ld16(wr + k + STEP);
    fma_vec(w0, k);
    fma_vec(w1, k + STEP);
  }
  if (k < K) fma_vec(ld16(wr + k), k);
#pragma unroll
  for (int m = 0; m < MR; ++m) {
    const float s = warp_sum(acc[m]);
    if (lane == m) y[m * sy + n] = from_f<T>(s);
  }
}

template <typename T, int MR>
cudaError_t run(const void* x, int64_t sx, const void* w, int64_t sw, void* y, int64_t sy, int N, int K,
                cudaStream_t st) {
  const unsigned blocks = (unsigned)((N + kWarpsPerCta - 1) / kWarpsPerCta);
  gemv_kernel<T, MR><<<blocks, kWarpsPerCta * 32, 0, st>>>((const T*)x, sx, (const T*)w, sw, (T*)y, sy, N, K);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch(int M, const void* x, int64_t sx, const void* w, int64_t sw, void* y, int64_t sy, int N,
                     int K, cudaStream_t st) {
  switch (M) {
    case 1: return run<T, 1>(x, sx, w, sw, y, sy, N, K, st);
    case 2: return run<T, 2>(x, sx, w, sw, y, sy, N, K, st);
    case 3: return run<T, 3>(x, sx, w, sw, y, sy, N, K, st);
    case 4: return run<T, 4>(x, sx, w, sw, y, sy, N, K, st);
    case 5: return run<T, 5>(x, sx, w, sw, y, sy, N, K, st);
    case 6: return run<T, 6>(x, sx, w, sw, y, sy, N, K, st);
    case 7: return run<T, 7>(x, sx, w, sw, y, sy, N, K, st);
    case 8: return run<T, 8>(x, sx, w, sw, y, sy, N, K, st);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_gemv(int dtype, int M, const void* x, int64_t sx, const void* w, int64_t sw, void* y, int64_t sy,
                        int N, int K, cudaStream_t st) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (K % 8 != 0 || sx % 8 != 0 || sw % 8 != 0 || !aligned16(x) || !aligned16(w)) return cudaErrorInvalidValue;
  G4_DISPATCH_HALF(dtype, T, return dispatch<T>(M, x, sx, w, sw, y, sy, N, K, st));
  return cudaSuccess;
}

}  // namespace g4

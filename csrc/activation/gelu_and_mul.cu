// gelu_tanh(gate) · up, fp32 inside: over x = [gate | up] rows, or over separate gate and up
// tensors (the per-layer-input gate of E2B/E4B). 16-byte accesses when aligned.
#include "common/common.cuh"
#include "common/launchers.h"

namespace g4 {
namespace {

template <typename T, int VEC>
__global__ void gelu_mul_kernel(const T* __restrict__ x, int64_t sx, const T* __restrict__ u, int64_t su,
                                T* __restrict__ y, int64_t sy, int64_t rows, int I) {
  pdl_wait();     // see common.cuh: before any read of an earlier kernel's output
  pdl_trigger();
  const int64_t per_row = I / VEC;
  const int64_t total = rows * per_row;
  for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = idx / per_row;
    const int c = (int)(idx % per_row) * VEC;
    const T* g = x + r * sx + c;
    const T* up = u + r * su + c;
    T gv[VEC], uv[VEC], o[VEC];
    if constexpr (VEC * sizeof(T) == 16) {
      *reinterpret_cast<uint4*>(gv) = *reinterpret_cast<const uint4*>(g);
      *reinterpret_cast<uint4*>(uv) = *reinterpret_cast<const uint4*>(up);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) { gv[j] = g[j]; uv[j] = up[j]; }
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) o[j] = from_f<T>(gelu_tanh(to_f(gv[j])) * to_f(uv[j]));
    if constexpr (VEC * sizeof(T) == 16) {
      *reinterpret_cast<uint4*>(y + r * sy + c) = *reinterpret_cast<const uint4*>(o);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) y[r * sy + c + j] = o[j];
    }
  }
}

template <typename T>
cudaError_t run(const void* x, int64_t sx, const void* u, int64_t su, void* y, int64_t sy, int64_t rows, int I,
                cudaStream_t st) {
  if (rows * I == 0) return cudaSuccess;
  constexpr int V = 16 / sizeof(T);
  const bool vec = I % V == 0 && sx % V == 0 && su % V == 0 && sy % V == 0 && aligned16(x) && aligned16(u) &&
                   aligned16(y);
  const int64_t work = rows * I / (vec ? V : 1);
  const int threads = 256;
  const unsigned blocks = (unsigned)std::min<int64_t>((work + threads - 1) / threads, 132 * 16);
  return launch(vec ? gelu_mul_kernel<T, V> : gelu_mul_kernel<T, 1>, blocks, threads, 0, st, x, sx, u, su, y, sy,
                rows, I);
}

}  // namespace

cudaError_t launch_gelu_tanh_and_mul(int dtype, const void* x, int64_t sx, void* y, int64_t sy,
                                     int64_t rows, int I, cudaStream_t st) {
  G4_DISPATCH_FLOAT(dtype, T, return run<T>(x, sx, static_cast<const T*>(x) + I, sx, y, sy, rows, I, st));
  return cudaSuccess;
}

cudaError_t launch_gelu_tanh_mul(int dtype, const void* gate, int64_t sg, const void* up, int64_t su, void* y,
                                 int64_t sy, int64_t rows, int I, cudaStream_t st) {
  G4_DISPATCH_FLOAT(dtype, T, return run<T>(gate, sg, up, su, y, sy, rows, I, st));
  return cudaSuccess;
}

}  // namespace g4

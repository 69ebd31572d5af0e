// Shared device helpers for gemma4rt kernels: dtype dispatch, vector types, warp-size-generic
// reductions, error checks. Torch-free: kernels take raw pointers + a cudaStream_t.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include "common/launchers.h"

namespace g4 {

// Hardware warp width: 32 on NVIDIA, 64 on CDNA (hipify maps warpSize). Reductions loop over
// kWarp / 2 … 1 instead of a literal 32.
#if defined(USE_ROCM) || defined(__HIP_PLATFORM_AMD__)
constexpr int kWarp = 64;
#else
constexpr int kWarp = 32;
#endif


template <typename T> struct Cvt;
template <> struct Cvt<float> {
  static __device__ __forceinline__ float to_f(float x) { return x; }
  static __device__ __forceinline__ float from_f(float x) { return x; }
};
template <> struct Cvt<__half> {
  static __device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_f(float x) { return __float2half_rn(x); }
};
template <> struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float x) { return __float2bfloat16_rn(x); }
};
template <typename T> __device__ __forceinline__ float to_f(T x) { return Cvt<T>::to_f(x); }
template <typename T> __device__ __forceinline__ T from_f(float x) { return Cvt<T>::from_f(x); }

// 16-byte vector of T (8 halfs / 4 floats).
template <typename T> struct alignas(16) Vec16 {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

template <typename T> __device__ __forceinline__ Vec16<T> ld16(const T* p) {
  Vec16<T> r;
  *reinterpret_cast<uint4*>(&r) = *reinterpret_cast<const uint4*>(p);
  return r;
}
template <typename T> __device__ __forceinline__ void st16(T* p, const Vec16<T>& r) {
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&r);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide sum; `sh` needs blockDim.x / kWarp floats. All threads get the result.
__device__ __forceinline__ float block_sum(float v, float* sh) {
  const int lane = threadIdx.x % kWarp, w = threadIdx.x / kWarp, nw = (blockDim.x + kWarp - 1) / kWarp;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) sh[w] = v;
  __syncthreads();
  float t = 0.f;
  for (int i = 0; i < nw; ++i) t += sh[i];
  return t;
}

__device__ __forceinline__ float gelu_tanh(float x) {
  const float k0 = 0.7978845608028654f, k1 = 0.044715f;
  // tanh(y) = 1 − 2 / (1 + e^{2y}); accurate under --use_fast_math (tanhf becomes tanh.approx there)
  const float y = k0 * (x + k1 * x * x * x);
  const float t = 1.f - 2.f / (1.f + __expf(2.f * y));
  return 0.5f * x * (1.f + t);
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace g4

// Dispatch a kernel template over the element type given a g4::DType value.
#define G4_DISPATCH_FLOAT(DT, T, ...)                          \
  switch (DT) {                                                \
    case g4::kF32: { using T = float; __VA_ARGS__; break; }    \
    case g4::kF16: { using T = __half; __VA_ARGS__; break; }   \
    case g4::kBF16: { using T = __nv_bfloat16; __VA_ARGS__; break; } \
    default: return cudaErrorInvalidValue;                     \
  }

#define G4_DISPATCH_HALF(DT, T, ...)                           \
  switch (DT) {                                                \
    case g4::kF16: { using T = __half; __VA_ARGS__; break; }   \
    case g4::kBF16: { using T = __nv_bfloat16; __VA_ARGS__; break; } \
    default: return cudaErrorInvalidValue;                     \
  }

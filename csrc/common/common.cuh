// Shared device helpers for gemma4rt kernels: dtype dispatch, vector types, warp-size-generic
// reductions, error checks. Torch-free: kernels take raw pointers + a cudaStream_t.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include "common/launchers.h"

namespace g4 {

// Hardware warp width: 32 on NVIDIA, 64 on CDNA (hipify maps warpSize). Reductions loop over
// kWarp / 2 … 1 instead of a literal 32.
#if defined(USE_ROCM) || defined(__HIP_PLATFORM_AMD__)
#define G4_ROCM 1
#endif

#ifdef G4_ROCM
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

// Butterfly shuffle within a warp (a 64-lane wavefront on CDNA, where HIP has no *_sync variants).
template <typename V>
__device__ __forceinline__ V shfl_xor(V v, int o) {
#ifdef G4_ROCM
  return __shfl_xor(v, o);
#else
  return __shfl_xor_sync(0xffffffffu, v, o);
#endif
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += shfl_xor(v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, shfl_xor(v, o));
  return v;
}

// Block-wide sum (MAX = false) or max; `sh` needs blockDim.x / kWarp floats. All threads get the result.
template <bool MAX>
__device__ __forceinline__ float block_reduce(float v, float* sh) {
  const int lane = threadIdx.x % kWarp, w = threadIdx.x / kWarp, nw = (blockDim.x + kWarp - 1) / kWarp;
  v = MAX ? warp_max(v) : warp_sum(v);
  __syncthreads();
  if (lane == 0) sh[w] = v;
  __syncthreads();
  float t = MAX ? -INFINITY : 0.f;
  for (int i = 0; i < nw; ++i) t = MAX ? fmaxf(t, sh[i]) : t + sh[i];
  return t;
}
__device__ __forceinline__ float block_sum(float v, float* sh) { return block_reduce<false>(v, sh); }
__device__ __forceinline__ float block_max(float v, float* sh) { return block_reduce<true>(v, sh); }

__device__ __forceinline__ float gelu_tanh(float x) {
  const float k0 = 0.7978845608028654f, k1 = 0.044715f;
  // tanh(y) = 1 − 2 / (1 + e^{2y}); accurate under --use_fast_math (tanhf becomes tanh.approx there)
  const float y = k0 * (x + k1 * x * x * x);
  const float t = 1.f - 2.f / (1.f + __expf(2.f * y));
  return 0.5f * x * (1.f + t);
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ---- programmatic dependent launch (Hopper and newer) -------------------------------------------
// Every gemma4rt kernel is launched through g4::launch(). On sm_90+ (unless GEMMA4RT_PDL=0) the launch
// may begin while the kernel before it in the stream is still draining, which hides most of the
// ~1 µs gap between back-to-back kernels of a decode step. The contract for every kernel:
//   * pdl_wait() runs in every thread before it reads anything an earlier kernel wrote, and before any
//     early return (a grid whose threads all returned without waiting would let the next kernel run
//     ahead of the one before it);
//   * pdl_trigger() lets the next kernel's blocks be scheduled; until every block of this grid has
//     called it (or exited) the next kernel does not start.
// Without a dependent launch both instructions are no-ops.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && !defined(G4_ROCM)
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && !defined(G4_ROCM)
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// Whether this CTA is the last of `arrivals` CTAs to get here for *counter (a zero int32 that the last one
// resets for the next launch). Every thread of the CTA calls this; the answer is the CTA's. The writes each CTA
// made before calling are then visible to the last one, which reads them through L2 (__ldcg: L1 is not
// coherent across SMs).
__device__ __forceinline__ bool last_arrival(int* counter, int arrivals) {
  __shared__ int s_last;
  __threadfence();            // this thread's writes, before the count says they are there
  __syncthreads();
  if (threadIdx.x == 0) {
    s_last = atomicAdd(counter, 1) == arrivals - 1;
    if (s_last) *counter = 0;
  }
  __syncthreads();
  if (!s_last) return false;
  __threadfence();
  return true;
}

// Whether launches use PDL: compute capability >= 9 on the current device and GEMMA4RT_PDL != "0".
// Read once per process (gemma4rt runs one device per process).
inline bool pdl_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("GEMMA4RT_PDL");
    if (e && std::strcmp(e, "0") == 0) return false;
    int dev = 0, major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return false;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
    return major >= 9;
  }();
  return on;
}

// kern<<<grid, block, smem, st>>>(args...), with the PDL attribute where pdl_enabled().
template <typename... KArgs, typename... Args>
cudaError_t launch(void (*kern)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t st,
                   Args&&... args) {
#ifndef G4_ROCM
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = st;
  cudaLaunchAttribute attr[1];
  if (pdl_enabled()) {
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
  return cudaLaunchKernelEx(&cfg, kern, static_cast<KArgs>(std::forward<Args>(args))...);
#else
  kern<<<grid, block, smem, st>>>(static_cast<KArgs>(std::forward<Args>(args))...);
  return cudaGetLastError();
#endif
}

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

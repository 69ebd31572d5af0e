// RMSNorm family: rms_norm, add_rms_norm (residual add + norm), norm_add_scale (post-FFN norm +
// residual add + layer scalar), norm_add_scale_norm (the same, then the next norm of the new residual
// stream: one launch where a layer's end meets the next norm). One block per row, fp32 math,
// 16-byte accesses when aligned.
#include "common/common.cuh"
#include "common/launchers.h"

namespace g4 {
namespace {

// VEC elements at p: one 16-byte access when VEC elements make 16 bytes, else element by element
template <typename T, int VEC>
__device__ __forceinline__ void ldv(T (&v)[VEC], const T* p) {
  if constexpr (VEC * sizeof(T) == 16) {
    *reinterpret_cast<uint4*>(v) = *reinterpret_cast<const uint4*>(p);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = p[j];
  }
}
template <typename T, int VEC>
__device__ __forceinline__ void stv(T* p, const T (&v)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(v);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) p[j] = v[j];
  }
}

template <typename T, typename S, int VEC>
__global__ void norm_kernel(int mode, const T* __restrict__ x, int64_t sx, const T* __restrict__ res,
                            int64_t sres, const T* __restrict__ w, const S* __restrict__ scale,
                            T* __restrict__ y, int64_t sy, T* res_out, int64_t sres_out, int n,
                            float eps, const T* __restrict__ w2) {
  pdl_wait();     // see common.cuh: before any read of an earlier kernel's output
  pdl_trigger();
  __shared__ float sh[1024 / 32 + 1];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * sx;
  const T* rr = res ? res + row * sres : nullptr;
  T* ro = res_out ? res_out + row * sres_out : nullptr;
  T* yr = y + row * sy;
  // pass 1: sum of squares of the normed input (x, or the rounded residual sum)
  float ss = 0.f;
  for (int i = threadIdx.x * VEC; i < n; i += blockDim.x * VEC) {
    T xv[VEC];
    ldv(xv, xr + i);
    if (mode == 1) {
      T rv[VEC];
      ldv(rv, rr + i);
#pragma unroll
      for (int j = 0; j < VEC; ++j) xv[j] = from_f<T>(to_f(rv[j]) + to_f(xv[j]));
      stv(ro + i, xv);
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) { float f = to_f(xv[j]); ss += f * f; }
  }
  const float inv = rsqrtf(block_sum(ss, sh) / n + eps);
  const float sc = (mode >= 2 && scale) ? to_f(scale[0]) : 1.f;
  T* y1 = mode == 3 ? ro : yr;   // mode 3: the residual stream goes to res_out, its norm to y
  float ss2 = 0.f;
  const T* src = mode == 1 ? ro : xr;
  // pass 2 (row re-read hits L1/L2)
  for (int i = threadIdx.x * VEC; i < n; i += blockDim.x * VEC) {
    T xv[VEC], out[VEC];
    ldv(xv, src + i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float v = to_f(xv[j]) * inv;
      if (w) v *= to_f(w[i + j]);
      T t = from_f<T>(v);
      if (mode >= 2) {
        t = from_f<T>(to_f(rr[i + j]) + to_f(t));
        if (scale) t = from_f<T>(to_f(t) * sc);
        const float f = to_f(t);
        ss2 += f * f;
      }
      out[j] = t;
    }
    stv(y1 + i, out);
  }
  if (mode != 3) return;
  __syncthreads();   // block_sum reuses sh
  const float inv2 = rsqrtf(block_sum(ss2, sh) / n + eps);
  // pass 3: each thread re-reads the elements it wrote itself
  for (int i = threadIdx.x * VEC; i < n; i += blockDim.x * VEC) {
    T xv[VEC], out[VEC];
    ldv(xv, ro + i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float v = to_f(xv[j]) * inv2;
      if (w2) v *= to_f(w2[i + j]);
      out[j] = from_f<T>(v);
    }
    stv(yr + i, out);
  }
}

template <typename T, typename S>
cudaError_t run_norm(int mode, const void* x, int64_t sx, const void* res, int64_t sres, const void* w,
                     const void* scale, void* y, int64_t sy, void* res_out, int64_t sro, int64_t rows,
                     int n, float eps, cudaStream_t st, const void* w2 = nullptr) {
  if (rows == 0) return cudaSuccess;
  constexpr int V = 16 / sizeof(T);
  bool vec = n % V == 0 && sx % V == 0 && sy % V == 0 && aligned16(x) && aligned16(y) &&
             (!res || (sres % V == 0 && aligned16(res))) && (!res_out || (sro % V == 0 && aligned16(res_out)));
  int threads = 64;
  while (threads < 1024 && threads * (vec ? V : 1) * 2 <= n) threads *= 2;
  dim3 grid((unsigned)rows);
  return launch(vec ? norm_kernel<T, S, V> : norm_kernel<T, S, 1>, grid, threads, 0, st, mode, x, sx, res, sres, w,
                scale, y, sy, res_out, sro, n, eps, w2);
}

}  // namespace

cudaError_t launch_norm(int mode, int dtype, const void* x, int64_t sx, const void* res, int64_t sres,
                        const void* w, const void* scale, int scale_dtype, void* y, int64_t sy,
                        void* res_out, int64_t sro, int64_t rows, int n, float eps, cudaStream_t st) {
  // weight shares x's dtype (the wrapper casts); scale is fp32 (scale_dtype kept for the ABI).
  (void)scale_dtype;
  G4_DISPATCH_FLOAT(dtype, T, return (run_norm<T, float>(mode, x, sx, res, sres, w, scale, y, sy, res_out,
                                                     sro, rows, n, eps, st)));
  return cudaSuccess;
}

cudaError_t launch_norm_add_scale_norm(int dtype, const void* x, int64_t sx, const void* res, int64_t sres,
                                       const void* w, const float* scale, const void* w2, void* res_out,
                                       int64_t sro, void* y, int64_t sy, int64_t rows, int n, float eps,
                                       cudaStream_t st) {
  G4_DISPATCH_FLOAT(dtype, T, return (run_norm<T, float>(3, x, sx, res, sres, w, scale, y, sy, res_out, sro,
                                                         rows, n, eps, st, w2)));
  return cudaSuccess;
}

}  // namespace g4

// RMSNorm family: rms_norm, add_rms_norm (residual add + norm), norm_add_scale (post-FFN norm +
// residual add + layer scalar), norm_add_scale_norm (the same, then the next norm of the new residual
// stream: one launch where a layer's end meets the next norm; up to three norms of it with different
// weights, as a MoE block opens), moe_block_end (a MoE block's four norms and two adds). One block per
// row, fp32 math, 16-byte accesses when aligned.
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
                            float eps, const T* __restrict__ w2, const T* __restrict__ w3,
                            const T* __restrict__ w4, T* __restrict__ y3, T* __restrict__ y4) {
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
  // pass 3: each thread re-reads the elements it wrote itself; y (weight w2), and y3 / y4 (weights w3 / w4,
  // the same row stride as y) when given
  T* y3r = y3 ? y3 + row * sy : nullptr;
  T* y4r = y4 ? y4 + row * sy : nullptr;
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
    if (y3r) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[j] = from_f<T>(to_f(xv[j]) * inv2 * to_f(w3[i + j]));
      stv(y3r + i, out);
    }
    if (y4r) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[j] = from_f<T>(to_f(xv[j]) * inv2 * to_f(w4[i + j]));
      stv(y4r + i, out);
    }
  }
}

// The end of a MoE block (26B-A4B), where five launches were: f = rms(m)·w1 + rms(e)·w2 (m the shared
// MLP's output, e the experts'; each term and the sum rounded to T, as rms_norm then norm_add_scale),
// h = (x + rms(f)·w3) · scale -> h (scale fp32, may be null), y = rms(h)·w4. One block per row; the row
// is re-read from L1/L2 in each pass.
template <typename T, int VEC>
__global__ void moe_end_kernel(const T* __restrict__ m, int64_t sm, const T* __restrict__ e, int64_t se,
                               const T* __restrict__ x, int64_t sx, const T* __restrict__ w1,
                               const T* __restrict__ w2, const T* __restrict__ w3, const float* __restrict__ scale,
                               const T* __restrict__ w4, T* __restrict__ h, int64_t shs, T* __restrict__ y,
                               int64_t sy, int n, float eps) {
  pdl_wait();
  pdl_trigger();
  __shared__ float sh[1024 / 32 + 1];
  const int64_t row = blockIdx.x;
  const T* mr = m + row * sm;
  const T* er = e + row * se;
  const T* xr = x + row * sx;
  T* hr = h + row * shs;
  T* yr = y + row * sy;
  float ssm = 0.f, sse = 0.f;
  for (int i = threadIdx.x * VEC; i < n; i += blockDim.x * VEC) {
    T mv[VEC], ev[VEC];
    ldv(mv, mr + i);
    ldv(ev, er + i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float a = to_f(mv[j]), b = to_f(ev[j]);
      ssm += a * a;
      sse += b * b;
    }
  }
  const float inv_m = rsqrtf(block_sum(ssm, sh) / n + eps);
  const float inv_e = rsqrtf(block_sum(sse, sh) / n + eps);
  auto f_vec = [&](int i, T (&fv)[VEC]) {
    T mv[VEC], ev[VEC];
    ldv(mv, mr + i);
    ldv(ev, er + i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const T m1 = from_f<T>(to_f(mv[j]) * inv_m * to_f(w1[i + j]));
      const T en = from_f<T>(to_f(ev[j]) * inv_e * to_f(w2[i + j]));
      fv[j] = from_f<T>(to_f(m1) + to_f(en));
    }
  };
  float ssf = 0.f;
  for (int i = threadIdx.x * VEC; i < n; i += blockDim.x * VEC) {
    T fv[VEC];
    f_vec(i, fv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) { const float f = to_f(fv[j]); ssf += f * f; }
  }
  const float inv_f = rsqrtf(block_sum(ssf, sh) / n + eps);
  const float sc = scale ? scale[0] : 1.f;
  float ssh = 0.f;
  for (int i = threadIdx.x * VEC; i < n; i += blockDim.x * VEC) {
    T fv[VEC], xv[VEC], out[VEC];
    f_vec(i, fv);
    ldv(xv, xr + i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      T t = from_f<T>(to_f(fv[j]) * inv_f * to_f(w3[i + j]));
      t = from_f<T>(to_f(xv[j]) + to_f(t));
      if (scale) t = from_f<T>(to_f(t) * sc);
      const float f = to_f(t);
      ssh += f * f;
      out[j] = t;
    }
    stv(hr + i, out);
  }
  const float inv_h = rsqrtf(block_sum(ssh, sh) / n + eps);
  for (int i = threadIdx.x * VEC; i < n; i += blockDim.x * VEC) {   // each thread re-reads its own writes
    T hv[VEC], out[VEC];
    ldv(hv, hr + i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = from_f<T>(to_f(hv[j]) * inv_h * to_f(w4[i + j]));
    stv(yr + i, out);
  }
}

template <typename T, typename S>
cudaError_t run_norm(int mode, const void* x, int64_t sx, const void* res, int64_t sres, const void* w,
                     const void* scale, void* y, int64_t sy, void* res_out, int64_t sro, int64_t rows,
                     int n, float eps, cudaStream_t st, const void* w2 = nullptr, const void* w3 = nullptr,
                     const void* w4 = nullptr, void* y3 = nullptr, void* y4 = nullptr) {
  if (rows == 0) return cudaSuccess;
  constexpr int V = 16 / sizeof(T);
  bool vec = n % V == 0 && sx % V == 0 && sy % V == 0 && aligned16(x) && aligned16(y) &&
             (!res || (sres % V == 0 && aligned16(res))) && (!res_out || (sro % V == 0 && aligned16(res_out))) &&
             (!y3 || aligned16(y3)) && (!y4 || aligned16(y4));
  dim3 grid((unsigned)rows);
  return launch(vec ? norm_kernel<T, S, V> : norm_kernel<T, S, 1>, grid, norm_threads(n, vec, V), 0, st, mode, x, sx,
                res, sres, w, scale, y, sy, res_out, sro, n, eps, w2, w3, w4, y3, y4);
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

cudaError_t launch_norm_add_scale_norm3(int dtype, const void* x, int64_t sx, const void* res, int64_t sres,
                                        const void* w, const float* scale, const void* w2, const void* w3,
                                        const void* w4, void* res_out, int64_t sro, void* y2, void* y3, void* y4,
                                        int64_t sy, int64_t rows, int n, float eps, cudaStream_t st) {
  G4_DISPATCH_FLOAT(dtype, T, return (run_norm<T, float>(3, x, sx, res, sres, w, scale, y2, sy, res_out, sro,
                                                         rows, n, eps, st, w2, w3, w4, y3, y4)));
  return cudaSuccess;
}

template <typename T>
cudaError_t run_moe_end(const void* m, int64_t sm, const void* e, int64_t se, const void* x, int64_t sx,
                        const void* w1, const void* w2, const void* w3, const float* scale, const void* w4, void* h,
                        int64_t shs, void* y, int64_t sy, int64_t rows, int n, float eps, cudaStream_t st) {
  if (rows == 0) return cudaSuccess;
  constexpr int V = 16 / sizeof(T);
  const bool vec = n % V == 0 && sm % V == 0 && se % V == 0 && sx % V == 0 && shs % V == 0 && sy % V == 0 &&
                   aligned16(m) && aligned16(e) && aligned16(x) && aligned16(h) && aligned16(y);
  return launch(vec ? moe_end_kernel<T, V> : moe_end_kernel<T, 1>, dim3((unsigned)rows), norm_threads(n, vec, V), 0,
                st, m, sm, e, se, x, sx, w1, w2, w3, scale, w4, h, shs, y, sy, n, eps);
}

cudaError_t launch_moe_block_end(int dtype, const void* m, int64_t sm, const void* e, int64_t se, const void* x,
                                 int64_t sx, const void* w1, const void* w2, const void* w3, const float* scale,
                                 const void* w4, void* h, int64_t sh, void* y, int64_t sy, int64_t rows, int n,
                                 float eps, cudaStream_t st) {
  G4_DISPATCH_FLOAT(dtype, T, return (run_moe_end<T>(m, sm, e, se, x, sx, w1, w2, w3, scale, w4, h, sh, y, sy, rows,
                                                     n, eps, st)));
  return cudaSuccess;
}

}  // namespace g4

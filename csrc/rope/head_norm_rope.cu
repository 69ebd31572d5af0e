// Per-head RMSNorm (q/k norm, or weightless v-norm) fused with rotate-half RoPE.
// One warp per (token, head); the head (D ≤ 512) lives in registers.
#include "common/common.cuh"
#include "common/launchers.h"

namespace g4 {
namespace {

// Each lane owns PER elements of the first half and the matching PER of the second half.
template <typename T, int PER>
__global__ void head_norm_rope_kernel(const T* __restrict__ x, int64_t sxt, int64_t sxh,
                                      const T* __restrict__ w, const float* __restrict__ cosp,
                                      const float* __restrict__ sinp, int64_t sct, int64_t sst,
                                      T* __restrict__ y, int64_t syt, int64_t syh, int64_t T_, int H,
                                      int D, float eps) {
  pdl_wait();     // see common.cuh: before any read of an earlier kernel's output
  pdl_trigger();
  const int lane = threadIdx.x % kWarp;
  const int64_t item = (int64_t)blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (item >= T_ * H) return;
  const int64_t t = item / H;
  const int h = (int)(item % H);
  const T* xr = x + t * sxt + h * sxh;
  T* yr = y + t * syt + h * syh;
  const int half = D / 2;
  float a[PER], b[PER];
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    int i = lane + j * kWarp;
    a[j] = i < half ? to_f(xr[i]) : 0.f;
    b[j] = i < half ? to_f(xr[i + half]) : 0.f;
    ss += a[j] * a[j] + b[j] * b[j];
  }
  const float inv = rsqrtf(warp_sum(ss) / D + eps);
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    int i = lane + j * kWarp;
    if (i >= half) continue;
    float ya = a[j] * inv, yb = b[j] * inv;
    if (w) { ya *= to_f(w[i]); yb *= to_f(w[i + half]); }
    // reference rounds the normed value to the working dtype before RoPE
    ya = to_f(from_f<T>(ya));
    yb = to_f(from_f<T>(yb));
    if (cosp) {
      float c = cosp[t * sct + i], s = sinp[t * sst + i];
      float oa = ya * c - yb * s, ob = yb * c + ya * s;
      ya = oa; yb = ob;
    }
    yr[i] = from_f<T>(ya);
    yr[i + half] = from_f<T>(yb);
  }
}

template <typename T>
cudaError_t run(const void* x, int64_t sxt, int64_t sxh, const void* w, const float* c, const float* s,
                int64_t sct, int64_t sst, void* y, int64_t syt, int64_t syh, int64_t T_, int H, int D,
                float eps, cudaStream_t st) {
  if (T_ * H == 0) return cudaSuccess;
  const int warps = 4;
  dim3 grid((unsigned)((T_ * H + warps - 1) / warps));
  const int per = (D / 2 + kWarp - 1) / kWarp;
  auto kern = per <= 1 ? head_norm_rope_kernel<T, 1> : per <= 2 ? head_norm_rope_kernel<T, 2>
            : per <= 4 ? head_norm_rope_kernel<T, 4> : head_norm_rope_kernel<T, 8>;
  if (per > 8) return cudaErrorInvalidValue;
  return launch(kern, grid, warps * kWarp, 0, st, x, sxt, sxh, w, c, s, sct, sst, y, syt, syh, T_, H, D, eps);
}

}  // namespace

cudaError_t launch_head_norm_rope(int dtype, const void* x, int64_t sxt, int64_t sxh, const void* w,
                                  const float* cos, const float* sin, int64_t sct, int64_t sst, void* y,
                                  int64_t syt, int64_t syh, int64_t T_, int H, int D, float eps,
                                  cudaStream_t st) {
  G4_DISPATCH_FLOAT(dtype, T, return run<T>(x, sxt, sxh, w, cos, sin, sct, sst, y, syt, syh, T_, H, D, eps, st));
  return cudaSuccess;
}

}  // namespace g4

// Per-head RMSNorm (q/k norm, or weightless v-norm) fused with rotate-half RoPE, and the same for a
// layer's q, k and v in one launch that also stores k and v into the KV cache.
// One warp per (token, head); the head (D ≤ 512) lives in registers.
#include "common/common.cuh"
#include "common/launchers.h"

namespace g4 {
namespace {

// One head: y = rms(x)·w (w may be null), rounded to T, then rotate-half RoPE with cos/sin rows c/s
// (null = none). Each lane owns PER elements of the first half and the matching PER of the second half.
template <typename T, int PER>
__device__ __forceinline__ void norm_rope_head(const T* __restrict__ xr, const T* __restrict__ w,
                                               const float* __restrict__ c, const float* __restrict__ s,
                                               T* __restrict__ yr, int D, float eps, int lane) {
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
    if (c) {
      const float cc = c[i], sn = s[i];
      const float oa = ya * cc - yb * sn, ob = yb * cc + ya * sn;
      ya = oa; yb = ob;
    }
    yr[i] = from_f<T>(ya);
    yr[i + half] = from_f<T>(yb);
  }
}

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
  norm_rope_head<T, PER>(x + t * sxt + h * sxh, w, cosp ? cosp + t * sct : nullptr, sinp ? sinp + t * sst : nullptr,
                         y + t * syt + h * syh, D, eps, lane);
}

// One launch for a layer's new q, k and v: q heads normed + RoPE into q_out, k heads normed + RoPE and v
// heads normed (no weight, no RoPE) straight into their KV-cache page slots (slot < 0: not stored).
// One warp per (token, head) over the H + 2·KVH heads.
template <typename T, int PER>
__global__ void qkv_norm_rope_store_kernel(const QkvNormRopeStore p) {
  pdl_wait();     // see common.cuh: before any read of an earlier kernel's output
  pdl_trigger();
  const int lane = threadIdx.x % kWarp;
  const int HH = p.H + 2 * p.KVH;
  const int64_t item = (int64_t)blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (item >= p.T * HH) return;
  const int64_t t = item / HH;
  const int h = (int)(item % HH);
  const float* c = p.cos + t * p.sct;
  const float* s = p.sin + t * p.sst;
  if (h < p.H) {
    norm_rope_head<T, PER>(static_cast<const T*>(p.q) + t * p.sqt + h * p.sqh, static_cast<const T*>(p.qw), c, s,
                           static_cast<T*>(p.qo) + t * p.sot + h * p.soh, p.D, p.eps, lane);
    return;
  }
  const int64_t slot = p.slots[t];
  if (slot < 0) return;
  const int64_t page = slot / p.S, off = slot % p.S;
  if (h < p.H + p.KVH) {
    const int hk = h - p.H;
    norm_rope_head<T, PER>(static_cast<const T*>(p.k) + t * p.skt + hk * p.skh, static_cast<const T*>(p.kw), c, s,
                           static_cast<T*>(p.kc) + page * p.kcp + off * p.kcs + hk * p.kch, p.D, p.eps, lane);
  } else {
    const int hv = h - p.H - p.KVH;
    norm_rope_head<T, PER>(static_cast<const T*>(p.v) + t * p.svt + hv * p.svh, nullptr, nullptr, nullptr,
                           static_cast<T*>(p.vc) + page * p.vcp + off * p.vcs + hv * p.vch, p.D, p.eps, lane);
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

template <typename T>
cudaError_t run_qkv(const QkvNormRopeStore& p, cudaStream_t st) {
  const int64_t items = p.T * (p.H + 2 * p.KVH);
  if (items == 0) return cudaSuccess;
  const int warps = 4;
  const int per = (p.D / 2 + kWarp - 1) / kWarp;
  if (per > 8) return cudaErrorInvalidValue;
  auto kern = per <= 1 ? qkv_norm_rope_store_kernel<T, 1> : per <= 2 ? qkv_norm_rope_store_kernel<T, 2>
            : per <= 4 ? qkv_norm_rope_store_kernel<T, 4> : qkv_norm_rope_store_kernel<T, 8>;
  return launch(kern, (unsigned)((items + warps - 1) / warps), warps * kWarp, 0, st, p);
}

}  // namespace

cudaError_t launch_qkv_norm_rope_store(int dtype, const QkvNormRopeStore& p, cudaStream_t st) {
  G4_DISPATCH_FLOAT(dtype, T, return run_qkv<T>(p, st));
  return cudaSuccess;
}

cudaError_t launch_head_norm_rope(int dtype, const void* x, int64_t sxt, int64_t sxh, const void* w,
                                  const float* cos, const float* sin, int64_t sct, int64_t sst, void* y,
                                  int64_t syt, int64_t syh, int64_t T_, int H, int D, float eps,
                                  cudaStream_t st) {
  G4_DISPATCH_FLOAT(dtype, T, return run<T>(x, sxt, sxh, w, cos, sin, sct, sst, y, syt, syh, T_, H, D, eps, st));
  return cudaSuccess;
}

}  // namespace g4

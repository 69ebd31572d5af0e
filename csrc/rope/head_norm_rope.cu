// Per-head RMSNorm (q/k norm, or weightless v-norm) fused with rotate-half RoPE, and the same for a
// layer's q, k and v in one launch that also stores k and v into the KV cache.
// One warp per (token, head); the head (D ≤ 512) lives in registers.
#include "common/common.cuh"
#include "common/launchers.h"
#include "rope/norm_rope.cuh"

namespace g4 {
namespace {
using rope::norm_rope_head;
using rope::qkv_item;

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

// One launch for a layer's new q, k and v (qkv_item, norm_rope.cuh): one warp per (token, head).
template <typename T, int PER>
__global__ void qkv_norm_rope_store_kernel(const QkvNormRopeStore p) {
  pdl_wait();     // see common.cuh: before any read of an earlier kernel's output
  pdl_trigger();
  const int64_t item = (int64_t)blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (item >= p.T * (p.H + 2 * p.KVH)) return;
  qkv_item<T, PER, false>(p, item, threadIdx.x % kWarp);
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

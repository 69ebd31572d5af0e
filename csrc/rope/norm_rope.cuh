// Per-head RMSNorm fused with rotate-half RoPE (norm_rope_head), and one item of a layer's new q / k / v
// (qkv_item: a q head normed + RoPE into q_out, a k head normed + RoPE or a v head normed into its KV-cache
// slot). Shared by head_norm_rope.cu and the skinny GEMM's q/k/v epilogue (gemv.cu), which reads x written by
// other CTAs of its own launch and so loads it through L2 (L2 = true).
#pragma once
#include "common/common.cuh"
#include "common/launchers.h"

namespace g4 {
namespace rope {

template <typename T, bool L2>
__device__ __forceinline__ float load_x(const T* p) {
#ifdef G4_ROCM
  return to_f(*p);
#else
  if constexpr (L2) return to_f(__ldcg(p));
  else return to_f(*p);
#endif
}

// One head: y = rms(x)·w (w may be null), rounded to T, then rotate-half RoPE with cos/sin rows c/s
// (null = none). Each lane owns PER elements of the first half and the matching PER of the second half.
template <typename T, int PER, bool L2 = false>
__device__ __forceinline__ void norm_rope_head(const T* __restrict__ xr, const T* __restrict__ w,
                                               const float* __restrict__ c, const float* __restrict__ s,
                                               T* __restrict__ yr, int D, float eps, int lane) {
  const int half = D / 2;
  float a[PER], b[PER];
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    int i = lane + j * kWarp;
    a[j] = i < half ? load_x<T, L2>(xr + i) : 0.f;
    b[j] = i < half ? load_x<T, L2>(xr + i + half) : 0.f;
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

// item = t · (H + 2·KVH) + h: q heads first, then k, then v (slot < 0: k and v not stored)
template <typename T, int PER, bool L2>
__device__ __forceinline__ void qkv_item(const QkvNormRopeStore& p, int64_t item, int lane) {
  const int HH = p.H + 2 * p.KVH;
  const int64_t t = item / HH;
  const int h = (int)(item % HH);
  const float* c = p.cos + t * p.sct;
  const float* s = p.sin + t * p.sst;
  if (h < p.H) {
    norm_rope_head<T, PER, L2>(static_cast<const T*>(p.q) + t * p.sqt + h * p.sqh, static_cast<const T*>(p.qw), c,
                               s, static_cast<T*>(p.qo) + t * p.sot + h * p.soh, p.D, p.eps, lane);
    return;
  }
  const int64_t slot = p.slots[t];
  if (slot < 0) return;
  const int64_t page = slot / p.S, off = slot % p.S;
  if (h < p.H + p.KVH) {
    const int hk = h - p.H;
    norm_rope_head<T, PER, L2>(static_cast<const T*>(p.k) + t * p.skt + hk * p.skh, static_cast<const T*>(p.kw), c,
                               s, static_cast<T*>(p.kc) + page * p.kcp + off * p.kcs + hk * p.kch, p.D, p.eps, lane);
  } else {
    const int hv = h - p.H - p.KVH;
    norm_rope_head<T, PER, L2>(static_cast<const T*>(p.v) + t * p.svt + hv * p.svh, nullptr, nullptr, nullptr,
                               static_cast<T*>(p.vc) + page * p.vcp + off * p.vcs + hv * p.vch, p.D, p.eps, lane);
  }
}

}  // namespace rope
}  // namespace g4

// MoE router (softmax → top-k → renormalise → × per-expert scale) and the token-to-expert
// alignment that sorts (token, slot) pairs into BM-row tiles of one expert each.
#include "common/common.cuh"
#include "common/launchers.h"

namespace g4 {
namespace {

constexpr int kMaxEPerLane = 16;  // E ≤ 16·warp

// One warp per token.
template <typename T>
__global__ void route_kernel(const T* __restrict__ logits, int64_t sl, int64_t T_, int E, int k,
                             const float* __restrict__ scale, float* __restrict__ w_out, int32_t* __restrict__ ids_out) {
  pdl_wait();     // see common.cuh: before any read of an earlier kernel's output
  pdl_trigger();
  const int lane = threadIdx.x % kWarp;
  const int64_t t = (int64_t)blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (t >= T_) return;
  float v[kMaxEPerLane];
  float mx = -INFINITY;
#pragma unroll
  for (int j = 0; j < kMaxEPerLane; ++j) {
    const int e = lane + j * kWarp;
    v[j] = e < E ? to_f(logits[t * sl + e]) : -INFINITY;
    mx = fmaxf(mx, v[j]);
  }
  mx = warp_max(mx);
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < kMaxEPerLane; ++j) {
    const int e = lane + j * kWarp;
    v[j] = e < E ? __expf(v[j] - mx) : -1.f;  // probabilities ≥ 0; −1 marks absent/taken
    sum += e < E ? v[j] : 0.f;
  }
  sum = warp_sum(sum);
  float chosen_w = 0.f;   // lane i < k keeps the i-th pick
  int chosen_id = 0;
  float tot = 0.f;
  for (int i = 0; i < k; ++i) {
    float bv = -2.f;
    int bi = 0x7fffffff;
#pragma unroll
    for (int j = 0; j < kMaxEPerLane; ++j) {
      const int e = lane + j * kWarp;
      if (v[j] > bv) { bv = v[j]; bi = e; }
    }
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) {
      const float ov = shfl_xor(bv, o);
      const int oi = shfl_xor(bi, o);
      if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    const float p = bv / sum;
    tot += p;
    if (lane == i) { chosen_w = p; chosen_id = bi; }
#pragma unroll
    for (int j = 0; j < kMaxEPerLane; ++j)
      if (lane + j * kWarp == bi) v[j] = -1.f;
  }
  if (lane < k) {
    float w = chosen_w / tot;
    if (scale) w *= scale[chosen_id];
    w_out[t * k + lane] = w;
    ids_out[t * k + lane] = chosen_id;
  }
}

// One block: counts per expert, tile offsets, scatter (token·k + j) into tiles (−1 = padding).
__global__ void align_kernel(const int32_t* __restrict__ ids, int64_t n, int E, int BM, int32_t* __restrict__ sorted,
                             int32_t* __restrict__ tile_expert, int32_t* __restrict__ num_tiles, int cap_tiles) {
  pdl_wait();     // see common.cuh: before any read of an earlier kernel's output
  pdl_trigger();
  extern __shared__ int sh[];
  int* cnt = sh;          // [E]
  int* tile_off = sh + E; // [E + 1]
  int* fill = sh + 2 * E + 1;
  for (int e = threadIdx.x; e < E; e += blockDim.x) { cnt[e] = 0; fill[e] = 0; }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int e = ids[i];
    if (e >= 0 && e < E) atomicAdd(&cnt[e], 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int acc = 0;
    for (int e = 0; e < E; ++e) { tile_off[e] = acc; acc += (cnt[e] + BM - 1) / BM; }
    tile_off[E] = acc;
    num_tiles[0] = acc;
  }
  __syncthreads();
  const int total = tile_off[E];
  for (int i = threadIdx.x; i < cap_tiles; i += blockDim.x) tile_expert[i] = -1;
  for (int64_t i = threadIdx.x; i < (int64_t)cap_tiles * BM; i += blockDim.x) sorted[i] = -1;
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x)
    for (int tt = tile_off[e]; tt < tile_off[e + 1]; ++tt) tile_expert[tt] = e;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int e = ids[i];
    if (e < 0 || e >= E) continue;
    const int pos = tile_off[e] * BM + atomicAdd(&fill[e], 1);
    sorted[pos] = (int32_t)i;
  }
  (void)total;
}

}  // namespace

cudaError_t launch_moe_route(int dtype, const void* logits, int64_t sl, int64_t T_, int E, int k, const void* scale,
                             int scale_dtype, float* w_out, int32_t* ids_out, cudaStream_t st) {
  (void)scale_dtype;  // per-expert scale is fp32 (the wrapper casts)
  if (T_ == 0) return cudaSuccess;
  if (E > kMaxEPerLane * kWarp || k > kWarp || k > E) return cudaErrorInvalidValue;
  const int wpb = 4;
  const unsigned blocks = (unsigned)((T_ + wpb - 1) / wpb);
  G4_DISPATCH_FLOAT(dtype, T, return launch(route_kernel<T>, blocks, wpb * kWarp, 0, st, logits, sl, T_, E, k,
                                             scale, w_out, ids_out));
  return cudaSuccess;
}

cudaError_t launch_moe_align(const int32_t* ids, int64_t T_, int k, int E, int BM, int32_t* sorted,
                             int32_t* tile_expert, int32_t* num_tiles, int cap_tiles, cudaStream_t st) {
  const size_t smem = sizeof(int) * (3 * E + 1);
  return launch(align_kernel, 1, 1024, smem, st, ids, T_ * k, E, BM, sorted, tile_expert, num_tiles, cap_tiles);
}

}  // namespace g4

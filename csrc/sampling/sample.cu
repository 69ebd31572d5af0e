// Fused sampler: soft-cap, temperature, top-k / top-p / min-p and the exponential race
// (argmax p/E, E ~ Exp(1) from Philox keyed by (seed, step)), or greedy argmax.
// One thread-block cluster of kCL CTAs per row: each CTA reads its vocabulary slice ONCE from
// device memory into shared memory; the thresholds are found exactly by radix selection over the
// order-preserving bit keys (counts for top-k, probability mass for top-p) with cluster-wide
// histogram reductions through distributed shared memory. sm_90.
#include <cooperative_groups.h>
#include "common/common.cuh"
#include "common/launchers.h"

namespace cg = cooperative_groups;

namespace g4 {
namespace {

constexpr int kCL = 8, kNT = 1024;

__device__ __forceinline__ uint32_t fkey(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Philox4x32-10, first output word.
__device__ __forceinline__ uint32_t philox(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    c0 = hi1 ^ c1 ^ k0; c1 = lo1; c2 = hi0 ^ c3 ^ k1; c3 = lo0;
    k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
  }
  return c0;
}

struct Shared {
  unsigned long long red64[kNT / kWarp];
  float redf[kNT / kWarp];
  unsigned long long x64;   // this CTA's partial, read by the cluster
  float xf;
  uint32_t hcnt[256];
  float hmass[256];
  uint32_t gcnt[256];
  float gmass[256];
};

__device__ unsigned long long block_max_u64(unsigned long long v, Shared& s) {
  for (int o = kWarp / 2; o > 0; o >>= 1) { const unsigned long long w = __shfl_xor_sync(0xffffffffu, v, o); v = w > v ? w : v; }
  __syncthreads();
  if (threadIdx.x % kWarp == 0) s.red64[threadIdx.x / kWarp] = v;
  __syncthreads();
  unsigned long long r = 0;
  for (int i = 0; i < kNT / kWarp; ++i) r = s.red64[i] > r ? s.red64[i] : r;
  return r;
}
__device__ float block_reduce_f(float v, Shared& s, bool is_max) {
  for (int o = kWarp / 2; o > 0; o >>= 1) { const float w = __shfl_xor_sync(0xffffffffu, v, o); v = is_max ? fmaxf(v, w) : v + w; }
  __syncthreads();
  if (threadIdx.x % kWarp == 0) s.redf[threadIdx.x / kWarp] = v;
  __syncthreads();
  float r = is_max ? -INFINITY : 0.f;
  for (int i = 0; i < kNT / kWarp; ++i) r = is_max ? fmaxf(r, s.redf[i]) : r + s.redf[i];
  return r;
}
__device__ unsigned long long cluster_max_u64(unsigned long long v, Shared& s, cg::cluster_group& cl) {
  v = block_max_u64(v, s);
  if (threadIdx.x == 0) s.x64 = v;
  cl.sync();
  unsigned long long r = 0;
  for (int i = 0; i < kCL; ++i) { const unsigned long long w = cl.map_shared_rank(&s, i)->x64; r = w > r ? w : r; }
  cl.sync();
  return r;
}
__device__ float cluster_reduce_f(float v, Shared& s, cg::cluster_group& cl, bool is_max) {
  v = block_reduce_f(v, s, is_max);
  if (threadIdx.x == 0) s.xf = v;
  cl.sync();
  float r = is_max ? -INFINITY : 0.f;
  for (int i = 0; i < kCL; ++i) { const float w = cl.map_shared_rank(&s, i)->xf; r = is_max ? fmaxf(r, w) : r + w; }
  cl.sync();
  return r;
}

// One radix round over keys k with (k & mask) == prefix and k >= floor_key: cluster histogram of
// the byte at `shift` (counts and exp(x − M) mass) into s.gcnt / s.gmass.
__device__ void cluster_hist(const float* vals, int n, uint32_t prefix, uint32_t mask, int shift, uint32_t floor_key,
                             float M, bool want_mass, Shared& s, cg::cluster_group& cl) {
  for (int i = threadIdx.x; i < 256; i += kNT) { s.hcnt[i] = 0; s.hmass[i] = 0.f; }
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += kNT) {
    const uint32_t k = fkey(vals[i]);
    if ((k & mask) != prefix || k < floor_key) continue;
    const int bin = (k >> shift) & 255;
    atomicAdd(&s.hcnt[bin], 1u);
    if (want_mass) atomicAdd(&s.hmass[bin], __expf(vals[i] - M));
  }
  cl.sync();
  for (int i = threadIdx.x; i < 256; i += kNT) {
    uint32_t c = 0;
    float m = 0.f;
    for (int r = 0; r < kCL; ++r) { const Shared* o = cl.map_shared_rank(&s, r); c += o->hcnt[i]; m += o->hmass[i]; }
    s.gcnt[i] = c;
    s.gmass[i] = m;
  }
  cl.sync();
}

template <typename T>
__global__ void __cluster_dims__(kCL, 1, 1) __launch_bounds__(kNT)
sample_kernel(const T* __restrict__ logits, int64_t sl, int V, int slice, float cap, const float* __restrict__ temperature,
              const int32_t* __restrict__ top_k, const float* __restrict__ top_p, const float* __restrict__ min_p,
              const int64_t* __restrict__ seeds, const int64_t* __restrict__ steps, int64_t* __restrict__ out) {
  cg::cluster_group cl = cg::this_cluster();
  __shared__ Shared s;
  extern __shared__ float vals[];
  const int rank = (int)cl.block_rank();
  const int64_t row = blockIdx.y;
  const int lo = rank * slice, n = max(0, min(V, lo + slice) - lo);
  const float temp = temperature[row];
  const bool greedy = !(temp > 0.f);
  const float inv_t = greedy ? 1.f : 1.f / temp;
  const T* lr = logits + row * sl + lo;
  float lmax = -INFINITY;
  for (int i = threadIdx.x; i < n; i += kNT) {
    float x = to_f(lr[i]);
    if (!greedy) {
      if (cap > 0.f) x = tanhf(x / cap) * cap;
      x *= inv_t;
    }
    vals[i] = x;
    lmax = fmaxf(lmax, x);
  }
  __syncthreads();
  if (greedy) {  // argmax of the raw logits, first index on ties
    unsigned long long best = 0;
    for (int i = threadIdx.x; i < n; i += kNT) {
      const unsigned long long pk = ((unsigned long long)fkey(vals[i]) << 32) | (0xffffffffu - (uint32_t)(lo + i));
      best = pk > best ? pk : best;
    }
    best = cluster_max_u64(best, s, cl);
    if (rank == 0 && threadIdx.x == 0) out[row] = (int64_t)(0xffffffffu - (uint32_t)(best & 0xffffffffu));
    return;
  }
  const float M = cluster_reduce_f(lmax, s, cl, true);
  uint32_t tau = 0;
  // top-k: key of the k-th largest
  const int kk = top_k[row];
  if (kk > 0 && kk < V) {
    uint32_t prefix = 0, mask = 0, remaining = (uint32_t)kk;
    for (int shift = 24; shift >= 0; shift -= 8) {
      cluster_hist(vals, n, prefix, mask, shift, 0u, M, false, s, cl);
      int bin = 0;
      for (int b = 255; b >= 0; --b) {
        if (s.gcnt[b] >= remaining) { bin = b; break; }
        remaining -= s.gcnt[b];
      }
      prefix |= (uint32_t)bin << shift;
      mask |= 255u << shift;
    }
    tau = prefix;
  }
  // top-p over the top-k-filtered distribution
  const float tp = top_p[row];
  if (tp < 1.f) {
    float z = 0.f;
    for (int i = threadIdx.x; i < n; i += kNT)
      if (fkey(vals[i]) >= tau) z += __expf(vals[i] - M);
    z = cluster_reduce_f(z, s, cl, false);
    const float target = tp * z;
    float cum = 0.f;
    uint32_t prefix = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
      cluster_hist(vals, n, prefix, mask, shift, tau, M, true, s, cl);
      int bin = -1, last = 0;
      for (int b = 255; b >= 0; --b) {
        if (s.gcnt[b] == 0) continue;
        last = b;
        if (cum + s.gmass[b] >= target) { bin = b; break; }
        cum += s.gmass[b];
      }
      if (bin < 0) bin = last;  // rounding: keep everything down to the smallest bin
      prefix |= (uint32_t)bin << shift;
      mask |= 255u << shift;
    }
    tau = max(tau, prefix);
  }
  const float mp = min_p[row];
  if (mp > 0.f) tau = max(tau, fkey(M + __logf(mp)));
  tau = min(tau, fkey(M));  // the top token is always kept
  // exponential race among kept tokens: argmax x − log(E)
  const uint64_t seed = (uint64_t)seeds[row], step = (uint64_t)steps[row];
  unsigned long long best = 0;
  for (int i = threadIdx.x; i < n; i += kNT) {
    const float x = vals[i];
    if (fkey(x) < tau) continue;
    const uint32_t r = philox((uint32_t)(lo + i), (uint32_t)step, (uint32_t)(step >> 32), 0x5eedu, (uint32_t)seed,
                              (uint32_t)(seed >> 32));
    const float u = ((float)(r >> 8) + 0.5f) * (1.f / 16777216.f);
    const float e = -__logf(u);
    const float key = x - __logf(e);
    const unsigned long long pk = ((unsigned long long)fkey(key) << 32) | (0xffffffffu - (uint32_t)(lo + i));
    best = pk > best ? pk : best;
  }
  best = cluster_max_u64(best, s, cl);
  if (rank == 0 && threadIdx.x == 0) out[row] = (int64_t)(0xffffffffu - (uint32_t)(best & 0xffffffffu));
}

}  // namespace

cudaError_t launch_sample(int dtype, const void* logits, int64_t sl, int64_t N, int V, float softcap,
                          const float* temperature, const int32_t* top_k, const float* top_p, const float* min_p,
                          const int64_t* seeds, const int64_t* steps, int64_t* out, cudaStream_t st) {
  if (N == 0) return cudaSuccess;
  const int slice = (V + kCL - 1) / kCL;
  const size_t smem = (size_t)slice * sizeof(float);
  if (smem > 200 * 1024 || N > 65535) return cudaErrorInvalidValue;
  dim3 grid(kCL, (unsigned)N);
#define G4_SAMPLE(T)                                                                                   \
  {                                                                                                    \
    auto kern = sample_kernel<T>;                                                                      \
    cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem); \
    if (e != cudaSuccess) return e;                                                                    \
    kern<<<grid, kNT, smem, st>>>((const T*)logits, sl, V, slice, softcap, temperature, top_k, top_p,  \
                                  min_p, seeds, steps, out);                                          \
  }
  if (dtype == kF32) G4_SAMPLE(float)
  else if (dtype == kBF16) G4_SAMPLE(__nv_bfloat16)
  else if (dtype == kF16) G4_SAMPLE(__half)
  else return cudaErrorInvalidValue;
#undef G4_SAMPLE
  return cudaGetLastError();
}

}  // namespace g4

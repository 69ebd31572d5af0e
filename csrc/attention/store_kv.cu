// Write new keys/values into their page slots: k, v [T, KVH, D] -> cache [P, S, KVH, D].
// slot_mapping[t] = page·S + offset, negative = skip. One thread per 16-byte chunk.
#include "common/common.cuh"
#include "common/launchers.h"

namespace g4 {
namespace {

template <typename T, int VEC>
__global__ void store_kv_kernel(const T* __restrict__ k, int64_t skt, int64_t skh, const T* __restrict__ v,
                                int64_t svt, int64_t svh, T* __restrict__ kc, int64_t kp, int64_t ks, int64_t kh,
                                T* __restrict__ vc, int64_t vp, int64_t vs, int64_t vh,
                                const int64_t* __restrict__ slots, int64_t T_, int KVH, int D, int S) {
  pdl_wait();     // see common.cuh: before any read of an earlier kernel's output
  pdl_trigger();
  const int chunks = D / VEC;
  const int64_t total = T_ * KVH * chunks;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int c = (int)(i % chunks) * VEC;
    const int h = (int)((i / chunks) % KVH);
    const int64_t t = i / ((int64_t)chunks * KVH);
    const int64_t slot = slots[t];
    if (slot < 0) continue;
    const int64_t page = slot / S, off = slot % S;
    const T* ks_ = k + t * skt + h * skh + c;
    const T* vs_ = v + t * svt + h * svh + c;
    T* kd = kc + page * kp + off * ks + h * kh + c;
    T* vd = vc + page * vp + off * vs + h * vh + c;
    if constexpr (VEC * sizeof(T) == 16) {
      *reinterpret_cast<uint4*>(kd) = *reinterpret_cast<const uint4*>(ks_);
      *reinterpret_cast<uint4*>(vd) = *reinterpret_cast<const uint4*>(vs_);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) { kd[j] = ks_[j]; vd[j] = vs_[j]; }
    }
  }
}

template <typename T>
cudaError_t run(const void* k, int64_t skt, int64_t skh, const void* v, int64_t svt, int64_t svh, void* kc,
                const int64_t* kst, void* vc, const int64_t* vst, const int64_t* slots, int64_t T_, int KVH,
                int D, int S, cudaStream_t st) {
  if (T_ * KVH == 0) return cudaSuccess;
  constexpr int V = 16 / sizeof(T);
  const bool vec = D % V == 0 && aligned16(k) && aligned16(v) && aligned16(kc) && aligned16(vc) &&
                   skt % V == 0 && skh % V == 0 && svt % V == 0 && svh % V == 0 && kst[0] % V == 0 &&
                   kst[1] % V == 0 && kst[2] % V == 0 && vst[0] % V == 0 && vst[1] % V == 0 && vst[2] % V == 0;
  const int64_t work = T_ * KVH * (vec ? D / V : D);
  const unsigned blocks = (unsigned)std::min<int64_t>((work + 255) / 256, 132 * 8);
  return launch(vec ? store_kv_kernel<T, V> : store_kv_kernel<T, 1>, blocks, 256, 0, st, k, skt, skh, v, svt, svh,
                kc, kst[0], kst[1], kst[2], vc, vst[0], vst[1], vst[2], slots, T_, KVH, D, S);
}

}  // namespace

cudaError_t launch_store_kv(int dtype, const void* k, int64_t skt, int64_t skh, const void* v, int64_t svt,
                            int64_t svh, void* kc, const int64_t* kst, void* vc, const int64_t* vst,
                            const int64_t* slot_mapping, int64_t T_, int KVH, int D, int page_size,
                            cudaStream_t st) {
  G4_DISPATCH_FLOAT(dtype, T, return run<T>(k, skt, skh, v, svt, svh, kc, kst, vc, vst, slot_mapping, T_, KVH, D,
                                            page_size, st));
  return cudaSuccess;
}

}  // namespace g4

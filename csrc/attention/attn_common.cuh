// Shared by the paged-attention kernels (paged_attention.cu: 64- and 16-row tiles and the split merge;
// decode8_attention.cu: 8-row decode tiles): which tile and key range a CTA owns, the visibility rule, the
// online-softmax step, the Q tile load, the K/V pipeline (KvPipe) and the launch helpers. CUDA only.
#pragma once
#include "common/mma.cuh"
#include "common/launchers.h"

namespace g4 {

// out = Σ_s w_s O_s over a launch's key splits (no-op for one split): paged_attention.cu, for bf16 and fp16
template <typename T>
cudaError_t attn_merge(const AttnParams& p, cudaStream_t st);
// the 8-row decode kernel (warps_m == 0): decode8_attention.cu
cudaError_t launch_attn_decode8(int dtype, const AttnParams& p, cudaStream_t st);

namespace attn {

constexpr int kSplitKeys = 32;  // split sizes are multiples of this (KEYS_PER_STAGE in ops/attention.py)

// Which request and row tile of M rows a CTA owns (blockIdx.x runs over the tiles of every request that
// p.q_sel selects), and the key range [ks, ke) of its split. A warp-wide scan over cu_seqlens, 32 requests a
// round (a serial walk costs a dependent load per request, microseconds for a CTA of batch-100 decode).
// b < 0: no tile.
struct TileKeys {
  int b, n_q, q0, first_q, row0, nrows, ks, ke;
};
template <int M>
__device__ __forceinline__ TileKeys tile_keys(const AttnParams& p, int group, int split) {
  TileKeys r{};
  r.b = -1;
  const int lane = threadIdx.x % 32;
  int tile = 0;
  for (int base = 0, acc = 0; base < p.B; base += 32) {
    const int i = base + lane;
    int a0 = 0, n = 0, nt = 0;
    if (i < p.B) {
      a0 = p.cu_seqlens_q[i];
      n = p.cu_seqlens_q[i + 1] - a0;
      // q_sel (a mixed step's two launches): a request outside this launch's selection owns no tile
      if (p.q_sel == 0 || (p.q_sel == 1) == (n == 1)) nt = (n * group + M - 1) / M;
    }
    int incl = nt;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    const int x = (int)blockIdx.x - acc;
    const unsigned hit = __ballot_sync(0xffffffffu, i < p.B && x >= incl - nt && x < incl);
    if (hit) {
      const int src = __ffs(hit) - 1;
      r.b = base + src;
      tile = x - __shfl_sync(0xffffffffu, incl - nt, src);
      r.n_q = __shfl_sync(0xffffffffu, n, src);
      r.q0 = __shfl_sync(0xffffffffu, a0, src);
      break;
    }
    acc += __shfl_sync(0xffffffffu, incl, 31);
  }
  if (r.b < 0) return r;
  const int L = p.seq_lens[r.b];
  r.first_q = L - r.n_q;
  r.row0 = tile * M;
  r.nrows = min(M, r.n_q * group - r.row0);
  const int minq = r.first_q + r.row0 / group;
  const int maxq = r.first_q + (r.row0 + r.nrows - 1) / group;
  const int k_lo = p.window > 0 ? max(0, minq - p.window + 1) : 0;
  const int k_hi = p.block_ids ? L : maxq + 1;
  r.ks = k_lo;
  r.ke = k_hi;
  if (p.num_splits > 1) {
    r.ks = k_lo + split * p.split_size;
    r.ke = min(k_hi, r.ks + p.split_size);
  }
  return r;
}

// Whether key j is visible to a query row at position qpos (in image block qblk, -1: none) of a request whose
// chunk starts at position first_q and token index q0: causal within the window, or in the row's image block.
__device__ __forceinline__ bool key_visible(const AttnParams& p, int j, int qpos, int qblk, int first_q, int q0) {
  const bool win = p.window <= 0 || j > qpos - p.window;
  bool vis = j <= qpos && win;
  if (!vis && p.block_ids && qblk >= 0 && j >= first_q && win) vis = p.block_ids[q0 + (j - first_q)] == qblk;
  return vis;
}
// Online softmax (log2 domain) for one row with the tile's (row-reduced) max mx: rescales the running sum l
// and max m, returns the factor for the running output; mx becomes the offset for the tile's exponents.
__device__ __forceinline__ float softmax_step(float& m, float& l, float& mx) {
  const float mn = fmaxf(m, mx);
  const float mu = mn == -INFINITY ? 0.f : mn;
  const float alpha = exp2f(m - mu);
  l *= alpha;
  m = mn;
  mx = mu;
  return alpha;
}

// A tile's score for key j, scaled to the log2 domain, or -inf where the key is past the range, the row is
// padding, or the key is not visible to the row.
__device__ __forceinline__ float masked_score(const AttnParams& p, float s, float sl2, bool row_ok, int j, int ke,
                                              int qpos, int qblk, int first_q, int q0) {
  return row_ok && j < ke && key_visible(p, j, qpos, qblk, first_q, q0) ? s * sl2 : -INFINITY;
}

// The tile's M query rows (row = token·group + head in group; rows past nrows zero-filled) -> swizzled smem,
// by cp.async (the caller commits).
template <typename T, int D, int M>
__device__ __forceinline__ void load_q_tile(T* Qs, const AttnParams& p, const TileKeys& tk, int kvh, int group) {
  constexpr int CH = D / 8;
  const T* q = static_cast<const T*>(p.q);
  for (int id = threadIdx.x; id < M * CH; id += blockDim.x) {
    const int r = id / CH, c = id % CH;
    const bool ok = r < tk.nrows;
    const int rr = tk.row0 + (ok ? r : 0);
    const T* src = q + (int64_t)(tk.q0 + rr / group) * p.sq_t + (int64_t)(kvh * group + rr % group) * p.sq_h + c * 8;
    cp_async16(Qs + swz<D>(r, c * 8), src, ok);
  }
}

constexpr int kPageCap = 128;   // page-table entries staged in shared memory (longer key ranges read global)

// The K/V tiles of a CTA's key range [ks, ke): NS shared-memory stages of KB keys each (K rows, then V rows).
// BULK (sm_90; issued by loader warps only): each K or V row (D·2 bytes) is one cp.async.bulk whose bytes
// count on its stage's mbarrier, into rows padded by 16 bytes (no bank conflicts without a swizzle); keys past
// the range copy the range's first key (finite; the kernels mask them). Otherwise 16-byte cp.async chunks
// into swizzled rows (keys past the range zero-filled), one commit group per stage. The page-table slice of
// the range is staged in shared memory when it has at most kPageCap entries.
// H200, batch-100 decode at ~1.1k context (bench/kernels/decode_sweep.py): the cp.async path reaches ~55% of
// the read bandwidth however many stages are in flight (its loads alone, timed with GEMMA4RT_ATTN_PROBE=1, are
// no faster: an SM keeps only so many cp.async requests in flight), the bulk path 61-97% on layers of 2 or
// more KV heads (a bulk copy is one request for a whole row).
template <typename T, int D, int KB, int NS, bool BULK>
struct KvPipe {
  static constexpr int RP = BULK ? D + 8 : D;                   // row pitch (elements)
  static constexpr int STAGE_BYTES = NS * 2 * KB * RP * 2;
  static constexpr int EXTRA_BYTES = kPageCap * 4 + (BULK ? NS * 8 : 0);
  T* kv;
  int* pages;
  uint64_t* full;
  const T *kc, *vc;
  const int32_t* ptab;
  int pg0, ks, ke, kvh;
  bool staged;

  // smem: STAGE_BYTES then EXTRA_BYTES (16-byte aligned). Every thread calls this; a __syncthreads() must
  // follow before the first issue().
  __device__ __forceinline__ void init(unsigned char* smem, const AttnParams& p, int b, int ks_, int ke_, int kvh_) {
    kv = reinterpret_cast<T*>(smem);
    pages = reinterpret_cast<int*>(smem + STAGE_BYTES);
    full = reinterpret_cast<uint64_t*>(smem + STAGE_BYTES + kPageCap * 4);
    kc = static_cast<const T*>(p.kc);
    vc = static_cast<const T*>(p.vc);
    ptab = p.page_table + (int64_t)b * p.spt;
    ks = ks_; ke = ke_; kvh = kvh_;
    pg0 = ks / p.page_size;
    const int npg = ke > ks ? (ke - 1) / p.page_size - pg0 + 1 : 0;
    staged = npg <= kPageCap;
    if (staged)
      for (int i = threadIdx.x; i < npg; i += blockDim.x) pages[i] = ptab[pg0 + i];
    if (BULK && threadIdx.x == 0)
      for (int s = 0; s < NS; ++s) mbar_init(full + s, 1);
  }
  __device__ __forceinline__ const T* row(const AttnParams& p, int j, bool v) const {
    const int pi = j / p.page_size;
    const int64_t page = staged ? pages[pi - pg0] : ptab[pi];
    const int64_t slot = j - pi * p.page_size;
    return v ? vc + page * p.sv_p + slot * p.sv_s + (int64_t)kvh * p.sv_h
             : kc + page * p.sk_p + slot * p.sk_s + (int64_t)kvh * p.sk_h;
  }
  // tile kb.. into stage, by threads lt = 0 .. nl-1 (BULK: lt = 0 must be a loader thread)
  __device__ __forceinline__ void issue(const AttnParams& p, int kb, int stage, int lt, int nl) {
    T* Ks = kv + stage * 2 * KB * RP;
    if constexpr (BULK) {
      if (lt == 0) mbar_expect_tx(full + stage, 2 * KB * D * 2);
      for (int r = lt; r < 2 * KB; r += nl) {
        const int kr = r % KB, j = kb + kr < ke ? kb + kr : ks;
        bulk_copy(Ks + (r / KB) * KB * RP + kr * RP, row(p, j, r >= KB), D * 2, full + stage);
      }
    } else {
      constexpr int CH = D / 8;
      for (int id = lt; id < KB * CH; id += nl) {
        const int r = id / CH, c = id % CH;
        const bool ok = kb + r < ke;
        const int j = ok ? kb + r : ks;
        cp_async16(Ks + swz<D>(r, c * 8), row(p, j, false) + c * 8, ok);
        cp_async16(Ks + KB * RP + swz<D>(r, c * 8), row(p, j, true) + c * 8, ok);
      }
    }
  }
  // tiles 0 .. NS-2 in flight through load(kb, stage), one commit group each (empty past the end, so that
  // cp_async_wait<NS-2> in the loop always means "tile it has landed"); returns the number of tiles
  template <typename F>
  __device__ __forceinline__ int prologue(F&& load) const {
    const int n = ke > ks ? (ke - ks + KB - 1) / KB : 0;
#pragma unroll
    for (int s = 0; s < NS - 1; ++s) {
      if (s < n) load(ks + s * KB, s);
      cp_async_commit();
    }
    return n;
  }
  // BULK: wait until tile `it` has landed (the cp.async path waits on its commit groups instead)
  __device__ __forceinline__ void wait(int it) const {
    if constexpr (BULK) mbar_wait(full + it % NS, (it / NS) & 1);
  }
  __device__ __forceinline__ const T* k_stage(int it) const { return kv + (it % NS) * 2 * KB * RP; }
  // element (row, col) of a stage's K or V rows
  static __device__ __forceinline__ const T* at(const T* base, int r, int c) {
    if constexpr (BULK) return base + r * RP + c;
    else return base + swz<D>(r, c);
  }
};

// A split CTA has written its rows' partials (ws_o, ws_lse). With p.counters, the last of the tile's split
// CTAs to get here (counted per (row tile, KV head), the count reset by that CTA for the next launch)
// combines every split's partials of the tile's rows into out: no merge launch, whose latency-bound blocks
// (one a row and head) cost ~35 µs a layer at batch 100 on an H200. Each thread walks the splits serially,
// so the host sends counters only for a few splits (ops/attention.py). Every thread of the CTA calls this.
template <typename T, int NT>
__device__ __forceinline__ void merge_tile_if_last(const AttnParams& p, int q0, int row0, int nrows, int group,
                                                   int kvh) {
  if (p.num_splits == 1 || p.counters == nullptr) return;
  if (!last_arrival(p.counters + (int64_t)blockIdx.x * p.KVH + kvh, p.num_splits)) return;
  const int D = p.D, cols = D / 4, S = p.num_splits;
  const int64_t stride = (int64_t)p.T * p.H;
  for (int id = threadIdx.x; id < nrows * cols; id += NT) {
    const int rr = row0 + id / cols, c = (id % cols) * 4;
    const int tok = q0 + rr / group, head = kvh * group + rr % group;
    const int64_t th = (int64_t)tok * p.H + head;
    float mx = -INFINITY;
#pragma unroll 4
    for (int s = 0; s < S; ++s) mx = fmaxf(mx, __ldcg(p.ws_lse + s * stride + th));
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f, den = 0.f;
#pragma unroll 4
    for (int s = 0; s < S; ++s) {
      const float l = __ldcg(p.ws_lse + s * stride + th);
      if (l == -INFINITY) continue;
      const float w = exp2f(l - mx);
      const float4 v = __ldcg(reinterpret_cast<const float4*>(p.ws_o + (s * stride + th) * D + c));
      den += w;
      a0 += w * v.x; a1 += w * v.y; a2 += w * v.z; a3 += w * v.w;
    }
    const float inv = den > 0.f ? 1.f / den : 0.f;
    T* orow = static_cast<T*>(p.out) + (int64_t)tok * p.so_t + (int64_t)head * p.so_h + c;
    orow[0] = from_f<T>(a0 * inv); orow[1] = from_f<T>(a1 * inv);
    orow[2] = from_f<T>(a2 * inv); orow[3] = from_f<T>(a3 * inv);
  }
}

// An attention kernel over (row tiles, KV heads, splits) with nt threads and smem bytes of dynamic shared
// memory, then the merge of its splits (unless the kernel merged them, p.counters).
template <typename T, typename K>
cudaError_t launch_tiles(K kern, int nt, int smem, const AttnParams& p, cudaStream_t st) {
  cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  e = launch(kern, dim3(p.max_tiles, p.KVH, p.num_splits), nt, smem, st, p);
  if (e != cudaSuccess || p.counters != nullptr) return e;
  return attn_merge<T>(p, st);
}

inline bool sm90() {
  static const bool on = [] {
    int dev = 0, major = 0;
    return cudaGetDevice(&dev) == cudaSuccess &&
           cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major >= 9;
  }();
  return on;
}
// A decode kernel's loader, keys per stage and stages: $name (read at each launch, so that a sweep compares
// them in one process) = "16x2" or "16x3" (cp.async), "b16x2", "b16x3" (bulk copies, sm_90 only); else dflt.
inline int decode_tile(const char* name, int dflt) {
  const char* e = std::getenv(name);
  if (!e) return dflt;
  if (std::strcmp(e, "16x2") == 0) return 162;
  if (std::strcmp(e, "16x3") == 0) return 163;
  if (sm90() && std::strcmp(e, "b16x2") == 0) return 1162;
  if (sm90() && std::strcmp(e, "b16x3") == 0) return 1163;
  return dflt;
}

}  // namespace attn
}  // namespace g4

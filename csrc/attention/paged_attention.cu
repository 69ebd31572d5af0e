// Paged attention for prefill and decode: a CTA owns one request's tile of query rows (row =
// token·group + head-in-group, so the GQA heads that share a KV head are packed into one MMA operand), one
// KV head and one split of the key range. K/V pages stream through a multi-stage pipeline into shared memory
// (KvPipe: cp.async chunks, or on sm_90 one bulk copy per K/V row counted on an mbarrier); QKᵀ and PV run on
// tensor cores (mma.sync m16n8k16, fp32 accumulate), softmax online in fp32. Three tilings: 64 query rows
// (prefill), 16 rows (decode, speculative rows, prompt chunks beside decode rows) and, for pure decode with
// at most 8 query heads per KV head, 8 rows with the keys on the MMA's M side (attn_decode8_kernel). Splits
// (decode over long contexts) write normalised partials + log-sum-exp, combined by merge_kernel.
#include "common/mma.cuh"
#include "common/launchers.h"

namespace g4 {
namespace {

constexpr int kSplitKeys = 32;  // split sizes are multiples of this (KEYS_PER_STAGE in ops/attention.py)
// Decode CTAs (one computing warp per 256 output columns) get this many warps per computing warp, the
// extra ones only issuing K/V cp.async loads: one warp alone issues too few requests to keep HBM busy.
// H200, batch-100 decode of the 26B-A4B (sliding KV ~800 MB per layer), measured with the earlier 32-key x
// 2-stage pipeline: 35.0 ms per step with 1, 30.6 with 2, 30.7 with 4; 4 also costs occupancy (the computing
// warp's registers are reserved for every warp). Not re-tuned for the 16 x 3 pipeline.
constexpr int kDecodeLoaders = 2;

// KB keys per pipeline stage, NS stages in flight (NS - 1 tiles load while one is computed); BULK: the K/V
// rows arrive by bulk copies from the loader warps (KvPipe below), which needs LD >= 2.
template <typename T, int D, int WM, int LD = 1, int KB_ = 32, int NS_ = 2, bool BULK_ = false>
struct Cfg {
  static constexpr int KB = KB_, NS = NS_;
  static constexpr bool BULK = BULK_;
  static_assert(kSplitKeys % KB == 0 && KB % 16 == 0 && NS >= 2, "bad attention tile");
  static_assert(!BULK || LD >= 2, "bulk copies are issued by loader warps");
  static constexpr int DW = D > 256 ? 256 : D;      // output columns per warp
  static constexpr int DS = D / DW;                 // warps along D
  static constexpr int M = 16 * WM;                 // query rows per CTA
  static constexpr int CW = WM * DS;                // warps that compute
  static constexpr int NT = 32 * CW * LD;           // threads: LD warps per computing warp
  static constexpr int QB = M * D * 2;              // bytes: the Q tile
};

// Which request and row tile of M rows a CTA owns (blockIdx.x runs over every request's tiles), and the
// key range [ks, ke) of its split. A warp-wide scan over cu_seqlens, 32 requests a round (a serial walk
// costs a dependent load per request, microseconds for a CTA of batch-100 decode). b < 0: no tile.
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
      nt = (n * group + M - 1) / M;
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

template <typename T, int D, int WM, int LD, int KB_, int NS_, bool BULK_>
__global__ void __launch_bounds__(Cfg<T, D, WM, LD, KB_, NS_, BULK_>::NT)
attn_kernel(const AttnParams p) {
  pdl_wait();     // see common.cuh: before any read of an earlier kernel's output
  pdl_trigger();
  using C = Cfg<T, D, WM, LD, KB_, NS_, BULK_>;
  using Pipe = KvPipe<T, D, KB_, NS_, BULK_>;
  constexpr int M = C::M, DW = C::DW, NT = C::NT, KB = C::KB, NS = C::NS, RP = Pipe::RP;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw);

  const int kvh = blockIdx.y, split = blockIdx.z;
  const int group = p.H / p.KVH;
  const TileKeys tk = tile_keys<M>(p, group, split);
  if (tk.b < 0) return;
  const int q0 = tk.q0, first_q = tk.first_q, row0 = tk.row0, nrows = tk.nrows;
  const int ks = tk.ks, ke = tk.ke;
  const int lane = threadIdx.x % 32;
  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = warp % WM, wd = (warp / WM) % C::DS;
  const bool computes = warp < C::CW;   // the other warps only load K/V tiles (BULK) or help to
  const int g = lane / 4, t4 = lane % 4;
  Pipe kv;
  kv.init(smem_raw + C::QB, p, tk.b, ks, ke, kvh);

  load_q_tile<T, D, M>(Qs, p, tk, kvh, group);   // in the first commit group
  __syncthreads();   // the page slice (and the barriers) are visible to the loaders
  // BULK: the loader warps issue; else every thread does
  auto load_kv = [&](int kb, int stage) {
    if (!C::BULK) kv.issue(p, kb, stage, tid, NT);
    else if (!computes) kv.issue(p, kb, stage, tid - 32 * C::CW, NT - 32 * C::CW);
  };
  const int n_tiles = kv.prologue(load_kv);
  // per-thread rows: g and g+8 of this warp's 16
  int qpos[2], qblk[2];
  bool rvalid[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = wm * 16 + g + h * 8;
    rvalid[h] = r < nrows;
    const int tok = (row0 + (rvalid[h] ? r : 0)) / group;
    qpos[h] = first_q + tok;
    qblk[h] = p.block_ids ? p.block_ids[q0 + tok] : -1;
  }
  const float sl2 = p.scale * 1.4426950408889634f;
  float o[DW / 8][4];
#pragma unroll
  for (int i = 0; i < DW / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.f, 0.f};

  for (int it = 0; it < n_tiles; ++it) {
    cp_async_wait<NS - 2>();      // BULK: only the Q tile's group
    if (C::BULK && computes) kv.wait(it);
    // one barrier per tile: tile it is visible to every warp, and every warp has finished computing
    // tile it-1, whose stage the load below overwrites
    __syncthreads();
    if (it + NS - 1 < n_tiles) load_kv(ks + (it + NS - 1) * KB, (it + NS - 1) % NS);
    cp_async_commit();
    if (computes) {
      const T* Ks = kv.k_stage(it);
      const T* Vs = Ks + KB * RP;
      const int kb = ks + it * KB;
      // S = Q Kᵀ (16 rows x KB keys per warp)
      float s[KB / 8][4];
#pragma unroll
      for (int i = 0; i < KB / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll 4
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[4];
        ldsm_x4(a, Qs + swz<D>(wm * 16 + (lane % 16), kk * 16 + (lane / 16) * 8));
#pragma unroll
        for (int np = 0; np < KB / 16; ++np) {
          uint32_t bf[4];
          ldsm_x4(bf, Pipe::at(Ks, np * 16 + (lane % 8) + (lane / 16) * 8, kk * 16 + ((lane / 8) % 2) * 8));
          Mma<T>::run(s[2 * np], a, bf[0], bf[1]);
          Mma<T>::run(s[2 * np + 1], a, bf[2], bf[3]);
        }
      }
      // mask + online softmax (log2 domain)
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int nt = 0; nt < KB / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int h = e / 2;
          const int j = kb + nt * 8 + 2 * t4 + (e & 1);
          const bool ok = rvalid[h] && j < ke && key_visible(p, j, qpos[h], qblk[h], first_q, q0);
          const float v = ok ? s[nt][e] * sl2 : -INFINITY;
          s[nt][e] = v;
          mx[h] = fmaxf(mx[h], v);
        }
      float alpha[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
        alpha[h] = softmax_step(mrow[h], lrow[h], mx[h]);
      }
      uint32_t pa[KB / 16][4];
#pragma unroll
      for (int nt = 0; nt < KB / 8; ++nt) {
        const float p0 = exp2f(s[nt][0] - mx[0]), p1 = exp2f(s[nt][1] - mx[0]);
        const float p2 = exp2f(s[nt][2] - mx[1]), p3 = exp2f(s[nt][3] - mx[1]);
        lrow[0] += p0 + p1;
        lrow[1] += p2 + p3;
        pa[nt / 2][(nt % 2) * 2 + 0] = Mma<T>::pack(p0, p1);
        pa[nt / 2][(nt % 2) * 2 + 1] = Mma<T>::pack(p2, p3);
      }
#pragma unroll
      for (int i = 0; i < DW / 8; ++i) {
        o[i][0] *= alpha[0]; o[i][1] *= alpha[0];
        o[i][2] *= alpha[1]; o[i][3] *= alpha[1];
      }
      // O += P V for this warp's DW columns
#pragma unroll
      for (int kk = 0; kk < KB / 16; ++kk) {
#pragma unroll
        for (int dp = 0; dp < DW / 16; ++dp) {
          uint32_t bf[4];
          ldsm_x4_t(bf, Pipe::at(Vs, kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8, wd * DW + dp * 16 + (lane / 16) * 8));
          Mma<T>::run(o[2 * dp], pa[kk], bf[0], bf[1]);
          Mma<T>::run(o[2 * dp + 1], pa[kk], bf[2], bf[3]);
        }
      }
    }
  }
  cp_async_wait<0>();
  if (!computes) return;
  // ---- finalize ----
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    lrow[h] += __shfl_xor_sync(0xffffffffu, lrow[h], 1);
    lrow[h] += __shfl_xor_sync(0xffffffffu, lrow[h], 2);
  }
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (!rvalid[h]) continue;
    const int r = row0 + wm * 16 + g + h * 8;
    const int tok = q0 + r / group, head = kvh * group + r % group;
    const float inv = lrow[h] > 0.f ? 1.f / lrow[h] : 0.f;
    if (p.num_splits == 1) {
      T* orow = out + (int64_t)tok * p.so_t + (int64_t)head * p.so_h + wd * DW;
#pragma unroll
      for (int nt = 0; nt < DW / 8; ++nt) {
        orow[nt * 8 + 2 * t4] = from_f<T>(o[nt][2 * h] * inv);
        orow[nt * 8 + 2 * t4 + 1] = from_f<T>(o[nt][2 * h + 1] * inv);
      }
    } else {
      const int64_t base = ((int64_t)split * p.T + tok) * p.H + head;
      float* orow = p.ws_o + base * D + wd * DW;
#pragma unroll
      for (int nt = 0; nt < DW / 8; ++nt)
        *reinterpret_cast<float2*>(orow + nt * 8 + 2 * t4) = make_float2(o[nt][2 * h] * inv, o[nt][2 * h + 1] * inv);
      if (wd == 0 && t4 == 0) p.ws_lse[base] = lrow[h] > 0.f ? mrow[h] + log2f(lrow[h]) : -INFINITY;
    }
  }
}

// ---- Decode tiles of 8 query rows with the keys on the MMA's M side ----------------------------------
// A decode tile holds one token's `group` query heads (group <= 8 for every Gemma 4 sliding layer and the
// full layers of all but the 12B). With the query rows as the MMA's M (16 rows, above) such a tile wastes
// half or more of every QKᵀ and PV instruction, and its PV accumulator (16 rows x 256 columns) takes 128
// registers a thread. Here the operands swap: Sᵀ = K·Qᵀ (16 keys x 8 query rows per MMA) and
// Oᵀ = Vᵀ·Pᵀ (16 output columns x 8 rows per MMA): half the MMAs and half the accumulator. Pᵀ's B fragments
// come from Sᵀ's accumulators through four shuffles per 16 keys. Only the loader warps issue K/V copies, with
// the CTA's page-table slice staged in shared memory, so the computing warp never waits on an address.
template <int D, int KB_, int NS_, bool BULK_>
struct Cfg8 {
  static constexpr int KB = KB_, NS = NS_;
  static constexpr bool BULK = BULK_;
  static_assert(kSplitKeys % KB == 0 && KB % 16 == 0 && NS >= 2, "bad attention tile");
  static constexpr int DW = D > 256 ? 256 : D;          // output columns per computing warp
  static constexpr int CW = D / DW;                     // computing warps (each computes the whole Sᵀ)
  static constexpr int LW = CW;                         // loader warps
  static constexpr int NT = 32 * (CW + LW);
  static constexpr int QB = 8 * D * 2;                  // bytes: the Q tile
  static constexpr int OP = D + 4;                      // fp32 row pitch of the output staging (no bank conflicts)
};

template <typename T, int D, int KB_, int NS_, bool BULK_>
__global__ void __launch_bounds__(Cfg8<D, KB_, NS_, BULK_>::NT)
attn_decode8_kernel(const AttnParams p) {
  pdl_wait();     // see common.cuh: before any read of an earlier kernel's output
  pdl_trigger();
  using C = Cfg8<D, KB_, NS_, BULK_>;
  using Pipe = KvPipe<T, D, KB_, NS_, BULK_>;
  static_assert(8 * C::OP * 4 <= Pipe::STAGE_BYTES, "output staging reuses the K/V stages");
  constexpr int DW = C::DW, NT = C::NT, KB = C::KB, NS = C::NS, MT = KB / 16, RP = Pipe::RP;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw);

  const int kvh = blockIdx.y, split = blockIdx.z;
  const int group = p.H / p.KVH;
  const TileKeys tk = tile_keys<8>(p, group, split);
  if (tk.b < 0) return;
  const int q0 = tk.q0, first_q = tk.first_q, row0 = tk.row0, nrows = tk.nrows, ks = tk.ks, ke = tk.ke;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const bool computes = warp < C::CW;
  const int g = lane / 4, t4 = lane % 4;
  Pipe kv;
  kv.init(smem_raw + C::QB, p, tk.b, ks, ke, kvh);

  load_q_tile<T, D, 8>(Qs, p, tk, kvh, group);   // in the first commit group
  __syncthreads();   // the page slice (and the barriers) are visible to the loaders
  auto load_kv = [&](int kb, int stage) {   // the loader warps only
    if (!computes) kv.issue(p, kb, stage, tid - 32 * C::CW, 32 * C::LW);
  };
  const int n_tiles = kv.prologue(load_kv);
  // this thread's two query rows (Sᵀ and Oᵀ columns 2·t4 and 2·t4 + 1)
  int qpos[2], qblk[2];
  bool cval[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int c = 2 * t4 + h;
    cval[h] = c < nrows;
    const int tok = (row0 + (cval[h] ? c : 0)) / group;
    qpos[h] = first_q + tok;
    qblk[h] = p.block_ids ? p.block_ids[q0 + tok] : -1;
  }
  const float sl2 = p.scale * 1.4426950408889634f;
  const int wd = computes ? warp : 0;
  float o[DW / 16][4];
#pragma unroll
  for (int i = 0; i < DW / 16; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float mcol[2] = {-INFINITY, -INFINITY}, lcol[2] = {0.f, 0.f};   // lcol: this thread's keys only

  for (int it = 0; it < n_tiles; ++it) {
    cp_async_wait<NS - 2>();      // BULK: only the Q tile's group
    if (C::BULK && computes) kv.wait(it);
    __syncthreads();   // tile it is visible; every warp is done with tile it-1, whose stage is refilled below
    if (it + NS - 1 < n_tiles) load_kv(ks + (it + NS - 1) * KB, (it + NS - 1) % NS);
    cp_async_commit();
    if (!computes || p.probe) continue;
    const T* Ks = kv.k_stage(it);
    const T* Vs = Ks + KB * RP;
    const int kb = ks + it * KB;
    // Sᵀ = K Qᵀ: two accumulators per 16 keys halve the dependent MMA chain
    float s[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      float s2[4] = {0.f, 0.f, 0.f, 0.f};
      s[mt][0] = s[mt][1] = s[mt][2] = s[mt][3] = 0.f;
#pragma unroll 4
      for (int kk = 0; kk < D / 16; kk += 2) {
        uint32_t qb[4], ka[4], kb2[4];
        ldsm_x4(qb, Qs + swz<D>(lane % 8, kk * 16 + (lane / 8) * 8));
        ldsm_x4(ka, Pipe::at(Ks, mt * 16 + lane % 16, kk * 16 + (lane / 16) * 8));
        ldsm_x4(kb2, Pipe::at(Ks, mt * 16 + lane % 16, (kk + 1) * 16 + (lane / 16) * 8));
        Mma<T>::run(s[mt], ka, qb[0], qb[1]);
        Mma<T>::run(s2, kb2, qb[2], qb[3]);
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) s[mt][e] += s2[e];
    }
    // mask + online softmax per column (log2 domain); element e: key g + 8·(e/2), column 2·t4 + (e&1)
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e & 1;
        const int j = kb + mt * 16 + g + (e >> 1) * 8;
        const bool ok = cval[h] && j < ke && key_visible(p, j, qpos[h], qblk[h], first_q, q0);
        const float v = ok ? s[mt][e] * sl2 : -INFINITY;
        s[mt][e] = v;
        mx[h] = fmaxf(mx[h], v);
      }
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int o2 = 4; o2 < 32; o2 <<= 1) mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], o2));
      alpha[h] = softmax_step(mcol[h], lcol[h], mx[h]);
    }
    // Pᵀ as the PV MMA's B fragments: lane (g, t4) takes keys 2·t4, 2·t4+1 (+8) of column g from lanes
    // 8·t4 + g/2 and 8·t4 + 4 + g/2, which hold columns g & ~1 and g | 1 packed in one register
    uint32_t pb[MT][2];
    const int src = 8 * t4 + g / 2;
    const unsigned sel = (g & 1) ? 0x7632u : 0x5410u;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const float p0 = exp2f(s[mt][0] - mx[0]), p1 = exp2f(s[mt][1] - mx[1]);
      const float p2 = exp2f(s[mt][2] - mx[0]), p3 = exp2f(s[mt][3] - mx[1]);
      lcol[0] += p0 + p2;
      lcol[1] += p1 + p3;
      const uint32_t lo = Mma<T>::pack(p0, p1), hi = Mma<T>::pack(p2, p3);
      const uint32_t x0 = __shfl_sync(0xffffffffu, lo, src), x1 = __shfl_sync(0xffffffffu, lo, src + 4);
      const uint32_t y0 = __shfl_sync(0xffffffffu, hi, src), y1 = __shfl_sync(0xffffffffu, hi, src + 4);
      pb[mt][0] = __byte_perm(x0, x1, sel);
      pb[mt][1] = __byte_perm(y0, y1, sel);
    }
#pragma unroll
    for (int i = 0; i < DW / 16; ++i) {
      o[i][0] *= alpha[0]; o[i][1] *= alpha[1];
      o[i][2] *= alpha[0]; o[i][3] *= alpha[1];
    }
    // Oᵀ += Vᵀ Pᵀ for this warp's DW columns
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int dm = 0; dm < DW / 16; ++dm) {
        uint32_t va[4];
        ldsm_x4_t(va, Pipe::at(Vs, mt * 16 + (lane % 8) + (lane / 16) * 8, wd * DW + dm * 16 + ((lane / 8) % 2) * 8));
        Mma<T>::run(o[dm], va, pb[mt][0], pb[mt][1]);
      }
  }
  cp_async_wait<0>();
  __syncthreads();   // every stage is free (each tile was waited for): the output is staged there
  float* Os = reinterpret_cast<float*>(smem_raw + C::QB);
  if (computes) {
    float inv[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int o2 = 4; o2 < 32; o2 <<= 1) lcol[h] += __shfl_xor_sync(0xffffffffu, lcol[h], o2);
      inv[h] = lcol[h] > 0.f ? 1.f / lcol[h] : 0.f;
    }
#pragma unroll
    for (int dm = 0; dm < DW / 16; ++dm)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        Os[(2 * t4 + (e & 1)) * C::OP + wd * DW + dm * 16 + g + (e >> 1) * 8] = o[dm][e] * inv[e & 1];
    if (p.num_splits > 1 && wd == 0 && g == 0) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = row0 + 2 * t4 + h;
        if (!cval[h]) continue;
        const int64_t base = ((int64_t)split * p.T + q0 + r / group) * p.H + kvh * group + r % group;
        p.ws_lse[base] = lcol[h] > 0.f ? mcol[h] + log2f(lcol[h]) : -INFINITY;
      }
    }
  }
  __syncthreads();
  for (int id = tid; id < nrows * (D / 4); id += NT) {
    const int r = id / (D / 4), c = (id % (D / 4)) * 4;
    const float4 v = *reinterpret_cast<const float4*>(Os + r * C::OP + c);
    const int rr = row0 + r;
    const int tok = q0 + rr / group, head = kvh * group + rr % group;
    if (p.num_splits == 1) {
      T* orow = static_cast<T*>(p.out) + (int64_t)tok * p.so_t + (int64_t)head * p.so_h + c;
      const uint32_t lo = Mma<T>::pack(v.x, v.y), hi = Mma<T>::pack(v.z, v.w);
      *reinterpret_cast<uint2*>(orow) = make_uint2(lo, hi);
    } else {
      *reinterpret_cast<float4*>(p.ws_o + (((int64_t)split * p.T + tok) * p.H + head) * D + c) = v;
    }
  }
}

// out[t, h] = Σ_s 2^(lse_s − max) O_s / Σ_s 2^(lse_s − max). One block per (token, head): the split
// weights are computed once into shared memory, then kMergeThreads / (D/4) thread groups each sum a
// share of the splits (float4 columns), and the groups' partial sums are added in shared memory — a
// dependent chain of S / groups loads instead of S.
constexpr int kMergeThreads = 256;
inline size_t merge_smem(int S, int D) {
  return sizeof(float) * ((size_t)S + (size_t)(kMergeThreads / (D / 4)) * D + kMergeThreads / 32 + 1);
}
template <typename T>
__global__ void __launch_bounds__(kMergeThreads) merge_kernel(const AttnParams p) {
  pdl_wait();     // see common.cuh: before any read of an earlier kernel's output
  pdl_trigger();
  extern __shared__ float msh[];
  const int64_t th = blockIdx.x;  // token * H + head
  const int tok = (int)(th / p.H), head = (int)(th % p.H);
  const int S = p.num_splits, D = p.D, cols = D / 4, groups = kMergeThreads / cols;
  const int64_t stride = (int64_t)p.T * p.H;
  if (tok >= p.cu_seqlens_q[p.B]) {
    // a padded row (a CUDA graph's tokens past the last request): no CTA wrote its partials; zero it
    if (threadIdx.x < cols) {
      T* orow = static_cast<T*>(p.out) + (int64_t)tok * p.so_t + (int64_t)head * p.so_h + threadIdx.x * 4;
#pragma unroll
      for (int i = 0; i < 4; ++i) orow[i] = from_f<T>(0.f);
    }
    return;
  }
  float* wsh = msh;                 // [S] split weights
  float* part = msh + S;            // [groups][D] partial sums
  float* red = part + groups * D;   // reduction scratch
  float mx = -INFINITY;
  for (int s = threadIdx.x; s < S; s += kMergeThreads) mx = fmaxf(mx, p.ws_lse[s * stride + th]);
  mx = block_max(mx, red);
  float den = 0.f;
  for (int s = threadIdx.x; s < S; s += kMergeThreads) {
    const float l = p.ws_lse[s * stride + th];
    const float w = l == -INFINITY ? 0.f : exp2f(l - mx);
    wsh[s] = w;
    den += w;
  }
  __syncthreads();  // block_sum's first barrier would do; explicit for wsh
  den = block_sum(den, red);
  const int g = threadIdx.x / cols, c = (threadIdx.x % cols) * 4;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  if (g < groups) {
#pragma unroll 4
    for (int s = g; s < S; s += groups) {
      const float w = wsh[s];
      if (w == 0.f) continue;
      const float4 v = *reinterpret_cast<const float4*>(p.ws_o + (s * stride + th) * D + c);
      acc[0] += w * v.x; acc[1] += w * v.y; acc[2] += w * v.z; acc[3] += w * v.w;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) part[g * D + c + i] = acc[i];
  }
  __syncthreads();
  if (threadIdx.x >= cols) return;
  const float inv = den > 0.f ? 1.f / den : 0.f;
  T* orow = static_cast<T*>(p.out) + (int64_t)tok * p.so_t + (int64_t)head * p.so_h;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float t = 0.f;
    for (int gg = 0; gg < groups; ++gg) t += part[gg * D + c + i];
    orow[c + i] = from_f<T>(t * inv);
  }
}

template <typename T>
cudaError_t run_merge(const AttnParams& p, cudaStream_t st) {
  if (p.num_splits == 1) return cudaSuccess;
  if (merge_smem(p.num_splits, p.D) > 48 * 1024) return cudaErrorInvalidValue;   // > 9000 splits: never planned
  return launch(merge_kernel<T>, (unsigned)((int64_t)p.T * p.H), kMergeThreads, merge_smem(p.num_splits, p.D), st,
                p);
}

template <typename T, int D, int WM, int LD, int KB = 32, int NS = 2, bool BULK = false>
cudaError_t run(const AttnParams& p, cudaStream_t st) {
  using C = Cfg<T, D, WM, LD, KB, NS, BULK>;
  using Pipe = KvPipe<T, D, KB, NS, BULK>;
  constexpr int smem = C::QB + Pipe::STAGE_BYTES + Pipe::EXTRA_BYTES;
  auto kern = attn_kernel<T, D, WM, LD, KB, NS, BULK>;
  cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  dim3 grid(p.max_tiles, p.KVH, p.num_splits);
  e = launch(kern, grid, C::NT, smem, st, p);
  if (e != cudaSuccess) return e;
  return run_merge<T>(p, st);
}

template <typename T, int D, int KB, int NS, bool BULK>
cudaError_t run8(const AttnParams& p, cudaStream_t st) {
  using C = Cfg8<D, KB, NS, BULK>;
  using Pipe = KvPipe<T, D, KB, NS, BULK>;
  constexpr int smem = C::QB + Pipe::STAGE_BYTES + Pipe::EXTRA_BYTES;
  auto kern = attn_decode8_kernel<T, D, KB, NS, BULK>;
  cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  dim3 grid(p.max_tiles, p.KVH, p.num_splits);
  e = launch(kern, grid, C::NT, smem, st, p);
  if (e != cudaSuccess) return e;
  return run_merge<T>(p, st);
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

// 16-row decode tiles (GEMMA4RT_DECODE16_TILE): bulk copies, 16 keys x 2 stages on sm_90, else cp.async 16 x 3
// (32 x 2 where a CTA owns a single 32-key split). H200, batch 100 at ~1.1k context (bench/kernels/decode_sweep.py,
// µs per layer at the plan, b16x2 / b16x3 / cp.async 16x3): 26B-A4B sliding 268 / 274 / 510, full 156 / 232 / 245,
// E2B sliding 30 / 40 / 59, 12B full 104 / 145 / 158; batch 1: E2B sliding 10.8 / 11.7 / 12.0. (b16x3 at head
// dim 512 fits one CTA an SM.) The cp.async timings of that run were ~1.4x those of the run before it on
// another H200; the bulk ones agreed within ~3%.
template <typename T, int D>
cudaError_t run_decode(const AttnParams& p, cudaStream_t st) {
  switch (decode_tile("GEMMA4RT_DECODE16_TILE", sm90() ? 1162 : 163)) {
    case 162: return run<T, D, 1, kDecodeLoaders, 16, 2>(p, st);
    case 1162: return run<T, D, 1, kDecodeLoaders, 16, 2, true>(p, st);
    case 1163: return run<T, D, 1, kDecodeLoaders, 16, 3, true>(p, st);
    default:
      if (p.num_splits > 1 && p.split_size <= 32) return run<T, D, 1, kDecodeLoaders, 32, 2>(p, st);
      return run<T, D, 1, kDecodeLoaders, 16, 3>(p, st);
  }
}

// 8-row decode tiles (GEMMA4RT_DECODE8_TILE): bulk copies, 16 keys x 3 stages on sm_90, else cp.async 16 x 2.
// H200, batch 100 at ~1.1k context (bench/kernels/decode_sweep.py, µs per layer, b16x3 / b16x2 at the plan of
// each; the 16-row kernel's cp.async 16 x 3 in the same run of the first sweep): 26B-A4B sliding 241 / 286
// (346), 31B sliding 416 / 460 (659), 31B full 266 / 289 (415), E4B sliding 42 / 44 (61), E2B sliding 29 / 32
// (36), E2B full 89 / 82 (124); cp.async 16 x 2 was 0.9-1.2x the 16-row kernel.
template <typename T, int D>
cudaError_t run_decode8(const AttnParams& p, cudaStream_t st) {
  switch (decode_tile("GEMMA4RT_DECODE8_TILE", sm90() ? 1163 : 162)) {
    case 163: return run8<T, D, 16, 3, false>(p, st);
    case 1162: return run8<T, D, 16, 2, true>(p, st);
    case 1163: return run8<T, D, 16, 3, true>(p, st);
    default: return run8<T, D, 16, 2, false>(p, st);
  }
}

}  // namespace

cudaError_t launch_paged_attention(int dtype, const AttnParams& params, cudaStream_t st) {
  if (params.T == 0 || params.max_tiles == 0) return cudaSuccess;
  AttnParams p = params;
  // GEMMA4RT_ATTN_PROBE=1 (benchmarks only): the 8-row decode kernel loads K/V but computes nothing, which
  // measures its load path alone; the output is garbage
  const char* probe = std::getenv("GEMMA4RT_ATTN_PROBE");
  p.probe = probe && std::strcmp(probe, "1") == 0;
  if (p.num_splits > 1 && (p.split_size % kSplitKeys) != 0) return cudaErrorInvalidValue;
#define G4_ATTN(T)                                                                            \
  if (p.D == 256)                                                                             \
    return p.warps_m == 0 ? run_decode8<T, 256>(p, st) : p.warps_m == 1 ? run_decode<T, 256>(p, st) \
                                                                        : run<T, 256, 4, 1>(p, st); \
  if (p.D == 512)                                                                             \
    return p.warps_m == 0 ? run_decode8<T, 512>(p, st) : p.warps_m == 1 ? run_decode<T, 512>(p, st) \
                                                                        : run<T, 512, 4, 1>(p, st); \
  return cudaErrorInvalidValue;
  if (dtype == kBF16) { G4_ATTN(__nv_bfloat16) }
  if (dtype == kF16) { G4_ATTN(__half) }
#undef G4_ATTN
  return cudaErrorInvalidValue;
}

}  // namespace g4

// Paged attention for prefill and decode: a CTA owns one request's tile of query rows (row =
// token·group + head-in-group, so the GQA heads that share a KV head are packed into one MMA operand), one
// KV head and one split of the key range. K/V pages stream through a multi-stage pipeline into shared memory
// (KvPipe: cp.async chunks, or on sm_90 one bulk copy per K/V row counted on an mbarrier); QKᵀ and PV run on
// tensor cores (mma.sync m16n8k16, fp32 accumulate), softmax online in fp32. Three tilings: 64 query rows
// (prefill), 16 rows (decode, speculative rows) and, for decode with at most 8 query heads per KV head, 8 rows
// with the keys on the MMA's M side (decode8_attention.cu). A mixed step runs two launches, each over the
// requests its q_sel selects. Splits (decode over long contexts) write normalised partials + log-sum-exp,
// combined by the last split CTA of each tile (merge_tile_if_last) or, without counters, by merge_kernel.
#include "attention/attn_common.cuh"

namespace g4 {
namespace {
using namespace attn;

// Decode CTAs (one computing warp per 256 output columns) get this many warps per computing warp, the
// extra ones only issuing K/V cp.async loads: one warp alone issues too few requests to keep HBM busy.
// H200, batch-100 decode of the 26B-A4B (sliding KV ~800 MB per layer), measured with the earlier 32-key x
// 2-stage pipeline: 35.0 ms per step with 1, 30.6 with 2, 30.7 with 4; 4 also costs occupancy (the computing
// warp's registers are reserved for every warp). Not re-tuned for the 16 x 3 pipeline.
constexpr int kDecodeLoaders = 2;

// KB keys per pipeline stage, NS stages in flight (NS - 1 tiles load while one is computed); BULK: the K/V
// rows arrive by bulk copies from the loader warps (KvPipe below), which needs LD >= 2. Measured and not kept for
// the 64-row tiles: 128 output columns a warp (twice the warps, each also computing the tile's Q·Kᵀ; 128 registers,
// two CTAs an SM), H200, 4096-token prefill: 31B full 8525 vs 6511 µs, 31B sliding 1422 vs 1237, 26B-A4B sliding
// 765 vs 673; the 12B's mixed step (100 decode rows + 600 prompt tokens) 45.76 vs 45.94 ms.
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
          const float v = masked_score(p, s[nt][e], sl2, rvalid[h], j, ke, qpos[h], qblk[h], first_q, q0);
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
  if (computes) {     // ---- finalize (the loader warps only join the merge below) ----
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
  merge_tile_if_last<T, NT>(p, q0, row0, nrows, group, kvh);
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
  if (p.q_sel != 0) {
    // one launch of a mixed step: rows of the requests the other launch covers are not this merge's
    int lo = 0, hi = p.B - 1;     // the request owning tok: the last b with cu[b] <= tok
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (p.cu_seqlens_q[mid] <= tok) lo = mid; else hi = mid - 1;
    }
    if ((p.q_sel == 1) != (p.cu_seqlens_q[lo + 1] - p.cu_seqlens_q[lo] == 1)) return;
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

template <typename T, int D, int WM, int LD, int KB = 32, int NS = 2, bool BULK = false>
cudaError_t run(const AttnParams& p, cudaStream_t st) {
  using C = Cfg<T, D, WM, LD, KB, NS, BULK>;
  using Pipe = KvPipe<T, D, KB, NS, BULK>;
  return launch_tiles<T>(attn_kernel<T, D, WM, LD, KB, NS, BULK>, C::NT,
                         C::QB + Pipe::STAGE_BYTES + Pipe::EXTRA_BYTES, p, st);
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

}  // namespace

template <typename T>
cudaError_t attn_merge(const AttnParams& p, cudaStream_t st) {
  if (p.num_splits == 1) return cudaSuccess;
  if (merge_smem(p.num_splits, p.D) > 48 * 1024) return cudaErrorInvalidValue;   // > 9000 splits: never planned
  return launch(merge_kernel<T>, (unsigned)((int64_t)p.T * p.H), kMergeThreads, merge_smem(p.num_splits, p.D), st,
                p);
}
template cudaError_t attn_merge<__nv_bfloat16>(const AttnParams&, cudaStream_t);
template cudaError_t attn_merge<__half>(const AttnParams&, cudaStream_t);

cudaError_t launch_paged_attention(int dtype, const AttnParams& params, cudaStream_t st) {
  if (params.T == 0 || params.max_tiles == 0) return cudaSuccess;
  AttnParams p = params;
  // GEMMA4RT_ATTN_PROBE=1 (benchmarks only): the 8-row decode kernel loads K/V but computes nothing, which
  // measures its load path alone; the output is garbage
  const char* probe = std::getenv("GEMMA4RT_ATTN_PROBE");
  p.probe = probe && std::strcmp(probe, "1") == 0;
  if (p.num_splits > 1 && (p.split_size % attn::kSplitKeys) != 0) return cudaErrorInvalidValue;
  if (p.warps_m == 0) return launch_attn_decode8(dtype, p, st);
#define G4_ATTN(T)                                                                            \
  if (p.D == 256) return p.warps_m == 1 ? run_decode<T, 256>(p, st) : run<T, 256, 4, 1>(p, st); \
  if (p.D == 512) return p.warps_m == 1 ? run_decode<T, 512>(p, st) : run<T, 512, 4, 1>(p, st); \
  return cudaErrorInvalidValue;
  if (dtype == kBF16) { G4_ATTN(__nv_bfloat16) }
  if (dtype == kF16) { G4_ATTN(__half) }
#undef G4_ATTN
  return cudaErrorInvalidValue;
}

}  // namespace g4

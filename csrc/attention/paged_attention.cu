// Paged attention for prefill and decode (one kernel): a CTA owns one request's tile of M query
// rows (row = token·group + head-in-group, so the GQA heads that share a KV head are packed into
// the MMA's M dimension), one KV head and one split of the key range. K/V pages stream through a
// multi-stage cp.async pipeline into swizzled shared memory; QKᵀ and PV run on tensor cores
// (mma.sync m16n8k16, fp32 accumulate), softmax online in fp32. Splits (decode over long contexts)
// write normalised partials + log-sum-exp, combined by merge_kernel.
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

// KB keys per pipeline stage, NS stages in flight (NS - 1 tiles load while one is computed).
template <typename T, int D, int WM, int LD = 1, int KB_ = 32, int NS_ = 2>
struct Cfg {
  static constexpr int KB = KB_, NS = NS_;
  static_assert(kSplitKeys % KB == 0 && KB % 16 == 0 && NS >= 2, "bad attention tile");
  static constexpr int DW = D > 256 ? 256 : D;      // output columns per warp
  static constexpr int DS = D / DW;                 // warps along D
  static constexpr int M = 16 * WM;                 // query rows per CTA
  static constexpr int CW = WM * DS;                // warps that compute
  static constexpr int NT = 32 * CW * LD;           // threads: LD warps per computing warp
  static constexpr int SMEM = (M * D + NS * 2 * KB * D) * 2;
};

template <typename T, int D, int WM, int LD, int KB_, int NS_>
__global__ void __launch_bounds__(Cfg<T, D, WM, LD, KB_, NS_>::NT)
attn_kernel(const AttnParams p) {
  pdl_wait();     // see common.cuh: before any read of an earlier kernel's output
  pdl_trigger();
  using C = Cfg<T, D, WM, LD, KB_, NS_>;
  constexpr int M = C::M, DW = C::DW, NT = C::NT, CH = D / 8, KB = C::KB, NS = C::NS;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* KVs = Qs + M * D;  // stage s: K at KVs + s*2*KB*D, V right after

  const int kvh = blockIdx.y, split = blockIdx.z;
  const int group = p.H / p.KVH;
  // ---- which request / tile does this CTA own: a warp-wide scan over cu_seqlens, 32 requests a round
  // (a serial walk costs a dependent load per request, microseconds for a CTA of batch-100 decode) ----
  const int lane = threadIdx.x % 32;
  int b = -1, tile = 0, n_q = 0, q0 = 0;
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
      b = base + src;
      tile = x - __shfl_sync(0xffffffffu, incl - nt, src);
      n_q = __shfl_sync(0xffffffffu, n, src);
      q0 = __shfl_sync(0xffffffffu, a0, src);
      break;
    }
    acc += __shfl_sync(0xffffffffu, incl, 31);
  }
  if (b < 0) return;
  const int L = p.seq_lens[b];
  const int first_q = L - n_q;
  const int row0 = tile * M;
  const int nrows = min(M, n_q * group - row0);
  const int minq = first_q + row0 / group;
  const int maxq = first_q + (row0 + nrows - 1) / group;
  int k_lo = p.window > 0 ? max(0, minq - p.window + 1) : 0;
  int k_hi = p.block_ids ? L : maxq + 1;
  int ks = k_lo, ke = k_hi;
  if (p.num_splits > 1) {
    ks = k_lo + split * p.split_size;
    ke = min(k_hi, ks + p.split_size);
  }
  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = warp % WM, wd = (warp / WM) % C::DS;
  const bool computes = warp < C::CW;   // the other warps only help load K/V tiles
  const int g = lane / 4, t4 = lane % 4;

  const T* q = static_cast<const T*>(p.q);
  const T* kc = static_cast<const T*>(p.kc);
  const T* vc = static_cast<const T*>(p.vc);
  const int32_t* ptab = p.page_table + (int64_t)b * p.spt;

  // ---- Q tile -> smem ----
  for (int id = tid; id < M * CH; id += NT) {
    const int r = id / CH, c = id % CH;
    const bool ok = r < nrows;
    const int rr = row0 + (ok ? r : 0);
    const T* src = q + (int64_t)(q0 + rr / group) * p.sq_t + (int64_t)(kvh * group + rr % group) * p.sq_h + c * 8;
    cp_async16(Qs + swz<D>(r, c * 8), src, ok);
  }
  auto load_kv = [&](int kb, int stage) {
    T* Ks = KVs + stage * 2 * KB * D;
    T* Vs = Ks + KB * D;
    for (int id = tid; id < KB * CH; id += NT) {
      const int r = id / CH, c = id % CH;
      const int j = kb + r;
      const bool ok = j < ke;
      const int jj = ok ? j : ks;
      const int64_t page = ptab[jj / p.page_size], slot = jj % p.page_size;
      cp_async16(Ks + swz<D>(r, c * 8), kc + page * p.sk_p + slot * p.sk_s + (int64_t)kvh * p.sk_h + c * 8, ok);
      cp_async16(Vs + swz<D>(r, c * 8), vc + page * p.sv_p + slot * p.sv_s + (int64_t)kvh * p.sv_h + c * 8, ok);
    }
  };
  const int n_tiles = ke > ks ? (ke - ks + KB - 1) / KB : 0;
  // prologue: tiles 0 .. NS-2 in flight (one commit group each, empty past the end, so that
  // cp_async_wait<NS-2> below always means "tile it has landed")
#pragma unroll
  for (int s = 0; s < NS - 1; ++s) {
    if (s < n_tiles) load_kv(ks + s * KB, s);
    cp_async_commit();
  }
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
    cp_async_wait<NS - 2>();
    // one barrier per tile: tile it is visible to every warp, and every warp has finished computing
    // tile it-1, whose stage the load below overwrites
    __syncthreads();
    if (it + NS - 1 < n_tiles) load_kv(ks + (it + NS - 1) * KB, (it + NS - 1) % NS);
    cp_async_commit();
    if (computes) {
      const T* Ks = KVs + (it % NS) * 2 * KB * D;
      const T* Vs = Ks + KB * D;
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
          ldsm_x4(bf, Ks + swz<D>(np * 16 + (lane % 8) + (lane / 16) * 8, kk * 16 + ((lane / 8) % 2) * 8));
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
          bool ok = rvalid[h] && j < ke;
          if (ok) {
            const bool win = p.window <= 0 || j > qpos[h] - p.window;
            bool vis = j <= qpos[h] && win;
            if (!vis && p.block_ids && qblk[h] >= 0 && j >= first_q && win)
              vis = p.block_ids[q0 + (j - first_q)] == qblk[h];
            ok = vis;
          }
          const float v = ok ? s[nt][e] * sl2 : -INFINITY;
          s[nt][e] = v;
          mx[h] = fmaxf(mx[h], v);
        }
      float alpha[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
        const float mn = fmaxf(mrow[h], mx[h]);
        const float mu = mn == -INFINITY ? 0.f : mn;
        alpha[h] = exp2f(mrow[h] - mu);
        lrow[h] *= alpha[h];
        mrow[h] = mn;
        mx[h] = mu;
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
          ldsm_x4_t(bf, Vs + swz<D>(kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8, wd * DW + dp * 16 + (lane / 16) * 8));
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

template <typename T, int D, int WM, int LD, int KB = 32, int NS = 2>
cudaError_t run(const AttnParams& p, cudaStream_t st) {
  using C = Cfg<T, D, WM, LD, KB, NS>;
  auto kern = attn_kernel<T, D, WM, LD, KB, NS>;
  cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM);
  if (e != cudaSuccess) return e;
  dim3 grid(p.max_tiles, p.KVH, p.num_splits);
  e = launch(kern, grid, C::NT, C::SMEM, st, p);
  if (e != cudaSuccess || p.num_splits == 1) return e;
  if (merge_smem(p.num_splits, p.D) > 48 * 1024) return cudaErrorInvalidValue;   // > 9000 splits: never planned
  return launch(merge_kernel<T>, (unsigned)((int64_t)p.T * p.H), kMergeThreads, merge_smem(p.num_splits, p.D), st,
                p);
}

// Decode pipeline, from bench/kernels/decode_sweep.py on an H200 (batch 100, ~1.1k context, bf16):
// 16 keys x 3 stages beat 32 x 2 by 2-22% (26B-A4B sliding layer 353 -> 347 µs, full 274 -> 228 µs,
// E2B sliding 45 -> 35 µs; 32 x 3 and 16 x 4 were slower than both), except where a CTA owns a single
// 32-key split (batch 1): there the 32 x 2 tile is ~1 µs faster.
template <typename T, int D>
cudaError_t run_decode(const AttnParams& p, cudaStream_t st) {
  if (p.num_splits > 1 && p.split_size <= 32) return run<T, D, 1, kDecodeLoaders, 32, 2>(p, st);
  return run<T, D, 1, kDecodeLoaders, 16, 3>(p, st);
}

}  // namespace

cudaError_t launch_paged_attention(int dtype, const AttnParams& p, cudaStream_t st) {
  if (p.T == 0 || p.max_tiles == 0) return cudaSuccess;
  if (p.num_splits > 1 && (p.split_size % kSplitKeys) != 0) return cudaErrorInvalidValue;
#define G4_ATTN(T)                                                       \
  if (p.D == 256) return p.warps_m == 1 ? run_decode<T, 256>(p, st) : run<T, 256, 4, 1>(p, st); \
  if (p.D == 512) return p.warps_m == 1 ? run_decode<T, 512>(p, st) : run<T, 512, 4, 1>(p, st); \
  return cudaErrorInvalidValue;
  if (dtype == kBF16) { G4_ATTN(__nv_bfloat16) }
  if (dtype == kF16) { G4_ATTN(__half) }
#undef G4_ATTN
  return cudaErrorInvalidValue;
}

}  // namespace g4

// Paged decode attention in tiles of 8 query rows with the keys on the MMA's M side (see the kernel's comment);
// the plan (gemma4rt/ops/attention.py) picks it for pure decode steps of layers with at most 8 query heads per
// KV head (warps_m == 0). Shares its tile lookup, masking and K/V pipeline with paged_attention.cu.
#include "attention/attn_common.cuh"

namespace g4 {
namespace {
using namespace attn;

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
        const float v = masked_score(p, s[mt][e], sl2, cval[h], j, ke, qpos[h], qblk[h], first_q, q0);
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
  merge_tile_if_last<T, NT>(p, q0, row0, nrows, group, kvh);
}

template <typename T, int D, int KB, int NS, bool BULK>
cudaError_t run8(const AttnParams& p, cudaStream_t st) {
  using C = Cfg8<D, KB, NS, BULK>;
  using Pipe = KvPipe<T, D, KB, NS, BULK>;
  return launch_tiles<T>(attn_decode8_kernel<T, D, KB, NS, BULK>, C::NT,
                         C::QB + Pipe::STAGE_BYTES + Pipe::EXTRA_BYTES, p, st);
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

cudaError_t launch_attn_decode8(int dtype, const AttnParams& p, cudaStream_t st) {
  if (dtype == kBF16) return p.D == 256 ? run_decode8<__nv_bfloat16, 256>(p, st)
                           : p.D == 512 ? run_decode8<__nv_bfloat16, 512>(p, st) : cudaErrorInvalidValue;
  if (dtype == kF16) return p.D == 256 ? run_decode8<__half, 256>(p, st)
                          : p.D == 512 ? run_decode8<__half, 512>(p, st) : cudaErrorInvalidValue;
  return cudaErrorInvalidValue;
}

}  // namespace g4

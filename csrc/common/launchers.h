// Host-side entry points of every kernel (torch-free). Each returns the launch's cudaError_t.
// Strides are in elements. Pointers are device pointers. dtype: g4::DType.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace g4 {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// ---- norms (csrc/norm) -------------------------------------------------------------------------
// rows x n, row strides; weight may be null. mode 0: y = rms(x)·w
// mode 1 (add_rms_norm): r = x + res -> res_out; y = rms(r)·w
// mode 2 (norm_add_scale): y = (res + rms(x)·w) · scale  (scale may be null)
cudaError_t launch_norm(int mode, int dtype, const void* x, int64_t sx, const void* res, int64_t sres,
                        const void* w, const void* scale, int scale_dtype, void* y, int64_t sy,
                        void* res_out, int64_t sres_out, int64_t rows, int n, float eps, cudaStream_t st);
// res_out = (res + rms(x)·w) · scale (scale fp32, may be null); y = rms(res_out)·w2 (w2 may be null)
cudaError_t launch_norm_add_scale_norm(int dtype, const void* x, int64_t sx, const void* res, int64_t sres,
                                       const void* w, const float* scale, const void* w2, void* res_out,
                                       int64_t sro, void* y, int64_t sy, int64_t rows, int n, float eps,
                                       cudaStream_t st);

// the same, with y2 / y3 / y4 = rms(res_out)·w2 / w3 / w4 (one row stride sy for the three)
cudaError_t launch_norm_add_scale_norm3(int dtype, const void* x, int64_t sx, const void* res, int64_t sres,
                                        const void* w, const float* scale, const void* w2, const void* w3,
                                        const void* w4, void* res_out, int64_t sro, void* y2, void* y3, void* y4,
                                        int64_t sy, int64_t rows, int n, float eps, cudaStream_t st);
// f = rms(m)·w1 + rms(e)·w2; h = (x + rms(f)·w3) · scale (fp32, may be null); y = rms(h)·w4
cudaError_t launch_moe_block_end(int dtype, const void* m, int64_t sm, const void* e, int64_t se, const void* x,
                                 int64_t sx, const void* w1, const void* w2, const void* w3, const float* scale,
                                 const void* w4, void* h, int64_t sh, void* y, int64_t sy, int64_t rows, int n,
                                 float eps, cudaStream_t st);

// ---- head norm + rope (csrc/rope) ------------------------------------------------------------------
// x: [T, H, D] strides (st, sh, 1); cos/sin: [T, D/2] fp32 strides (sc, 1) (null = no rope).
cudaError_t launch_head_norm_rope(int dtype, const void* x, int64_t sxt, int64_t sxh, const void* w,
                                  const float* cos, const float* sin, int64_t sct, int64_t sst,
                                  void* y, int64_t syt, int64_t syh, int64_t T, int H, int D, float eps,
                                  cudaStream_t st);

// q [T, H, D], k and v [T, KVH, D] (strides in elements, last dim contiguous); q_out [T, H, D]; caches
// [P, S, KVH, D] (page, slot, head strides); slots[t] = page·S + offset (< 0: skip); cos/sin [T, D/2] fp32.
// q_out = rope(rms(q)·qw); k_cache[slot] = rope(rms(k)·kw); v_cache[slot] = rms(v) (qw, kw may be null).
struct QkvNormRopeStore {
  const void* q; int64_t sqt, sqh;
  const void* k; int64_t skt, skh;
  const void* v; int64_t svt, svh;
  const void* qw; const void* kw;
  const float* cos; const float* sin; int64_t sct, sst;
  void* qo; int64_t sot, soh;
  void* kc; int64_t kcp, kcs, kch;
  void* vc; int64_t vcp, vcs, vch;
  const int64_t* slots;
  int64_t T; int H, KVH, D, S; float eps;
};
cudaError_t launch_qkv_norm_rope_store(int dtype, const QkvNormRopeStore& p, cudaStream_t st);

// ---- activation ----------------------------------------------------------------------------------
cudaError_t launch_gelu_tanh_and_mul(int dtype, const void* x, int64_t sx, void* y, int64_t sy,
                                     int64_t rows, int I, cudaStream_t st);
// y = gelu_tanh(gate) · up, gate/up/y: [rows, I] with row strides sg/su/sy, unit column stride.
cudaError_t launch_gelu_tanh_mul(int dtype, const void* gate, int64_t sg, const void* up, int64_t su, void* y,
                                 int64_t sy, int64_t rows, int I, cudaStream_t st);

// ---- skinny GEMM (csrc/gemm) ------------------------------------------------------------------------
// y[m, n] = Σ_k x[m, k] w[n, k] for M in 1..8 (half types); K, sx, sw multiples of 8, x and w 16-byte aligned.
// glu: w holds 2N rows [gate; up] and y[m, n] = gelu_tanh(x·w[n]) · (x·w[N + n]) (the MLP's gate/up + gelu-mul).
// kernel: 0 the default choice (gemv.cu, gemv_use_mma), 1 the CUDA-core kernel, 2 the tensor-core kernel,
// optionally | kGemvWStatic (below).
// aux (not with glu): y[m, n] = gelu_tanh(x·w[n]) · aux[m·saux + n] (E2B/E4B's per-layer-input gate).
// norm (not with glu or aux; counter non-null): after y is written, the launch's last CTA (counted in *counter,
// a zero int32 it leaves zero) computes h = (res + rms(y)·w1) · scale and, with w2, normed = rms(h)·w2 for each
// row, as launch_norm_add_scale_norm (mode 2 without w2) would with nt threads a row: the same bits; with w3 / w4
// (and w2) also normed3 = rms(h)·w3, normed4 = rms(h)·w4, as launch_norm_add_scale_norm3.
struct GemvNorm {
  const void* res = nullptr;
  int64_t sres = 0;
  const void* w1 = nullptr;
  const float* scale = nullptr;   // fp32 [1] or null
  const void* w2 = nullptr;       // null: no second norm
  const void* w3 = nullptr;       // null: no normed3 (w2 is then given)
  const void* w4 = nullptr;       // null: no normed4 (w2 and w3 are then given)
  void* h = nullptr;
  int64_t sh = 0;
  void* normed = nullptr;
  void* normed3 = nullptr;
  void* normed4 = nullptr;
  int64_t sn = 0;                 // the row stride of normed, normed3 and normed4
  float eps = 0.f;
  int nt = 0;                     // the norm kernel's threads a row for N (norm_threads): its summation order
  int* counter = nullptr;         // null: no norm (and no qkv)
  // has_qkv (counter non-null, instead of the norms): y = [q | k | v] columns (qkv_heads heads of D: H + 2·KVH,
  // or H + KVH when V is K) and qkv's q / k / v point into y; the last CTA of each head runs
  // launch_qkv_norm_rope_store's work on it (q_out, the k / v cache slots) with counter[head]: the same bits.
  bool has_qkv = false;
  int qkv_heads = 0;
  QkvNormRopeStore qkv{};
};
// threads a row of the norm kernels (norm.cu): 64 to 1024, about two V-element vectors a thread
inline int norm_threads(int n, bool vec, int V) {
  int threads = 64;
  while (threads < 1024 && threads * (vec ? V : 1) * 2 <= n) threads *= 2;
  return threads;
}
// kGemvWStatic: w is a weight that no kernel still in flight on the stream writes, so the launch may load it before
// waiting on the previous kernel (PDL).
constexpr int kGemvWStatic = 4;
cudaError_t launch_gemv(int dtype, int M, const void* x, int64_t sx, const void* w, int64_t sw, void* y, int64_t sy,
                        int N, int K, bool glu, int kernel, cudaStream_t st, const void* aux = nullptr,
                        int64_t saux = 0, const GemvNorm& norm = GemvNorm());

// ---- attention (csrc/attention) --------------------------------------------------------------------
cudaError_t launch_store_kv(int dtype, const void* k, int64_t skt, int64_t skh, const void* v,
                            int64_t svt, int64_t svh, void* kc, const int64_t* kc_strides,
                            void* vc, const int64_t* vc_strides, const int64_t* slot_mapping,
                            int64_t T, int KVH, int D, int page_size, cudaStream_t st);

struct AttnParams {
  const void* q; int64_t sq_t, sq_h;          // [T, H, D]
  const void* kc; const void* vc;             // [P, S, KVH, D]
  int64_t sk_p, sk_s, sk_h, sv_p, sv_s, sv_h;
  const int32_t* page_table; int64_t spt;     // [B, max_pages]
  const int32_t* cu_seqlens_q;                // [B+1]
  const int32_t* seq_lens;                    // [B]
  const int32_t* block_ids;                   // [T] or null
  void* out; int64_t so_t, so_h;              // [T, H, D]
  float* ws_o; float* ws_lse;                 // [splits, T, H, D], [splits, T, H] (splits>1)
  int T, H, KVH, D, B, page_size;
  int window;                                 // <= 0: none
  float scale;
  int num_splits, split_size;                 // split_size: keys per split (multiple of 32)
  int max_tiles;                              // grid bound on row tiles
  int warps_m;                                // 0: 8-row decode tiles, 1: 16-row decode tiles, 4: 64-row prefill
  int probe;                                  // set by the launcher from GEMMA4RT_ATTN_PROBE (benchmarks)
  int q_sel;                                  // requests covered: 0 all, 1 those of one query token, 2 the others
  int* counters;                              // [max_tiles * KVH] zeros: splits merged in the kernel; or null
};
cudaError_t launch_paged_attention(int dtype, const AttnParams& p, cudaStream_t st);

// ---- moe (csrc/moe) ------------------------------------------------------------------------------------
cudaError_t launch_moe_route(int dtype, const void* logits, int64_t sl, int64_t T, int E, int k,
                             const void* scale, int scale_dtype, float* w_out, int32_t* ids_out,
                             cudaStream_t st);
// Sort the T·k (token, slot) pairs by expert into BM-row tiles. sorted: [cap_rows] (entry =
// token·k + j, or −1 padding); tile_expert: [cap_tiles]; num_tiles: [1].
cudaError_t launch_moe_align(const int32_t* ids, int64_t T, int k, int E, int BM, int32_t* sorted,
                             int32_t* tile_expert, int32_t* num_tiles, int cap_tiles, cudaStream_t st);
// h[row] = gelu(x[tok] Gᵀ) ⊙ (x[tok] Uᵀ) for sorted rows; then ybuf[t·k+j] = w · (h Dᵀ); out = Σ_j.
cudaError_t launch_moe_experts(int dtype, const void* x, int64_t sx, const void* gate_up,
                               const void* down, const float* weights, const int32_t* sorted,
                               const int32_t* tile_expert, const int32_t* num_tiles, int cap_tiles,
                               int BM, void* hbuf, float* ybuf, void* out, int64_t so, int64_t T,
                               int k, int E, int d, int I, cudaStream_t st);

// ---- sampling (csrc/sampling) ------------------------------------------------------------------------
cudaError_t launch_sample(int dtype, const void* logits, int64_t sl, int64_t N, int V, float softcap,
                          const float* temperature, const int32_t* top_k, const float* top_p,
                          const float* min_p, const int64_t* seeds, const int64_t* steps,
                          int64_t* out, cudaStream_t st);

}  // namespace g4

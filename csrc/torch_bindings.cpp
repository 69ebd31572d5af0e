// The only TORCH_LIBRARY(gemma4rt): every op is an out-variant (writes caller-owned outputs),
// allocates nothing, never synchronises and never reads device values on the host, so CUDA graphs
// and torch.compile can hold them. Kernels live in csrc/<family>/*.cu behind g4::launch_*.
#include <Python.h>

#include "common/torch_utils.h"

// `from gemma4rt import _C` loads this library (which registers the ops below) as a Python module.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "gemma4rt native ops (torch.ops.gemma4rt)",
                                      -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}

namespace g4 {
namespace {

using at::Tensor;
using c10::optional;

void check_weight(const optional<Tensor>& w, const Tensor& x, int64_t n) {
  if (!w) return;
  TORCH_CHECK(w->is_cuda() && w->is_contiguous() && w->numel() == n && w->scalar_type() == x.scalar_type(),
              "weight must be a contiguous CUDA tensor of x's dtype, one element a channel");
}

void rms_norm_op(const Tensor& x, const optional<Tensor>& weight, double eps, Tensor& out) {
  G4_CHECK_CUDA(x); G4_CHECK_LAST(x); G4_CHECK_LAST(out);
  TORCH_CHECK(x.dim() == 2 && out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type(), "rms_norm: x [rows, n]");
  check_weight(weight, x, x.size(1));
  c10::cuda::CUDAGuard g(x.device());
  check_launch(launch_norm(0, dtype_code(x), x.data_ptr(), x.stride(0), nullptr, 0, G4_OPT_PTR(weight), nullptr, 0,
                           out.data_ptr(), out.stride(0), nullptr, 0, x.size(0), (int)x.size(1), (float)eps,
                           stream_of(x)), "rms_norm");
}

void add_rms_norm_op(const Tensor& x, const Tensor& residual, const optional<Tensor>& weight, double eps, Tensor& out,
                     Tensor& residual_out) {
  G4_CHECK_CUDA(x); G4_CHECK_LAST(x); G4_CHECK_LAST(residual); G4_CHECK_LAST(out); G4_CHECK_LAST(residual_out);
  TORCH_CHECK(x.dim() == 2 && residual.sizes() == x.sizes() && out.sizes() == x.sizes() &&
              residual_out.sizes() == x.sizes(), "add_rms_norm: shapes");
  TORCH_CHECK(residual.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type() &&
              residual_out.scalar_type() == x.scalar_type(), "add_rms_norm: dtypes");
  check_weight(weight, x, x.size(1));
  c10::cuda::CUDAGuard g(x.device());
  check_launch(launch_norm(1, dtype_code(x), x.data_ptr(), x.stride(0), residual.data_ptr(), residual.stride(0),
                           G4_OPT_PTR(weight), nullptr, 0, out.data_ptr(), out.stride(0), residual_out.data_ptr(),
                           residual_out.stride(0), x.size(0), (int)x.size(1), (float)eps, stream_of(x)), "add_rms_norm");
}

void norm_add_scale_op(const Tensor& x, const Tensor& residual, const optional<Tensor>& weight,
                       const optional<Tensor>& scale, double eps, Tensor& out) {
  G4_CHECK_CUDA(x); G4_CHECK_LAST(x); G4_CHECK_LAST(residual); G4_CHECK_LAST(out);
  TORCH_CHECK(x.dim() == 2 && residual.sizes() == x.sizes() && out.sizes() == x.sizes(), "norm_add_scale: shapes");
  TORCH_CHECK(residual.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type(), "norm_add_scale: dtypes");
  check_weight(weight, x, x.size(1));
  if (scale) TORCH_CHECK(scale->is_cuda() && scale->numel() == 1 && scale->scalar_type() == at::kFloat, "scale: [1] fp32");
  c10::cuda::CUDAGuard g(x.device());
  check_launch(launch_norm(2, dtype_code(x), x.data_ptr(), x.stride(0), residual.data_ptr(), residual.stride(0),
                           G4_OPT_PTR(weight), G4_OPT_PTR(scale), kF32, out.data_ptr(), out.stride(0), nullptr, 0,
                           x.size(0), (int)x.size(1), (float)eps, stream_of(x)), "norm_add_scale");
}

void norm_add_scale_norm_op(const Tensor& x, const Tensor& residual, const optional<Tensor>& weight,
                            const optional<Tensor>& scale, const optional<Tensor>& weight2, double eps, Tensor& out,
                            Tensor& normed) {
  G4_CHECK_CUDA(x); G4_CHECK_LAST(x); G4_CHECK_LAST(residual); G4_CHECK_LAST(out); G4_CHECK_LAST(normed);
  TORCH_CHECK(x.dim() == 2 && residual.sizes() == x.sizes() && out.sizes() == x.sizes() && normed.sizes() == x.sizes(),
              "norm_add_scale_norm: shapes");
  TORCH_CHECK(residual.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type() &&
              normed.scalar_type() == x.scalar_type(), "norm_add_scale_norm: dtypes");
  check_weight(weight, x, x.size(1));
  check_weight(weight2, x, x.size(1));
  if (scale) TORCH_CHECK(scale->is_cuda() && scale->numel() == 1 && scale->scalar_type() == at::kFloat, "scale: [1] fp32");
  c10::cuda::CUDAGuard g(x.device());
  check_launch(launch_norm_add_scale_norm(dtype_code(x), x.data_ptr(), x.stride(0), residual.data_ptr(),
                                          residual.stride(0), G4_OPT_PTR(weight),
                                          scale ? scale->data_ptr<float>() : nullptr, G4_OPT_PTR(weight2),
                                          out.data_ptr(), out.stride(0), normed.data_ptr(), normed.stride(0),
                                          x.size(0), (int)x.size(1), (float)eps, stream_of(x)),
               "norm_add_scale_norm");
}

void norm_add_scale_norm3_op(const Tensor& x, const Tensor& residual, const optional<Tensor>& weight,
                             const optional<Tensor>& scale, const Tensor& weight2, const Tensor& weight3,
                             const Tensor& weight4, double eps, Tensor& out, Tensor& normed2, Tensor& normed3,
                             Tensor& normed4) {
  G4_CHECK_CUDA(x); G4_CHECK_LAST(x); G4_CHECK_LAST(residual); G4_CHECK_LAST(out);
  for (const Tensor* t : std::initializer_list<const Tensor*>{&normed2, &normed3, &normed4}) {
    G4_CHECK_LAST((*t));
    TORCH_CHECK(t->sizes() == x.sizes() && t->scalar_type() == x.scalar_type() && t->stride(0) == normed2.stride(0),
                "norm_add_scale_norm3: the normed outputs share x's shape and dtype and one row stride");
  }
  TORCH_CHECK(x.dim() == 2 && residual.sizes() == x.sizes() && out.sizes() == x.sizes(), "norm_add_scale_norm3: shapes");
  TORCH_CHECK(residual.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type(), "norm_add_scale_norm3: dtypes");
  check_weight(weight, x, x.size(1));
  for (const Tensor* w : std::initializer_list<const Tensor*>{&weight2, &weight3, &weight4}) check_weight(*w, x, x.size(1));
  if (scale) TORCH_CHECK(scale->is_cuda() && scale->numel() == 1 && scale->scalar_type() == at::kFloat, "scale: [1] fp32");
  c10::cuda::CUDAGuard g(x.device());
  check_launch(launch_norm_add_scale_norm3(dtype_code(x), x.data_ptr(), x.stride(0), residual.data_ptr(),
                                           residual.stride(0), G4_OPT_PTR(weight),
                                           scale ? scale->data_ptr<float>() : nullptr, weight2.data_ptr(),
                                           weight3.data_ptr(), weight4.data_ptr(), out.data_ptr(), out.stride(0),
                                           normed2.data_ptr(), normed3.data_ptr(), normed4.data_ptr(),
                                           normed2.stride(0), x.size(0), (int)x.size(1), (float)eps, stream_of(x)),
               "norm_add_scale_norm3");
}

void moe_block_end_op(const Tensor& m, const Tensor& e, const Tensor& x, const Tensor& w1, const Tensor& w2,
                      const Tensor& w3, const optional<Tensor>& scale, const Tensor& w4, double eps, Tensor& out,
                      Tensor& normed) {
  G4_CHECK_CUDA(x); G4_CHECK_LAST(m); G4_CHECK_LAST(e); G4_CHECK_LAST(x); G4_CHECK_LAST(out); G4_CHECK_LAST(normed);
  for (const Tensor* t : std::initializer_list<const Tensor*>{&m, &e, &out, &normed})
    TORCH_CHECK(t->sizes() == x.sizes() && t->scalar_type() == x.scalar_type(), "moe_block_end: m, e, out, normed as x");
  TORCH_CHECK(x.dim() == 2, "moe_block_end: x [rows, n]");
  for (const Tensor* w : std::initializer_list<const Tensor*>{&w1, &w2, &w3, &w4}) check_weight(*w, x, x.size(1));
  if (scale) TORCH_CHECK(scale->is_cuda() && scale->numel() == 1 && scale->scalar_type() == at::kFloat, "scale: [1] fp32");
  c10::cuda::CUDAGuard g(x.device());
  check_launch(launch_moe_block_end(dtype_code(x), m.data_ptr(), m.stride(0), e.data_ptr(), e.stride(0), x.data_ptr(),
                                    x.stride(0), w1.data_ptr(), w2.data_ptr(), w3.data_ptr(),
                                    scale ? scale->data_ptr<float>() : nullptr, w4.data_ptr(), out.data_ptr(),
                                    out.stride(0), normed.data_ptr(), normed.stride(0), x.size(0), (int)x.size(1),
                                    (float)eps, stream_of(x)),
               "moe_block_end");
}

void head_norm_rope_op(const Tensor& x, const optional<Tensor>& weight, double eps, const optional<Tensor>& cos,
                       const optional<Tensor>& sin, Tensor& out) {
  G4_CHECK_CUDA(x); G4_CHECK_LAST(x); G4_CHECK_LAST(out);
  TORCH_CHECK(x.dim() == 3 && out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type(), "head_norm_rope: x [T, H, D]");
  const int64_t D = x.size(2);
  TORCH_CHECK(D % 2 == 0 && D <= 512, "head_norm_rope: even D <= 512");
  check_weight(weight, x, D);
  TORCH_CHECK(cos.has_value() == sin.has_value(), "cos and sin go together");
  if (cos) {
    TORCH_CHECK(cos->scalar_type() == at::kFloat && sin->scalar_type() == at::kFloat && cos->dim() == 2 &&
                cos->size(0) == x.size(0) && cos->size(1) == D / 2 && sin->sizes() == cos->sizes() &&
                cos->stride(1) == 1 && sin->stride(1) == 1, "cos/sin: [T, D/2] fp32");
  }
  c10::cuda::CUDAGuard g(x.device());
  check_launch(launch_head_norm_rope(dtype_code(x), x.data_ptr(), x.stride(0), x.stride(1), G4_OPT_PTR(weight),
                                     cos ? cos->data_ptr<float>() : nullptr, sin ? sin->data_ptr<float>() : nullptr,
                                     cos ? cos->stride(0) : 0, sin ? sin->stride(0) : 0, out.data_ptr(), out.stride(0),
                                     out.stride(1), x.size(0), (int)x.size(1), (int)D, (float)eps, stream_of(x)),
               "head_norm_rope");
}

// The checked launch parameters of qkv_norm_rope_store (also the q/k/v epilogue of gemv_qkv_norm_rope_store).
QkvNormRopeStore qkv_params(const Tensor& q, const Tensor& k, const Tensor& v, const optional<Tensor>& q_weight,
                            const optional<Tensor>& k_weight, double eps, const Tensor& cos, const Tensor& sin,
                            Tensor& k_cache, Tensor& v_cache, const Tensor& slot_mapping, Tensor& q_out) {
  G4_CHECK_CUDA(q); G4_CHECK_LAST(q); G4_CHECK_LAST(k); G4_CHECK_LAST(v); G4_CHECK_LAST(q_out);
  G4_CHECK_LAST(k_cache); G4_CHECK_LAST(v_cache);
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
              q.size(2) == k.size(2) && q_out.sizes() == q.sizes(), "qkv_norm_rope_store: q [T, H, D], k/v [T, KVH, D]");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && k_cache.size(2) == k.size(1) &&
              k_cache.size(3) == k.size(2), "qkv_norm_rope_store: caches [P, S, KVH, D]");
  const auto dt = q.scalar_type();
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt && q_out.scalar_type() == dt &&
              k_cache.scalar_type() == dt && v_cache.scalar_type() == dt, "qkv_norm_rope_store: one dtype");
  const int64_t D = q.size(2);
  TORCH_CHECK(D % 2 == 0 && D <= 512, "qkv_norm_rope_store: even D <= 512");
  check_weight(q_weight, q, D);
  check_weight(k_weight, q, D);
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.dim() == 2 &&
              cos.size(0) == q.size(0) && cos.size(1) == D / 2 && sin.sizes() == cos.sizes() &&
              cos.stride(1) == 1 && sin.stride(1) == 1, "cos/sin: [T, D/2] fp32");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
              slot_mapping.numel() == q.size(0), "slot_mapping: [T] int64");
  TORCH_CHECK(cos.device() == q.device() && sin.device() == q.device() && k.device() == q.device() &&
              v.device() == q.device() && k_cache.device() == q.device() && v_cache.device() == q.device() &&
              slot_mapping.device() == q.device() && q_out.device() == q.device(), "qkv_norm_rope_store: one device");
  QkvNormRopeStore p{q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1),
                     v.data_ptr(), v.stride(0), v.stride(1), G4_OPT_PTR(q_weight), G4_OPT_PTR(k_weight),
                     cos.data_ptr<float>(), sin.data_ptr<float>(), cos.stride(0), sin.stride(0),
                     q_out.data_ptr(), q_out.stride(0), q_out.stride(1),
                     k_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                     v_cache.data_ptr(), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
                     slot_mapping.data_ptr<int64_t>(), q.size(0), (int)q.size(1), (int)k.size(1), (int)D,
                     (int)k_cache.size(1), (float)eps};
  return p;
}

void qkv_norm_rope_store_op(const Tensor& q, const Tensor& k, const Tensor& v, const optional<Tensor>& q_weight,
                            const optional<Tensor>& k_weight, double eps, const Tensor& cos, const Tensor& sin,
                            Tensor& k_cache, Tensor& v_cache, const Tensor& slot_mapping, Tensor& q_out) {
  const QkvNormRopeStore p = qkv_params(q, k, v, q_weight, k_weight, eps, cos, sin, k_cache, v_cache, slot_mapping,
                                        q_out);
  c10::cuda::CUDAGuard g(q.device());
  check_launch(launch_qkv_norm_rope_store(dtype_code(q), p, stream_of(q)), "qkv_norm_rope_store");
}

void gelu_tanh_and_mul_op(const Tensor& x, Tensor& out) {
  G4_CHECK_CUDA(x); G4_CHECK_LAST(x); G4_CHECK_LAST(out);
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0 && out.dim() == 2 && out.size(0) == x.size(0) &&
              out.size(1) == x.size(1) / 2 && out.scalar_type() == x.scalar_type(), "gelu_tanh_and_mul: [T, 2I] -> [T, I]");
  c10::cuda::CUDAGuard g(x.device());
  check_launch(launch_gelu_tanh_and_mul(dtype_code(x), x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0),
                                        x.size(0), (int)out.size(1), stream_of(x)), "gelu_tanh_and_mul");
}

void gelu_tanh_mul_op(const Tensor& gate, const Tensor& up, Tensor& out) {
  G4_CHECK_CUDA(gate); G4_CHECK_LAST(gate); G4_CHECK_LAST(up); G4_CHECK_LAST(out);
  TORCH_CHECK(gate.dim() == 2 && up.sizes() == gate.sizes() && out.sizes() == gate.sizes() &&
              up.scalar_type() == gate.scalar_type() && out.scalar_type() == gate.scalar_type() &&
              up.device() == gate.device() && out.device() == gate.device(), "gelu_tanh_mul: gate, up, out [T, I]");
  c10::cuda::CUDAGuard g(gate.device());
  check_launch(launch_gelu_tanh_mul(dtype_code(gate), gate.data_ptr(), gate.stride(0), up.data_ptr(), up.stride(0),
                                    out.data_ptr(), out.stride(0), gate.size(0), (int)gate.size(1), stream_of(gate)),
               "gelu_tanh_mul");
}

// The skinny GEMM ops. glu = false: out = x·wᵀ (w [N, K]). glu = true: w = [gate; up] ([2I, K]) and
// out = gelu_tanh(x·gateᵀ) · (x·upᵀ) [M, I]: the MLP's projection and activation in one launch. aux / norm: the
// epilogues of gemv_gelu_aux and gemv_norm (launchers.h), whose own tensors their ops check.
void gemv_run(const Tensor& x, const Tensor& w, Tensor& out, bool glu, int64_t kernel, const char* name,
              const void* aux = nullptr, int64_t saux = 0, const GemvNorm& norm = GemvNorm()) {
  G4_CHECK_CUDA(x); G4_CHECK_LAST(x); G4_CHECK_LAST(w); G4_CHECK_LAST(out);
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && out.dim() == 2 && x.size(1) == w.size(1) && out.size(0) == x.size(0) &&
              w.size(0) == (glu ? 2 : 1) * out.size(1), name,
              glu ? ": x [M, K], w [2I, K] -> out [M, I]" : ": x [M, K], w [N, K] -> out [M, N]");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 8, name, ": 1 to 8 rows");
  TORCH_CHECK((kernel & ~(int64_t)kGemvWStatic) >= 0 && (kernel & ~(int64_t)kGemvWStatic) <= 2, name,
              ": kernel 0 (default), 1 (CUDA cores) or 2 (tensor cores), + 4 when w is a weight no kernel in flight "
              "writes");
  TORCH_CHECK(w.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type() &&
              (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf), name, ": bf16 or fp16, one dtype");
  TORCH_CHECK(w.device() == x.device() && out.device() == x.device(), name, ": one device");
  c10::cuda::CUDAGuard g(x.device());
  check_launch(launch_gemv(dtype_code(x), (int)x.size(0), x.data_ptr(), x.stride(0), w.data_ptr(), w.stride(0),
                           out.data_ptr(), out.stride(0), (int)out.size(1), (int)x.size(1), glu, (int)kernel,
                           stream_of(x), aux, saux, norm), name);
}

void gemv_op(const Tensor& x, const Tensor& w, Tensor& out, int64_t kernel) {
  gemv_run(x, w, out, false, kernel, "gemv");
}
void gemv_gelu_mul_op(const Tensor& x, const Tensor& w, Tensor& out, int64_t kernel) {
  gemv_run(x, w, out, true, kernel, "gemv_gelu_mul");
}
// out = gelu_tanh(x·wᵀ) · aux ([M, N], aux's rows strided): E2B/E4B's per-layer-input gate and its product
// with the layer's per-layer input in one launch.
void gemv_gelu_aux_op(const Tensor& x, const Tensor& w, const Tensor& aux, Tensor& out, int64_t kernel) {
  G4_CHECK_LAST(aux);
  TORCH_CHECK(aux.dim() == 2 && aux.size(0) == x.size(0) && aux.size(1) == w.size(0) &&
              aux.scalar_type() == x.scalar_type() && aux.device() == x.device(),
              "gemv_gelu_aux: aux [M, N] of x's dtype and device");
  gemv_run(x, w, out, false, kernel, "gemv_gelu_aux", aux.data_ptr(), aux.stride(0));
}

// The CTA counter of a launch whose last CTA runs an epilogue: int32 on x's device, zero, used by no concurrent
// launch (the launch leaves it zero).
void check_counter(const Tensor& counter, const Tensor& x, const char* name, int64_t slots = 1) {
  TORCH_CHECK(counter.scalar_type() == at::kInt && counter.numel() >= slots && counter.is_contiguous() &&
              counter.device() == x.device(), name, ": counter, int32 on x's device, with enough slots");
}

// y = x·wᵀ, then in the launch's last CTA h = (residual + rms(y)·w1) · scale and, with w2, normed = rms(h)·w2
// (with w3 / w4 also normed3 / normed4): a projection and the norms after it in one launch (the bits of gemv then
// norm_add_scale[_norm | _norm3]). counter: a zero int32 on x's device that no concurrent launch uses; the launch
// leaves it zero.
void gemv_norm_op(const Tensor& x, const Tensor& w, const Tensor& residual, const Tensor& w1,
                  const c10::optional<Tensor>& scale, const c10::optional<Tensor>& w2, double eps, Tensor& y, Tensor& h,
                  const c10::optional<Tensor>& normed, Tensor& counter, int64_t kernel,
                  const c10::optional<Tensor>& w3, const c10::optional<Tensor>& w4,
                  const c10::optional<Tensor>& normed3, const c10::optional<Tensor>& normed4) {
  G4_CHECK_LAST(residual); G4_CHECK_LAST(h);
  const int64_t N = w.size(0);
  const auto dt = x.scalar_type();
  TORCH_CHECK(residual.sizes() == y.sizes() && h.sizes() == y.sizes() && residual.scalar_type() == dt &&
              h.scalar_type() == dt && residual.device() == x.device() && h.device() == x.device(),
              "gemv_norm: residual and h [M, N] as y");
  TORCH_CHECK(w1.dim() == 1 && w1.size(0) == N && w1.is_contiguous() && w1.scalar_type() == dt &&
              w1.device() == x.device(), "gemv_norm: w1 [N]");
  check_counter(counter, x, "gemv_norm");
  GemvNorm ep;
  ep.res = residual.data_ptr(); ep.sres = residual.stride(0);
  ep.w1 = w1.data_ptr();
  if (scale.has_value()) {
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->numel() >= 1 && scale->device() == x.device(),
                "gemv_norm: scale, fp32 [1]");
    ep.scale = scale->data_ptr<float>();
  }
  TORCH_CHECK(w2.has_value() == normed.has_value(), "gemv_norm: w2 and normed together");
  if (w2.has_value()) {
    TORCH_CHECK(w2->dim() == 1 && w2->size(0) == N && w2->is_contiguous() && w2->scalar_type() == dt &&
                w2->device() == x.device() && normed->sizes() == y.sizes() && normed->scalar_type() == dt &&
                normed->stride(-1) == 1 && normed->device() == x.device(), "gemv_norm: w2 [N], normed [M, N]");
    ep.w2 = w2->data_ptr(); ep.normed = normed->data_ptr(); ep.sn = normed->stride(0);
  }
  // w3 / w4: more norms of h into normed3 / normed4 (normed's shape, dtype and row stride), as norm_add_scale_norm3
  TORCH_CHECK(w3.has_value() == normed3.has_value() && w4.has_value() == normed4.has_value() &&
              (!w3 || w2) && (!w4 || w3), "gemv_norm: w3 with normed3 after w2, w4 with normed4 after w3");
  const c10::optional<Tensor>* more[2][2] = {{&w3, &normed3}, {&w4, &normed4}};
  for (int k = 0; k < 2; ++k) {
    const c10::optional<Tensor>& wk = *more[k][0];
    const c10::optional<Tensor>& nk = *more[k][1];
    if (!wk) continue;
    TORCH_CHECK(wk->dim() == 1 && wk->size(0) == N && wk->is_contiguous() && wk->scalar_type() == dt &&
                wk->device() == x.device() && nk->sizes() == y.sizes() && nk->scalar_type() == dt &&
                nk->stride(-1) == 1 && nk->stride(0) == ep.sn && nk->device() == x.device(),
                "gemv_norm: w3 / w4 [N], normed3 / normed4 [M, N] with normed's row stride");
    (k == 0 ? ep.w3 : ep.w4) = wk->data_ptr();
    (k == 0 ? ep.normed3 : ep.normed4) = nk->data_ptr();
  }
  ep.h = h.data_ptr(); ep.sh = h.stride(0);
  ep.eps = (float)eps;
  ep.nt = norm_threads((int)N, true, 8);
  ep.counter = counter.data_ptr<int>();
  gemv_run(x, w, y, false, kernel, "gemv_norm", nullptr, 0, ep);
}

// y = x·wᵀ for w = [q; k; v] (or [q; k] when V is K: w has (H + KVH)·D rows), then, by each head's last CTA,
// qkv_norm_rope_store on y's q / k / v heads (q_out [M, H, D]; the caches' KVH and D): the projection and the
// q/k norms, RoPE and KV store in one launch, with the bits of gemv then qkv_norm_rope_store. Head dims 256 and
// 512. counter: as gemv_norm's, a slot for each of y's heads (w.size(0) / D).
void gemv_qkv_norm_rope_store_op(const Tensor& x, const Tensor& w, const optional<Tensor>& q_weight,
                                 const optional<Tensor>& k_weight, double eps, const Tensor& cos, const Tensor& sin,
                                 Tensor& k_cache, Tensor& v_cache, const Tensor& slot_mapping, Tensor& y,
                                 Tensor& q_out, Tensor& counter, int64_t kernel) {
  TORCH_CHECK(q_out.dim() == 3 && k_cache.dim() == 4 && y.dim() == 2 && x.dim() == 2 && y.size(0) == x.size(0) &&
              q_out.size(0) == x.size(0), "gemv_qkv_norm_rope_store: x [M, K], y [M, N], q_out [M, H, D]");
  const int64_t H = q_out.size(1), D = q_out.size(2), KVH = k_cache.size(2);
  TORCH_CHECK(D == 256 || D == 512, "gemv_qkv_norm_rope_store: head dim 256 or 512");
  const bool k_eq_v = w.size(0) == (H + KVH) * D;
  TORCH_CHECK(k_eq_v || w.size(0) == (H + 2 * KVH) * D,
              "gemv_qkv_norm_rope_store: w [(H + KVH)·D or (H + 2·KVH)·D, K]");
  TORCH_CHECK(y.size(1) == w.size(0) && y.stride(1) == 1, "gemv_qkv_norm_rope_store: y [M, N], unit column stride");
  check_counter(counter, x, "gemv_qkv_norm_rope_store", w.size(0) / D);
  const Tensor q = y.narrow(1, 0, H * D).unflatten(1, {H, D});
  const Tensor k = y.narrow(1, H * D, KVH * D).unflatten(1, {KVH, D});
  const Tensor v = k_eq_v ? k : y.narrow(1, (H + KVH) * D, KVH * D).unflatten(1, {KVH, D});
  GemvNorm ep;
  ep.qkv = qkv_params(q, k, v, q_weight, k_weight, eps, cos, sin, k_cache, v_cache, slot_mapping, q_out);
  ep.has_qkv = true;
  ep.qkv_heads = (int)(w.size(0) / D);
  ep.counter = counter.data_ptr<int>();
  gemv_run(x, w, y, false, kernel, "gemv_qkv_norm_rope_store", nullptr, 0, ep);
}

void store_kv_op(const Tensor& k, const Tensor& v, Tensor& k_cache, Tensor& v_cache, const Tensor& slot_mapping) {
  G4_CHECK_CUDA(k); G4_CHECK_LAST(k); G4_CHECK_LAST(v); G4_CHECK_LAST(k_cache); G4_CHECK_LAST(v_cache);
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() &&
              k_cache.size(2) == k.size(1) && k_cache.size(3) == k.size(2), "store_kv: k/v [T, KVH, D], cache [P, S, KVH, D]");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == v_cache.scalar_type() &&
              k.scalar_type() == v.scalar_type(), "store_kv: dtypes");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
              slot_mapping.numel() == k.size(0), "slot_mapping: [T] int64");
  const int64_t ks[3] = {k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)};
  const int64_t vs[3] = {v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)};
  c10::cuda::CUDAGuard g(k.device());
  check_launch(launch_store_kv(dtype_code(k), k.data_ptr(), k.stride(0), k.stride(1), v.data_ptr(), v.stride(0),
                               v.stride(1), k_cache.data_ptr(), ks, v_cache.data_ptr(), vs,
                               slot_mapping.data_ptr<int64_t>(), k.size(0), (int)k.size(1), (int)k.size(2),
                               (int)k_cache.size(1), stream_of(k)), "store_kv");
}

#ifndef USE_ROCM  // a CUDA-only kernel: left out of ROCm builds (setup.py)
void paged_attention_op(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& page_table,
                        const Tensor& cu_seqlens_q, const Tensor& seq_lens, const optional<Tensor>& block_ids,
                        int64_t sliding_window, double scale, int64_t num_splits, int64_t split_size,
                        int64_t max_tiles, int64_t warps_m, Tensor& out, Tensor& ws_o, Tensor& ws_lse,
                        int64_t q_sel, const optional<Tensor>& counters) {
  G4_CHECK_CUDA(q); G4_CHECK_LAST(q); G4_CHECK_LAST(k_cache); G4_CHECK_LAST(v_cache); G4_CHECK_LAST(out);
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && out.sizes() == q.sizes(),
              "paged_attention: q [T, H, D], caches [P, S, KVH, D]");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type() &&
              out.scalar_type() == q.scalar_type(), "paged_attention: dtypes");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && H % KVH == 0 && (D == 256 || D == 512), "paged_attention: D in {256, 512}, H % KVH == 0");
  TORCH_CHECK(q.stride(0) % 8 == 0 && q.stride(1) % 8 == 0 && k_cache.stride(0) % 8 == 0 && k_cache.stride(1) % 8 == 0 &&
              k_cache.stride(2) % 8 == 0 && v_cache.stride(0) % 8 == 0 && v_cache.stride(1) % 8 == 0 &&
              v_cache.stride(2) % 8 == 0, "paged_attention: strides must be multiples of 8 elements");
  TORCH_CHECK(page_table.scalar_type() == at::kInt && page_table.dim() == 2 && page_table.stride(1) == 1, "page_table: [B, pages] int32");
  TORCH_CHECK(cu_seqlens_q.scalar_type() == at::kInt && cu_seqlens_q.is_contiguous() && seq_lens.scalar_type() == at::kInt &&
              seq_lens.is_contiguous() && cu_seqlens_q.numel() == seq_lens.numel() + 1 &&
              page_table.size(0) >= seq_lens.numel(), "cu_seqlens_q [B+1], seq_lens [B]: int32");
  if (block_ids) TORCH_CHECK(block_ids->scalar_type() == at::kInt && block_ids->is_contiguous() && block_ids->numel() == T, "block_ids: [T] int32");
  TORCH_CHECK(num_splits >= 1 && (warps_m == 0 || warps_m == 1 || warps_m == 4) && q_sel >= 0 && q_sel <= 2,
              "paged_attention: plan");
  if (num_splits > 1) {
    TORCH_CHECK(ws_o.scalar_type() == at::kFloat && ws_o.is_contiguous() && ws_o.numel() >= num_splits * T * H * D &&
                ws_lse.scalar_type() == at::kFloat && ws_lse.is_contiguous() && ws_lse.numel() >= num_splits * T * H,
                "paged_attention: workspace [splits, T, H, D] / [splits, T, H] fp32");
  }
  AttnParams p{};
  p.q = q.data_ptr(); p.sq_t = q.stride(0); p.sq_h = q.stride(1);
  p.kc = k_cache.data_ptr(); p.vc = v_cache.data_ptr();
  p.sk_p = k_cache.stride(0); p.sk_s = k_cache.stride(1); p.sk_h = k_cache.stride(2);
  p.sv_p = v_cache.stride(0); p.sv_s = v_cache.stride(1); p.sv_h = v_cache.stride(2);
  p.page_table = page_table.data_ptr<int32_t>(); p.spt = page_table.stride(0);
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>(); p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.block_ids = block_ids ? block_ids->data_ptr<int32_t>() : nullptr;
  p.out = out.data_ptr(); p.so_t = out.stride(0); p.so_h = out.stride(1);
  p.ws_o = num_splits > 1 ? ws_o.data_ptr<float>() : nullptr;
  p.ws_lse = num_splits > 1 ? ws_lse.data_ptr<float>() : nullptr;
  p.T = (int)T; p.H = (int)H; p.KVH = (int)KVH; p.D = (int)D; p.B = (int)seq_lens.numel();
  p.page_size = (int)k_cache.size(1); p.window = (int)sliding_window; p.scale = (float)scale;
  p.num_splits = (int)num_splits; p.split_size = (int)split_size; p.max_tiles = (int)max_tiles; p.warps_m = (int)warps_m;
  p.q_sel = (int)q_sel;
  if (counters && num_splits > 1) {
    TORCH_CHECK(counters->scalar_type() == at::kInt && counters->is_contiguous() && counters->device() == q.device() &&
                counters->numel() >= max_tiles * KVH, "paged_attention: counters [>= max_tiles * KVH] int32");
    p.counters = counters->data_ptr<int32_t>();
  }
  c10::cuda::CUDAGuard g(q.device());
  check_launch(launch_paged_attention(dtype_code(q), p, stream_of(q)), "paged_attention");
}
#endif

void moe_route_op(const Tensor& logits, int64_t top_k, const optional<Tensor>& scale, Tensor& weights, Tensor& ids) {
  G4_CHECK_CUDA(logits); G4_CHECK_LAST(logits);
  TORCH_CHECK(logits.dim() == 2, "moe_route: logits [T, E]");
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.is_contiguous() && weights.numel() == T * top_k &&
              ids.scalar_type() == at::kInt && ids.is_contiguous() && ids.numel() == T * top_k, "moe_route: outputs [T, k]");
  if (scale) TORCH_CHECK(scale->is_contiguous() && scale->numel() == E && scale->scalar_type() == at::kFloat, "per_expert_scale [E] fp32");
  c10::cuda::CUDAGuard g(logits.device());
  check_launch(launch_moe_route(dtype_code(logits), logits.data_ptr(), logits.stride(0), T, (int)E, (int)top_k,
                                G4_OPT_PTR(scale), kF32, weights.data_ptr<float>(), ids.data_ptr<int32_t>(),
                                stream_of(logits)), "moe_route");
}

void moe_align_op(const Tensor& ids, int64_t num_experts, int64_t block_m, Tensor& sorted, Tensor& tile_expert,
                  Tensor& num_tiles) {
  G4_CHECK_CUDA(ids);
  TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == at::kInt && ids.is_contiguous(), "moe_align: ids [T, k] int32");
  TORCH_CHECK(sorted.scalar_type() == at::kInt && tile_expert.scalar_type() == at::kInt && num_tiles.scalar_type() == at::kInt &&
              sorted.numel() == tile_expert.numel() * block_m && num_tiles.numel() >= 1, "moe_align: outputs");
  c10::cuda::CUDAGuard g(ids.device());
  check_launch(launch_moe_align(ids.data_ptr<int32_t>(), ids.size(0), (int)ids.size(1), (int)num_experts, (int)block_m,
                                sorted.data_ptr<int32_t>(), tile_expert.data_ptr<int32_t>(), num_tiles.data_ptr<int32_t>(),
                                (int)tile_expert.numel(), stream_of(ids)), "moe_align");
}

#ifndef USE_ROCM  // a CUDA-only kernel: left out of ROCm builds (setup.py)
void moe_experts_op(const Tensor& x, const Tensor& gate_up, const Tensor& down, const Tensor& weights,
                    const Tensor& sorted, const Tensor& tile_expert, const Tensor& num_tiles, int64_t block_m,
                    Tensor& out, Tensor& hbuf, Tensor& ybuf) {
  G4_CHECK_CUDA(x); G4_CHECK_LAST(x); G4_CHECK_LAST(out);
  TORCH_CHECK(x.dim() == 2 && gate_up.dim() == 3 && down.dim() == 3 && gate_up.is_contiguous() && down.is_contiguous(),
              "moe_experts: x [T, d], gate_up [E, 2I, d], down [E, d, I] contiguous");
  const int64_t T = x.size(0), d = x.size(1), E = gate_up.size(0), I = gate_up.size(1) / 2;
  TORCH_CHECK(gate_up.size(2) == d && down.size(0) == E && down.size(1) == d && down.size(2) == I, "moe_experts: shapes");
  TORCH_CHECK(gate_up.scalar_type() == x.scalar_type() && down.scalar_type() == x.scalar_type() &&
              out.scalar_type() == x.scalar_type() && hbuf.scalar_type() == x.scalar_type(), "moe_experts: dtypes");
  const int64_t k = weights.size(1);
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.is_contiguous() && weights.size(0) == T, "weights [T, k] fp32");
  TORCH_CHECK(block_m != 1 || (sorted.scalar_type() == at::kInt && sorted.is_contiguous() && sorted.numel() == T * k),
              "moe_experts: block_m 1 (entry mode) takes the routing ids [T, k] int32 as `sorted`");
  TORCH_CHECK(hbuf.is_contiguous() && hbuf.numel() >= sorted.numel() * I && ybuf.scalar_type() == at::kFloat &&
              ybuf.is_contiguous() && ybuf.numel() >= T * k * d && out.sizes() == x.sizes(), "moe_experts: buffers");
  c10::cuda::CUDAGuard g(x.device());
  check_launch(launch_moe_experts(dtype_code(x), x.data_ptr(), x.stride(0), gate_up.data_ptr(), down.data_ptr(),
                                  weights.data_ptr<float>(), sorted.data_ptr<int32_t>(), tile_expert.data_ptr<int32_t>(),
                                  num_tiles.data_ptr<int32_t>(), (int)tile_expert.numel(), (int)block_m, hbuf.data_ptr(),
                                  ybuf.data_ptr<float>(), out.data_ptr(), out.stride(0), T, (int)k, (int)E, (int)d,
                                  (int)I, stream_of(x)), "moe_experts");
}
#endif

#ifndef USE_ROCM  // a CUDA-only kernel: left out of ROCm builds (setup.py)
void sample_op(const Tensor& logits, const Tensor& temperature, const Tensor& top_k, const Tensor& top_p,
               const Tensor& min_p, const Tensor& seeds, const Tensor& steps, double softcap, Tensor& out) {
  G4_CHECK_CUDA(logits); G4_CHECK_LAST(logits);
  TORCH_CHECK(logits.dim() == 2, "sample: logits [N, V]");
  const int64_t N = logits.size(0);
  TORCH_CHECK(temperature.scalar_type() == at::kFloat && top_p.scalar_type() == at::kFloat && min_p.scalar_type() == at::kFloat &&
              top_k.scalar_type() == at::kInt && seeds.scalar_type() == at::kLong && steps.scalar_type() == at::kLong &&
              out.scalar_type() == at::kLong, "sample: parameter dtypes (f32 temperature/top_p/min_p, i32 top_k, i64 seeds/steps/out)");
  for (const Tensor* t : std::initializer_list<const Tensor*>{&temperature, &top_k, &top_p, &min_p, &seeds, &steps, &out})
    TORCH_CHECK(t->is_contiguous() && t->numel() == N, "sample: per-row tensors [N]");
  c10::cuda::CUDAGuard g(logits.device());
  check_launch(launch_sample(dtype_code(logits), logits.data_ptr(), logits.stride(0), N, (int)logits.size(1), (float)softcap,
                             temperature.data_ptr<float>(), top_k.data_ptr<int32_t>(), top_p.data_ptr<float>(),
                             min_p.data_ptr<float>(), seeds.data_ptr<int64_t>(), steps.data_ptr<int64_t>(),
                             out.data_ptr<int64_t>(), stream_of(logits)), "sample");
}
#endif

}  // namespace
}  // namespace g4

TORCH_LIBRARY(gemma4rt, m) {
  m.def("rms_norm(Tensor x, Tensor? weight, float eps, Tensor(a!) out) -> ()");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor? weight, float eps, Tensor(a!) out, Tensor(b!) residual_out) -> ()");
  m.def("norm_add_scale(Tensor x, Tensor residual, Tensor? weight, Tensor? scale, float eps, Tensor(a!) out) -> ()");
  m.def("norm_add_scale_norm(Tensor x, Tensor residual, Tensor? weight, Tensor? scale, Tensor? weight2, float eps, "
        "Tensor(a!) out, Tensor(b!) normed) -> ()");
  m.def("norm_add_scale_norm3(Tensor x, Tensor residual, Tensor? weight, Tensor? scale, Tensor weight2, "
        "Tensor weight3, Tensor weight4, float eps, Tensor(a!) out, Tensor(b!) normed2, Tensor(c!) normed3, "
        "Tensor(d!) normed4) -> ()");
  m.def("moe_block_end(Tensor m, Tensor e, Tensor x, Tensor w1, Tensor w2, Tensor w3, Tensor? scale, Tensor w4, "
        "float eps, Tensor(a!) out, Tensor(b!) normed) -> ()");
  m.def("head_norm_rope(Tensor x, Tensor? weight, float eps, Tensor? cos, Tensor? sin, Tensor(a!) out) -> ()");
  m.def("qkv_norm_rope_store(Tensor q, Tensor k, Tensor v, Tensor? q_weight, Tensor? k_weight, float eps, Tensor cos, "
        "Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, Tensor(c!) q_out) -> ()");
  m.def("gelu_tanh_and_mul(Tensor x, Tensor(a!) out) -> ()");
  m.def("gelu_tanh_mul(Tensor gate, Tensor up, Tensor(a!) out) -> ()");
  m.def("gemv(Tensor x, Tensor w, Tensor(a!) out, int kernel=0) -> ()");
  m.def("gemv_gelu_mul(Tensor x, Tensor w, Tensor(a!) out, int kernel=0) -> ()");
  m.def("gemv_gelu_aux(Tensor x, Tensor w, Tensor aux, Tensor(a!) out, int kernel=0) -> ()");
  m.def("gemv_qkv_norm_rope_store(Tensor x, Tensor w, Tensor? q_weight, Tensor? k_weight, float eps, Tensor cos, "
        "Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping, Tensor(c!) y, Tensor(d!) q_out, "
        "Tensor(e!) counter, int kernel=0) -> ()");
  m.def("gemv_norm(Tensor x, Tensor w, Tensor residual, Tensor w1, Tensor? scale, Tensor? w2, float eps, "
        "Tensor(a!) y, Tensor(b!) h, Tensor(c!)? normed, Tensor(d!) counter, int kernel=0, Tensor? w3=None, "
        "Tensor? w4=None, Tensor(e!)? normed3=None, Tensor(f!)? normed4=None) -> ()");
  m.def("store_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
#ifndef USE_ROCM
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor page_table, Tensor cu_seqlens_q, "
        "Tensor seq_lens, Tensor? block_ids, int sliding_window, float scale, int num_splits, int split_size, "
        "int max_tiles, int warps_m, Tensor(a!) out, Tensor(b!) ws_o, Tensor(c!) ws_lse, int q_sel=0, Tensor(d!)? counters=None) -> ()");
#endif
  m.def("moe_route(Tensor logits, int top_k, Tensor? per_expert_scale, Tensor(a!) weights, Tensor(b!) ids) -> ()");
  m.def("moe_align(Tensor ids, int num_experts, int block_m, Tensor(a!) sorted, Tensor(b!) tile_expert, "
        "Tensor(c!) num_tiles) -> ()");
#ifndef USE_ROCM
  m.def("moe_experts(Tensor x, Tensor gate_up, Tensor down, Tensor weights, Tensor sorted, Tensor tile_expert, "
        "Tensor num_tiles, int block_m, Tensor(a!) out, Tensor(b!) hbuf, Tensor(c!) ybuf) -> ()");
  m.def("sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, Tensor seeds, "
        "Tensor steps, float softcap, Tensor(a!) out) -> ()");
#endif
}

TORCH_LIBRARY_IMPL(gemma4rt, CUDA, m) {
  m.impl("rms_norm", &g4::rms_norm_op);
  m.impl("add_rms_norm", &g4::add_rms_norm_op);
  m.impl("norm_add_scale", &g4::norm_add_scale_op);
  m.impl("norm_add_scale_norm", &g4::norm_add_scale_norm_op);
  m.impl("norm_add_scale_norm3", &g4::norm_add_scale_norm3_op);
  m.impl("moe_block_end", &g4::moe_block_end_op);
  m.impl("head_norm_rope", &g4::head_norm_rope_op);
  m.impl("qkv_norm_rope_store", &g4::qkv_norm_rope_store_op);
  m.impl("gelu_tanh_and_mul", &g4::gelu_tanh_and_mul_op);
  m.impl("gelu_tanh_mul", &g4::gelu_tanh_mul_op);
  m.impl("gemv", &g4::gemv_op);
  m.impl("gemv_gelu_mul", &g4::gemv_gelu_mul_op);
  m.impl("gemv_gelu_aux", &g4::gemv_gelu_aux_op);
  m.impl("gemv_norm", &g4::gemv_norm_op);
  m.impl("gemv_qkv_norm_rope_store", &g4::gemv_qkv_norm_rope_store_op);
  m.impl("store_kv", &g4::store_kv_op);
#ifndef USE_ROCM
  m.impl("paged_attention", &g4::paged_attention_op);
#endif
  m.impl("moe_route", &g4::moe_route_op);
  m.impl("moe_align", &g4::moe_align_op);
#ifndef USE_ROCM
  m.impl("moe_experts", &g4::moe_experts_op);
  m.impl("sample", &g4::sample_op);
#endif
}

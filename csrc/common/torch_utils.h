// Torch-side glue shared by the bindings: dtype mapping, checks, current stream. Host code only.
// TORCH_CHECK messages here and in the bindings are built from strings only: on the GPU machine's torch 2.11 a
// failed check whose message streamed an integer crashed the process instead of raising
// (tests/ops/test_csrc_messages.py keeps it so).
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include "common/launchers.h"

namespace g4 {

inline int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: TORCH_CHECK(false, "gemma4rt: unsupported dtype ", c10::toString(t.scalar_type()));
  }
  return -1;
}

inline cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

inline void check_launch(cudaError_t e, const char* op) {
  TORCH_CHECK(e == cudaSuccess, "gemma4rt::", op, ": ", cudaGetErrorString(e));
}

#define G4_CHECK_CUDA(t) TORCH_CHECK((t).is_cuda(), #t " must be a CUDA tensor")
#define G4_CHECK_LAST(t) TORCH_CHECK((t).stride(-1) == 1, #t " must have a contiguous last dimension")
#define G4_OPT_PTR(o) ((o).has_value() ? (o)->data_ptr() : nullptr)

}  // namespace g4

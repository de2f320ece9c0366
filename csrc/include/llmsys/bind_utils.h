// bind_utils.h: helpers for the csrc/bind_<op>.cpp files, the only translation units that see torch.
//
// Include this from binding files only: it pulls in ATen (and, with LLMSYS_WITH_CUDA, c10/cuda), which
// the plain C++ twins and the .cu kernels must not depend on (a .cu including torch takes ~80 s to
// compile and does not build against the CPU wheel at all).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "llmsys/dtypes.h"

#ifdef LLMSYS_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace llmsys {

// The DType of a tensor the ops accept; other dtypes raise ValueError in Python.
inline DType dtype_of(const at::Tensor& t, const char* op, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK_VALUE(false, op, ": ", what, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return DType::kFloat32;  // unreachable
}

// Turns a kernel's Status into a RuntimeError naming the op.
inline void check_status(Status status, const char* op) {
  TORCH_CHECK(status == kOk, op, ": ", status == kOk ? "" : status);
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* what) {
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", what, " must be on ", a.device(), ", got ", b.device());
}

#ifdef LLMSYS_WITH_CUDA
// The stream PyTorch is currently using on t's device (so our kernels order with the caller's work).
inline cudaStream_t stream_for(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}
#endif

}  // namespace llmsys

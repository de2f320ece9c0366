// swiglu.h: the SwiGLU gate of a Llama MLP (Shazeer 2020, "GLU Variants Improve Transformer").
//
//   out   = silu(gate) * up,            silu(g) = g * sigmoid(g)
//   dgate = dout * up * sigmoid(g) * (1 + g * (1 - sigmoid(g)))
//   dup   = dout * silu(g)
//
// Elementwise over n contiguous elements of `dtype`; fp32 math, each output rounded once (eager
// PyTorch rounds silu(gate) to the input dtype before the product; we do not, so we are a little closer
// to the exact value). Aliasing: out may be gate or up; dgate may be gate or dout, dup may be up.
#pragma once

#include <cstdint>

#include "llmsys/dtypes.h"

namespace llmsys {

Status swiglu_forward_cpu(DType dtype, const void* gate, const void* up, void* out, int64_t n);
Status swiglu_backward_cpu(DType dtype, const void* dout, const void* gate, const void* up, void* dgate,
                           void* dup, int64_t n);

}  // namespace llmsys

#if defined(__CUDACC__) || defined(LLMSYS_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace llmsys {

Status swiglu_forward_cuda(DType dtype, const void* gate, const void* up, void* out, int64_t n,
                           cudaStream_t stream);
Status swiglu_backward_cuda(DType dtype, const void* dout, const void* gate, const void* up, void* dgate,
                            void* dup, int64_t n, cudaStream_t stream);

}  // namespace llmsys
#endif

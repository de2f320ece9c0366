// rms_norm.h: fused RMSNorm with an optional residual add, forward and backward (Zhang & Sennrich 2019).
//
//   h    = x + residual            (or h = x without a residual); h is the new residual stream
//   rstd = 1 / sqrt(mean(h^2) + eps)                                  per row, fp32
//   y    = h * rstd * weight                                          rounded once to the input dtype
//
// Backward, with xhat = h * rstd:
//   dh      = rstd * (dy*w - xhat * mean(dy*w * xhat)) + dresidual    (dresidual: gradient of the new
//             residual stream, optional); dx = dresidual_in = dh
//   dweight = sum over rows of dy * xhat
//
// Layout: x, residual, y, residual_out, dy, h, dresidual, dh are (rows, cols) row-major and contiguous;
// weight and dweight (cols,); rstd (rows,) fp32. `dtype` is the type of every (rows, cols) tensor,
// `weight_dtype` the type of weight and dweight: equal to `dtype`, or kFloat32 (fp32 master weights).
// With a residual, h is rounded to `dtype` first and the norm is taken of the rounded value, so that y,
// the returned residual stream and the backward (which re-reads h) agree exactly.
// Aliasing: residual_out may be x or residual (an in-place residual update); dh may be dy or dresidual.
// Everything accumulates in fp32. rows >= 0, cols >= 1.
//
// CPU twins: OpenMP over rows; dweight from per-thread fp32 partials summed at the end.
// CUDA: one block per row (forward), a grid-strided set of blocks each owning all columns of its rows
// for dweight partials (shared memory, fp32) then a column reduction kernel (backward). See
// csrc/cuda/rms_norm.cu for limits.
#pragma once

#include <cstdint>

#include "llmsys/dtypes.h"

namespace llmsys {

// residual and residual_out: both null (no residual) or both non-null.
Status rms_norm_forward_cpu(DType dtype, DType weight_dtype, const void* x, const void* residual,
                            const void* weight, void* y, void* residual_out, float* rstd, int64_t rows,
                            int64_t cols, float eps);

// dresidual may be null. h is the normalised input (x, or the residual stream returned by the forward).
Status rms_norm_backward_cpu(DType dtype, DType weight_dtype, const void* dy, const void* h,
                             const void* dresidual, const void* weight, const float* rstd, void* dh,
                             void* dweight, int64_t rows, int64_t cols);

}  // namespace llmsys

#if defined(__CUDACC__) || defined(LLMSYS_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace llmsys {

Status rms_norm_forward_cuda(DType dtype, DType weight_dtype, const void* x, const void* residual,
                             const void* weight, void* y, void* residual_out, float* rstd, int64_t rows,
                             int64_t cols, float eps, cudaStream_t stream);

// Size (in floats) of the fp32 scratch buffer rms_norm_backward_cuda needs on the current device.
Status rms_norm_backward_cuda_workspace(int64_t rows, int64_t cols, int64_t* num_floats);

// workspace: at least rms_norm_backward_cuda_workspace(...) floats of device memory (contents ignored).
Status rms_norm_backward_cuda(DType dtype, DType weight_dtype, const void* dy, const void* h,
                              const void* dresidual, const void* weight, const float* rstd, void* dh,
                              void* dweight, float* workspace, int64_t rows, int64_t cols,
                              cudaStream_t stream);

}  // namespace llmsys
#endif

// rotary.h: rotary position embedding (Su et al. 2021, RoFormer), GPT-NeoX / Llama "half" layout.
//
// x is (B, T, H, D); element i of a head is paired with element i + D/2 and the pair is rotated by the
// angle of position t and frequency i:
//   out[.., i]       = x[.., i] * cos[t, i] - x[.., i + D/2] * sin[t, i]
//   out[.., i + D/2] = x[.., i] * sin[t, i] + x[.., i + D/2] * cos[t, i]
// inverse = true rotates by -theta (sin -> -sin): the backward of the forward, since a rotation's
// transpose is its inverse.
//
// Layout: x and out have any strides over (B, T, H) (in elements) and a contiguous last dimension;
// cos, sin are (T, D/2) contiguous fp32. D must be even. out may be x (in place): each pair is read
// completely before it is written, by the same thread. fp32 math, output rounded once to `dtype`.
#pragma once

#include <cstdint>

#include "llmsys/dtypes.h"

namespace llmsys {

struct RotaryShape {
  int64_t B, T, H, D;
  int64_t stride_xb, stride_xt, stride_xh;  // strides of x in elements (stride over D is 1)
  int64_t stride_ob, stride_ot, stride_oh;  // strides of out in elements (stride over D is 1)
};

Status apply_rotary_cpu(DType dtype, const void* x, void* out, const float* cos, const float* sin,
                        const RotaryShape& shape, bool inverse);

}  // namespace llmsys

#if defined(__CUDACC__) || defined(LLMSYS_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace llmsys {

Status apply_rotary_cuda(DType dtype, const void* x, void* out, const float* cos, const float* sin,
                         const RotaryShape& shape, bool inverse, cudaStream_t stream);

}  // namespace llmsys
#endif

// rotary.cu: rotary position embedding, GPT-NeoX / Llama half layout, forward (theta) and backward
// (-theta), fp32 / fp16 / bf16 with fp32 math. Math, strides and the in-place rule:
// csrc/include/llmsys/rotary.h. CPU twin (the reference): csrc/cpu/rotary.cpp.
//
// One block per token (b, t); its threads walk the H * (D/2) / VEC vector slots of that token, each
// reading VEC elements of the first half of a head and the VEC partners D/2 further on, plus VEC cos and
// sin values (shared by all heads of the token, so they come from L1). Every element of x is read once
// and written once: the minimum traffic. Vectorised (16-byte) when D/2, the (B, T, H) strides and the
// pointers allow it, else one element per access.
#include "llmsys/cuda_common.cuh"
#include "llmsys/rotary.h"

namespace llmsys {
namespace {

using cuda::load_f;
using cuda::store_f;

// Threads per token: a Llama token has H * D/2 / 8 = 32 * 64 / 8 = 256 bf16 vector slots.
constexpr int kThreads = 256;

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    rotary_kernel(const T* x, T* out, const float* __restrict__ cos, const float* __restrict__ sin,
                  RotaryShape s, float sign) {
  const int64_t token = blockIdx.x;
  const int64_t b = token / s.T, t = token % s.T;
  const int64_t half = s.D / 2;
  const int64_t vecs_per_head = half / VEC;
  const int64_t slots = s.H * vecs_per_head;
  const float* cr = cos + t * half;
  const float* sr = sin + t * half;
  for (int64_t slot = threadIdx.x; slot < slots; slot += blockDim.x) {
    const int64_t h = slot / vecs_per_head;
    const int64_t i = (slot % vecs_per_head) * VEC;
    const T* xr = x + b * s.stride_xb + t * s.stride_xt + h * s.stride_xh;
    T* orow = out + b * s.stride_ob + t * s.stride_ot + h * s.stride_oh;
    float x1[VEC], x2[VEC], c[VEC], sn[VEC], o1[VEC], o2[VEC];
    load_f<T, VEC>(xr + i, x1);
    load_f<T, VEC>(xr + i + half, x2);
    load_f<float, VEC>(cr + i, c);
    load_f<float, VEC>(sr + i, sn);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float sj = sign * sn[j];
      o1[j] = x1[j] * c[j] - x2[j] * sj;
      o2[j] = x1[j] * sj + x2[j] * c[j];
    }
    store_f<T, VEC>(orow + i, o1);  // in place is safe: this thread already holds both halves
    store_f<T, VEC>(orow + i + half, o2);
  }
}

template <typename T, int VEC>
Status launch(const void* x, void* out, const float* cos, const float* sin, const RotaryShape& shape, float sign,
              cudaStream_t stream) {
  const int64_t tokens = shape.B * shape.T;
  if (tokens > 0x7fffffffLL) return "apply_rotary (CUDA): more than 2^31 - 1 tokens";
  rotary_kernel<T, VEC><<<static_cast<unsigned>(tokens), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<T*>(out), cos, sin, shape, sign);
  LLMSYS_CUDA_CHECK_LAUNCH();
  return kOk;
}

}  // namespace

Status apply_rotary_cuda(DType dtype, const void* x, void* out, const float* cos, const float* sin,
                         const RotaryShape& shape, bool inverse, cudaStream_t stream) {
  if (shape.D < 2 || shape.D % 2 != 0) return "apply_rotary: head dim D must be even and >= 2";
  if (shape.B < 0 || shape.T < 0 || shape.H < 0) return "apply_rotary: negative size";
  if (shape.B * shape.T * shape.H == 0) return kOk;
  const float sign = inverse ? -1.f : 1.f;
  return cuda::dispatch_dtype(dtype, [&](auto t) -> Status {
    using T = decltype(t);
    constexpr int VEC = cuda::vec16<T>();
    const int64_t half = shape.D / 2;
    bool vectorise = half % VEC == 0 && cuda::aligned(x, 16) && cuda::aligned(out, 16) &&
                     cuda::aligned(cos, 4 * VEC) && cuda::aligned(sin, 4 * VEC);
    for (int64_t stride : {shape.stride_xb, shape.stride_xt, shape.stride_xh, shape.stride_ob, shape.stride_ot,
                           shape.stride_oh})
      vectorise = vectorise && stride % VEC == 0;
    if (vectorise) return launch<T, VEC>(x, out, cos, sin, shape, sign, stream);
    return launch<T, 1>(x, out, cos, sin, shape, sign, stream);
  });
}

}  // namespace llmsys

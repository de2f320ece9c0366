// swiglu.cu: out = silu(gate) * up and its backward, elementwise, fp32 / fp16 / bf16 with fp32 math.
// Math and aliasing: csrc/include/llmsys/swiglu.h. CPU twin (the reference): csrc/cpu/swiglu.cpp.
//
// A grid-stride loop over 16-byte vectors (8 bf16 / 4 fp32 per access) with the last n % VEC elements
// done one by one; misaligned pointers (views at odd offsets) run the same kernel with VEC = 1.
// Forward moves 3 elements per output, backward 5: the minimum.
#include "llmsys/cuda_common.cuh"
#include "llmsys/swiglu.h"

namespace llmsys {
namespace {

using cuda::from_f;
using cuda::load_f;
using cuda::store_f;
using cuda::to_f;

constexpr int kThreads = 256;
// Resident blocks per SM the grid is sized for (8 x 256 threads = a full sm_90 SM); the grid-stride
// loop covers the rest, so launch overhead stays flat in n.
constexpr int kBlocksPerSM = 8;

__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + expf(-g)); }

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    swiglu_forward_kernel(const T* gate, const T* up, T* out, int64_t n) {
  const int64_t num_vecs = n / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t v = first; v < num_vecs; v += stride) {
    float g[VEC], u[VEC], o[VEC];
    load_f<T, VEC>(gate + v * VEC, g);
    load_f<T, VEC>(up + v * VEC, u);
#pragma unroll
    for (int j = 0; j < VEC; ++j) o[j] = g[j] * sigmoid(g[j]) * u[j];
    store_f<T, VEC>(out + v * VEC, o);
  }
  for (int64_t i = num_vecs * VEC + first; i < n; i += stride) {
    const float g = to_f(gate[i]);
    out[i] = from_f<T>(g * sigmoid(g) * to_f(up[i]));
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    swiglu_backward_kernel(const T* dout, const T* gate, const T* up, T* dgate, T* dup, int64_t n) {
  const int64_t num_vecs = n / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t v = first; v < num_vecs; v += stride) {
    float d[VEC], g[VEC], u[VEC], dg[VEC], du[VEC];
    load_f<T, VEC>(dout + v * VEC, d);
    load_f<T, VEC>(gate + v * VEC, g);
    load_f<T, VEC>(up + v * VEC, u);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float sg = sigmoid(g[j]);
      dg[j] = d[j] * u[j] * sg * (1.f + g[j] * (1.f - sg));
      du[j] = d[j] * g[j] * sg;
    }
    store_f<T, VEC>(dgate + v * VEC, dg);
    store_f<T, VEC>(dup + v * VEC, du);
  }
  for (int64_t i = num_vecs * VEC + first; i < n; i += stride) {
    const float d = to_f(dout[i]), g = to_f(gate[i]), u = to_f(up[i]);
    const float sg = sigmoid(g);
    dgate[i] = from_f<T>(d * u * sg * (1.f + g * (1.f - sg)));
    dup[i] = from_f<T>(d * g * sg);
  }
}

Status grid_for(int64_t work, unsigned* blocks) {
  int sms = 0;
  if (Status s = cuda::sm_count(&sms)) return s;
  const int64_t needed = (work + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sms) * kBlocksPerSM;
  *blocks = static_cast<unsigned>(needed < 1 ? 1 : (needed < cap ? needed : cap));
  return kOk;
}

bool all_aligned(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (!cuda::aligned(p, 16)) return false;
  return true;
}

}  // namespace

Status swiglu_forward_cuda(DType dtype, const void* gate, const void* up, void* out, int64_t n,
                           cudaStream_t stream) {
  if (n < 0) return "swiglu: negative size";
  if (n == 0) return kOk;
  const bool vectorise = all_aligned({gate, up, out});
  return cuda::dispatch_dtype(dtype, [&](auto t) -> Status {
    using T = decltype(t);
    constexpr int VEC = cuda::vec16<T>();
    unsigned blocks = 0;
    if (Status s = grid_for(vectorise ? n / VEC : n, &blocks)) return s;
    if (vectorise)
      swiglu_forward_kernel<T, VEC><<<blocks, kThreads, 0, stream>>>(
          static_cast<const T*>(gate), static_cast<const T*>(up), static_cast<T*>(out), n);
    else
      swiglu_forward_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(
          static_cast<const T*>(gate), static_cast<const T*>(up), static_cast<T*>(out), n);
    LLMSYS_CUDA_CHECK_LAUNCH();
    return kOk;
  });
}

Status swiglu_backward_cuda(DType dtype, const void* dout, const void* gate, const void* up, void* dgate,
                            void* dup, int64_t n, cudaStream_t stream) {
  if (n < 0) return "swiglu: negative size";
  if (n == 0) return kOk;
  const bool vectorise = all_aligned({dout, gate, up, dgate, dup});
  return cuda::dispatch_dtype(dtype, [&](auto t) -> Status {
    using T = decltype(t);
    constexpr int VEC = cuda::vec16<T>();
    unsigned blocks = 0;
    if (Status s = grid_for(vectorise ? n / VEC : n, &blocks)) return s;
    if (vectorise)
      swiglu_backward_kernel<T, VEC><<<blocks, kThreads, 0, stream>>>(
          static_cast<const T*>(dout), static_cast<const T*>(gate), static_cast<const T*>(up), static_cast<T*>(dgate),
          static_cast<T*>(dup), n);
    else
      swiglu_backward_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(
          static_cast<const T*>(dout), static_cast<const T*>(gate), static_cast<const T*>(up), static_cast<T*>(dgate),
          static_cast<T*>(dup), n);
    LLMSYS_CUDA_CHECK_LAUNCH();
    return kOk;
  });
}

}  // namespace llmsys

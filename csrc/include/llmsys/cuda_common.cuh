// cuda_common.cuh: what every llmsys CUDA kernel file shares: checked CUDA calls that turn into a
// Status (see dtypes.h), fp32 <-> storage conversions for float / __half / __nv_bfloat16, 16-byte
// vector packs, warp and block sums, and the DType -> C++ type dispatch.
//
// Pure CUDA C++ (no torch): a .cu including this compiles on its own with `nvcc -arch=sm_90 -c`.
// Conversions are explicit intrinsics because torch's extension build defines __CUDA_NO_HALF_OPERATORS__,
// __CUDA_NO_HALF_CONVERSIONS__ and __CUDA_NO_BFLOAT16_CONVERSIONS__.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "llmsys/dtypes.h"

// Return the error string from the enclosing Status-returning function when a CUDA call fails.
#define LLMSYS_CUDA_CHECK(call)                                     \
  do {                                                              \
    const cudaError_t llmsys_err_ = (call);                         \
    if (llmsys_err_ != cudaSuccess) return cudaGetErrorString(llmsys_err_); \
  } while (0)

// After a <<<...>>> launch: configuration errors (too many threads, too much shared memory, ...).
#define LLMSYS_CUDA_CHECK_LAUNCH() LLMSYS_CUDA_CHECK(cudaGetLastError())

namespace llmsys {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// N elements of T loaded / stored as one aligned access; N * sizeof(T) == 16 gives a 128-bit LDG/STG
// (32 bytes, e.g. 8 floats next to 8 bf16, becomes two of them).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_f(const T* p, float (&out)[N]) {
  const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = to_f(pack.v[k]);
}

template <typename T, int N>
__device__ __forceinline__ void store_f(T* p, const float (&in)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int k = 0; k < N; ++k) pack.v[k] = from_f<T>(in[k]);
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

// Elements of T per 16-byte access.
template <typename T>
constexpr int vec16() { return static_cast<int>(16 / sizeof(T)); }

inline bool aligned(const void* p, int64_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of v over the block, returned to every thread. blockDim.x must be a multiple of 32;
// `scratch` is __shared__ float[32]. Ends with a barrier, so scratch can be reused right after.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < num_warps ? scratch[lane] : 0.f;
  v = warp_sum(v);
  __syncthreads();
  return v;
}

inline Status sm_count(int* count) {
  int device = 0;
  LLMSYS_CUDA_CHECK(cudaGetDevice(&device));
  LLMSYS_CUDA_CHECK(cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device));
  return kOk;
}

// Calls fn(T{}) with T the CUDA storage type of `dtype`.
template <typename Fn>
Status dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: return fn(float{});
    case DType::kFloat16: return fn(__half{});
    case DType::kBFloat16: return fn(__nv_bfloat16{});
  }
  return "unsupported dtype";
}

}  // namespace cuda
}  // namespace llmsys

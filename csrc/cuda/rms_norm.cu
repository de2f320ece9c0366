// rms_norm.cu: fused RMSNorm (+ residual add) forward and backward for fp32 / fp16 / bf16, fp32 math.
// Math, layout and aliasing rules: csrc/include/llmsys/rms_norm.h. CPU twin (the reference these
// kernels are checked against): csrc/cpu/rms_norm.cpp.
//
// Forward: one block per row. Each thread reads its share of the row with 16-byte loads (8 bf16 /
// 4 fp32), keeps up to kCachedVecs of them in registers while the block sums squares, then writes y
// from the registers: x (and residual) are read once, y (and the new residual) written once, which is
// the minimum traffic. Rows longer than blockDim * kCachedVecs vectors re-read the tail from L2.
//
// Backward: a grid of min(rows, kBwdBlocksPerSM * SMs) blocks, each walking rows with a grid stride.
// Per row it reduces sum(dy * w * xhat) over the block, writes dh, and adds dy * xhat into an fp32
// dweight partial for all columns held in shared memory (each thread owns fixed columns, so no
// atomics). The partials (blocks x cols, the caller's workspace) are then summed per column by a
// second kernel: deterministic, no fp32 atomics. Limit: cols * 4 bytes of shared memory per block
// (cols <= ~57k on sm_90, refused above the device's opt-in maximum).
//
// Vectorisation needs cols % (16 / sizeof(T)) == 0 and 16-byte aligned pointers (weight: aligned to
// its pack); otherwise the same kernels run with 1-element accesses.
#include "llmsys/cuda_common.cuh"
#include "llmsys/rms_norm.h"

namespace llmsys {
namespace {

using cuda::block_sum;
using cuda::from_f;
using cuda::load_f;
using cuda::store_f;
using cuda::to_f;

// Row vectors a thread keeps in registers (as raw 16-byte packs): 4 covers cols = 16k bf16 / 8k fp32
// at 512 threads (kMaxRowThreads), i.e. every Llama hidden size, for ~16-32 registers.
constexpr int kCachedVecs = 4;
// Backward blocks per SM: with 16k columns a block holds 64 KiB of dweight partials, and 2-3 such
// blocks fit an H100/H200 SM; more blocks only grow the partial buffer the reduction must read.
constexpr int kBwdBlocksPerSM = 2;
constexpr int kReduceThreads = 256;
// Threads per row at most. 512 (not 1024) so that __launch_bounds__ leaves 128 registers per thread:
// the bf16-with-fp32-weight backward needs ~128 without spilling (ptxas -v, sm_90, nvcc 13.0), and
// 512 threads x kCachedVecs x 8 bf16 still cover a 16k hidden size from registers.
constexpr int kMaxRowThreads = 512;

// Threads per row: one vector per thread up to kMaxRowThreads, a multiple of the warp size.
int threads_for(int64_t num_vecs) {
  int64_t t = (num_vecs + cuda::kWarpSize - 1) / cuda::kWarpSize * cuda::kWarpSize;
  if (t < cuda::kWarpSize) t = cuda::kWarpSize;
  if (t > kMaxRowThreads) t = kMaxRowThreads;
  return static_cast<int>(t);
}

template <typename T, typename W, int VEC, bool HAS_RESIDUAL>
__global__ void __launch_bounds__(kMaxRowThreads) rms_norm_forward_kernel(const T* x, const T* residual, const W* __restrict__ weight,
                                        T* __restrict__ y, T* residual_out, float* __restrict__ rstd,
                                        int64_t cols, float eps) {
  __shared__ float scratch[cuda::kWarpSize];
  const int64_t row = blockIdx.x;
  const int64_t num_vecs = cols / VEC;
  const int64_t stride = blockDim.x;
  const T* xr = x + row * cols;
  const T* rr = HAS_RESIDUAL ? residual + row * cols : nullptr;
  T* hr_out = HAS_RESIDUAL ? residual_out + row * cols : nullptr;
  const T* hr = HAS_RESIDUAL ? hr_out : xr;  // what is normalised (re-read for the uncached tail)

  // h = x (+ residual) for vector i, rounded to T; with a residual also stored as the new stream.
  auto load_h = [&](int64_t i, cuda::Pack<T, VEC>& packed, float (&h)[VEC]) {
    packed = *reinterpret_cast<const cuda::Pack<T, VEC>*>(xr + i * VEC);
    if (HAS_RESIDUAL) {
      float r[VEC];
      load_f<T, VEC>(rr + i * VEC, r);
#pragma unroll
      for (int j = 0; j < VEC; ++j) packed.v[j] = from_f<T>(to_f(packed.v[j]) + r[j]);
      *reinterpret_cast<cuda::Pack<T, VEC>*>(hr_out + i * VEC) = packed;
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) h[j] = to_f(packed.v[j]);  // the norm of the rounded stream (see header)
  };

  cuda::Pack<T, VEC> cache[kCachedVecs];
  float sum_sq = 0.f;
#pragma unroll
  for (int k = 0; k < kCachedVecs; ++k) {  // compile-time k: the cache stays in registers
    const int64_t i = threadIdx.x + k * stride;
    if (i < num_vecs) {
      float h[VEC];
      load_h(i, cache[k], h);
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum_sq += h[j] * h[j];
    }
  }
  for (int64_t i = threadIdx.x + kCachedVecs * stride; i < num_vecs; i += stride) {
    cuda::Pack<T, VEC> packed;
    float h[VEC];
    load_h(i, packed, h);
#pragma unroll
    for (int j = 0; j < VEC; ++j) sum_sq += h[j] * h[j];
  }
  const float rs = rsqrtf(block_sum(sum_sq, scratch) / static_cast<float>(cols) + eps);
  if (threadIdx.x == 0) rstd[row] = rs;

  T* yr = y + row * cols;
  auto write_y = [&](int64_t i, const cuda::Pack<T, VEC>& packed) {
    float w[VEC], out[VEC];
    load_f<W, VEC>(weight + i * VEC, w);
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = to_f(packed.v[j]) * rs * w[j];
    store_f<T, VEC>(yr + i * VEC, out);
  };
#pragma unroll
  for (int k = 0; k < kCachedVecs; ++k) {
    const int64_t i = threadIdx.x + k * stride;
    if (i < num_vecs) write_y(i, cache[k]);
  }
  for (int64_t i = threadIdx.x + kCachedVecs * stride; i < num_vecs; i += stride) {
    // Re-read from global; with a residual this thread wrote these elements itself, so it sees them.
    write_y(i, *reinterpret_cast<const cuda::Pack<T, VEC>*>(hr + i * VEC));
  }
}

template <typename T, typename W, int VEC, bool HAS_DRESIDUAL>
__global__ void __launch_bounds__(kMaxRowThreads) rms_norm_backward_kernel(const T* dy, const T* h, const T* dresidual, const W* __restrict__ weight,
                                         const float* __restrict__ rstd, T* dh, float* __restrict__ partial,
                                         int64_t rows, int64_t cols) {
  extern __shared__ float dw[];  // [cols] fp32 partial of dweight for this block's rows
  __shared__ float scratch[cuda::kWarpSize];
  const int64_t num_vecs = cols / VEC;
  const int64_t stride = blockDim.x;
  for (int64_t i = threadIdx.x; i < num_vecs; i += stride)
#pragma unroll
    for (int j = 0; j < VEC; ++j) dw[i * VEC + j] = 0.f;
  // No barrier needed: every thread only ever touches its own columns of dw.

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    using P = cuda::Pack<T, VEC>;
    const T* dyr = dy + row * cols;
    const T* hr = h + row * cols;
    const float rs = rstd[row];
    auto partial_dot = [&](const P& pdy, const P& ph, int64_t i) {
      float w[VEC], acc = 0.f;
      load_f<W, VEC>(weight + i * VEC, w);
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc += to_f(pdy.v[j]) * w[j] * (to_f(ph.v[j]) * rs);
      return acc;
    };
    P cache_dy[kCachedVecs], cache_h[kCachedVecs];
    float dot = 0.f;
#pragma unroll
    for (int k = 0; k < kCachedVecs; ++k) {
      const int64_t i = threadIdx.x + k * stride;
      if (i < num_vecs) {
        cache_dy[k] = *reinterpret_cast<const P*>(dyr + i * VEC);
        cache_h[k] = *reinterpret_cast<const P*>(hr + i * VEC);
        dot += partial_dot(cache_dy[k], cache_h[k], i);
      }
    }
    for (int64_t i = threadIdx.x + kCachedVecs * stride; i < num_vecs; i += stride)
      dot += partial_dot(*reinterpret_cast<const P*>(dyr + i * VEC), *reinterpret_cast<const P*>(hr + i * VEC), i);
    const float mean_dot = block_sum(dot, scratch) / static_cast<float>(cols);

    T* dhr = dh + row * cols;
    auto write_dh = [&](const P& pdy, const P& ph, int64_t i) {
      float w[VEC], dres[VEC], out[VEC];
      load_f<W, VEC>(weight + i * VEC, w);
      if (HAS_DRESIDUAL) load_f<T, VEC>(dresidual + row * cols + i * VEC, dres);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float g = to_f(pdy.v[j]);
        const float xhat = to_f(ph.v[j]) * rs;
        out[j] = rs * (g * w[j] - xhat * mean_dot) + (HAS_DRESIDUAL ? dres[j] : 0.f);
        dw[i * VEC + j] += g * xhat;
      }
      store_f<T, VEC>(dhr + i * VEC, out);
    };
#pragma unroll
    for (int k = 0; k < kCachedVecs; ++k) {
      const int64_t i = threadIdx.x + k * stride;
      if (i < num_vecs) write_dh(cache_dy[k], cache_h[k], i);
    }
    for (int64_t i = threadIdx.x + kCachedVecs * stride; i < num_vecs; i += stride)
      write_dh(*reinterpret_cast<const P*>(dyr + i * VEC), *reinterpret_cast<const P*>(hr + i * VEC), i);
  }
  float* part = partial + static_cast<int64_t>(blockIdx.x) * cols;
  for (int64_t i = threadIdx.x; i < num_vecs; i += stride)
#pragma unroll
    for (int j = 0; j < VEC; ++j) part[i * VEC + j] = dw[i * VEC + j];
}

// dweight[c] = sum over blocks of partial[b, c]; coalesced along c.
template <typename W>
__global__ void dweight_reduce_kernel(const float* __restrict__ partial, W* __restrict__ dweight, int num_blocks,
                                      int64_t cols) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float total = 0.f;
  for (int b = 0; b < num_blocks; ++b) total += partial[static_cast<int64_t>(b) * cols + c];
  dweight[c] = from_f<W>(total);
}

template <typename T, typename W, int VEC>
Status launch_forward(const void* x, const void* residual, const void* weight, void* y, void* residual_out,
                      float* rstd, int64_t rows, int64_t cols, float eps, cudaStream_t stream) {
  const int threads = threads_for(cols / VEC);
  if (residual != nullptr) {
    rms_norm_forward_kernel<T, W, VEC, true><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(residual), static_cast<const W*>(weight), static_cast<T*>(y),
        static_cast<T*>(residual_out), rstd, cols, eps);
  } else {
    rms_norm_forward_kernel<T, W, VEC, false><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
        static_cast<const T*>(x), nullptr, static_cast<const W*>(weight), static_cast<T*>(y), nullptr, rstd, cols,
        eps);
  }
  LLMSYS_CUDA_CHECK_LAUNCH();
  return kOk;
}

int backward_blocks(int64_t rows, int sms) {
  const int64_t blocks = static_cast<int64_t>(sms) * kBwdBlocksPerSM;
  return static_cast<int>(rows < blocks ? rows : blocks);
}

template <typename T, typename W, int VEC>
Status launch_backward(const void* dy, const void* h, const void* dresidual, const void* weight, const float* rstd,
                       void* dh, void* dweight, float* workspace, int64_t rows, int64_t cols, cudaStream_t stream) {
  int sms = 0;
  if (Status s = cuda::sm_count(&sms)) return s;
  const int blocks = backward_blocks(rows, sms);
  if (blocks > 0) {
    const int threads = threads_for(cols / VEC);
    const size_t smem = static_cast<size_t>(cols) * sizeof(float);
    auto kernel = dresidual != nullptr ? rms_norm_backward_kernel<T, W, VEC, true>
                                       : rms_norm_backward_kernel<T, W, VEC, false>;
    const size_t static_smem = cuda::kWarpSize * sizeof(float);  // block_sum's scratch
    if (smem + static_smem > 48 * 1024) {  // above the default limit it must be opted into, per kernel
      int device = 0, max_smem = 0;
      LLMSYS_CUDA_CHECK(cudaGetDevice(&device));
      LLMSYS_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
      if (smem + static_smem > static_cast<size_t>(max_smem))
        return "rms_norm backward (CUDA): hidden size too large for the dweight partials in shared memory "
               "(needs 4 bytes per column)";
      LLMSYS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem)));
    }
    kernel<<<blocks, threads, smem, stream>>>(static_cast<const T*>(dy), static_cast<const T*>(h),
                                              static_cast<const T*>(dresidual), static_cast<const W*>(weight), rstd,
                                              static_cast<T*>(dh), workspace, rows, cols);
    LLMSYS_CUDA_CHECK_LAUNCH();
  }
  const unsigned reduce_blocks = static_cast<unsigned>((cols + kReduceThreads - 1) / kReduceThreads);
  dweight_reduce_kernel<W><<<reduce_blocks, kReduceThreads, 0, stream>>>(workspace, static_cast<W*>(dweight), blocks,
                                                                         cols);
  LLMSYS_CUDA_CHECK_LAUNCH();
  return kOk;
}

Status check_args(DType dtype, DType weight_dtype, int64_t rows, int64_t cols) {
  if (rows < 0 || cols < 1) return "rms_norm: need rows >= 0 and cols >= 1";
  if (rows > 0x7fffffffLL) return "rms_norm (CUDA): more than 2^31 - 1 rows";
  if (weight_dtype != dtype && weight_dtype != DType::kFloat32)
    return "rms_norm: weight must have the input's dtype or be float32";
  return kOk;
}

// fn(T{}, W{}, VEC) for the storage types of (dtype, weight_dtype); VEC is 16 / sizeof(T) when every
// row pointer can be accessed 16 bytes at a time (and the weight pack at its own size), else 1.
template <typename Fn>
Status dispatch(DType dtype, DType weight_dtype, int64_t cols, std::initializer_list<const void*> row_ptrs,
                const void* weight, Fn&& fn) {
  return cuda::dispatch_dtype(dtype, [&](auto t) -> Status {
    using T = decltype(t);
    constexpr int VEC = cuda::vec16<T>();
    auto with_weight = [&](auto w) -> Status {
      using W = decltype(w);
      bool vectorise = cols % VEC == 0 && cuda::aligned(weight, static_cast<int64_t>(sizeof(W)) * VEC);
      for (const void* p : row_ptrs) vectorise = vectorise && cuda::aligned(p, 16);
      if (vectorise) return fn(T{}, W{}, std::integral_constant<int, VEC>{});
      return fn(T{}, W{}, std::integral_constant<int, 1>{});
    };
    if (weight_dtype == DType::kFloat32) return with_weight(float{});
    return with_weight(T{});
  });
}

}  // namespace

Status rms_norm_forward_cuda(DType dtype, DType weight_dtype, const void* x, const void* residual,
                             const void* weight, void* y, void* residual_out, float* rstd, int64_t rows,
                             int64_t cols, float eps, cudaStream_t stream) {
  if (Status s = check_args(dtype, weight_dtype, rows, cols)) return s;
  if ((residual == nullptr) != (residual_out == nullptr))
    return "rms_norm: residual and residual_out must both be given or both be null";
  if (rows == 0) return kOk;
  return dispatch(dtype, weight_dtype, cols, {x, residual, y, residual_out}, weight, [&](auto t, auto w, auto vec) {
    return launch_forward<decltype(t), decltype(w), decltype(vec)::value>(x, residual, weight, y, residual_out, rstd,
                                                                          rows, cols, eps, stream);
  });
}

Status rms_norm_backward_cuda_workspace(int64_t rows, int64_t cols, int64_t* num_floats) {
  int sms = 0;
  if (Status s = cuda::sm_count(&sms)) return s;
  *num_floats = static_cast<int64_t>(backward_blocks(rows, sms)) * cols;
  if (*num_floats == 0) *num_floats = 1;  // never hand out a null workspace
  return kOk;
}

Status rms_norm_backward_cuda(DType dtype, DType weight_dtype, const void* dy, const void* h,
                              const void* dresidual, const void* weight, const float* rstd, void* dh,
                              void* dweight, float* workspace, int64_t rows, int64_t cols,
                              cudaStream_t stream) {
  if (Status s = check_args(dtype, weight_dtype, rows, cols)) return s;
  if (workspace == nullptr) return "rms_norm backward (CUDA): null workspace";
  return dispatch(dtype, weight_dtype, cols, {dy, h, dresidual, dh}, weight, [&](auto t, auto w, auto vec) {
    return launch_backward<decltype(t), decltype(w), decltype(vec)::value>(dy, h, dresidual, weight, rstd, dh,
                                                                           dweight, workspace, rows, cols, stream);
  });
}

}  // namespace llmsys

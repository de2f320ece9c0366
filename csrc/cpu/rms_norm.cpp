// CPU twin of csrc/cuda/rms_norm.cu: same math and signatures (see llmsys/rms_norm.h), plain C++ with
// OpenMP over rows. It is the reference the CUDA kernel is checked against on a GPU and the fused op
// CPU training gets.
#include "llmsys/rms_norm.h"

#include <cmath>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace llmsys {
namespace {

// Below this many elements the OpenMP fork/join costs more than the work (tiny test shapes).
constexpr int64_t kParallelMinElements = 1 << 15;
// Independent partial sums in a row reduction: lets the compiler vectorise the fp32 sum without
// -ffast-math, and keeps the rounding error of long rows small.
constexpr int kLanes = 8;

template <typename T>
float sum_squares(const T* v, int64_t n) {
  float lane[kLanes] = {0.f};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int k = 0; k < kLanes; ++k) {
      const float f = to_float(v[c + k]);
      lane[k] += f * f;
    }
  for (; c < n; ++c) {
    const float f = to_float(v[c]);
    lane[0] += f * f;
  }
  float total = 0.f;
  for (int k = 0; k < kLanes; ++k) total += lane[k];
  return total;
}

template <typename T, typename W>
void forward(const T* x, const T* residual, const W* weight, T* y, T* residual_out, float* rstd, int64_t rows,
             int64_t cols, float eps) {
#pragma omp parallel for schedule(static) if (rows * cols >= kParallelMinElements)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * cols;
    const T* hr = xr;
    if (residual != nullptr) {
      const T* rr = residual + r * cols;
      T* out = residual_out + r * cols;
      for (int64_t c = 0; c < cols; ++c) out[c] = from_float<T>(to_float(xr[c]) + to_float(rr[c]));
      hr = out;  // normalise the rounded residual stream (see the header)
    }
    const float rs = 1.f / std::sqrt(sum_squares(hr, cols) / static_cast<float>(cols) + eps);
    rstd[r] = rs;
    T* yr = y + r * cols;
    for (int64_t c = 0; c < cols; ++c) yr[c] = from_float<T>(to_float(hr[c]) * rs * to_float(weight[c]));
  }
}

template <typename T, typename W>
void backward(const T* dy, const T* h, const T* dresidual, const W* weight, const float* rstd, T* dh, W* dweight,
              int64_t rows, int64_t cols) {
  int num_threads = 1;
#ifdef _OPENMP
  num_threads = omp_get_max_threads();
#endif
  const bool parallel = rows * cols >= kParallelMinElements && num_threads > 1;
  if (!parallel) num_threads = 1;
  // One fp32 dweight partial per thread, summed in thread order at the end (deterministic for a
  // given thread count).
  std::vector<float> partial(static_cast<size_t>(num_threads) * cols, 0.f);
#pragma omp parallel num_threads(num_threads) if (parallel)
  {
    int tid = 0;
#ifdef _OPENMP
    tid = omp_get_thread_num();
#endif
    float* dw = partial.data() + static_cast<size_t>(tid) * cols;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const T* dyr = dy + r * cols;
      const T* hr = h + r * cols;
      const float rs = rstd[r];
      float lane[kLanes] = {0.f};
      int64_t c = 0;
      for (; c + kLanes <= cols; c += kLanes)
        for (int k = 0; k < kLanes; ++k)
          lane[k] += to_float(dyr[c + k]) * to_float(weight[c + k]) * (to_float(hr[c + k]) * rs);
      for (; c < cols; ++c) lane[0] += to_float(dyr[c]) * to_float(weight[c]) * (to_float(hr[c]) * rs);
      float dot = 0.f;
      for (int k = 0; k < kLanes; ++k) dot += lane[k];
      const float mean_dot = dot / static_cast<float>(cols);
      const T* dres = dresidual == nullptr ? nullptr : dresidual + r * cols;
      T* dhr = dh + r * cols;
      for (c = 0; c < cols; ++c) {
        const float g = to_float(dyr[c]);
        const float xhat = to_float(hr[c]) * rs;
        float d = rs * (g * to_float(weight[c]) - xhat * mean_dot);
        if (dres != nullptr) d += to_float(dres[c]);
        dw[c] += g * xhat;
        dhr[c] = from_float<T>(d);
      }
    }
  }
  for (int64_t c = 0; c < cols; ++c) {
    float total = 0.f;
    for (int t = 0; t < num_threads; ++t) total += partial[static_cast<size_t>(t) * cols + c];
    dweight[c] = from_float<W>(total);
  }
}

Status check_args(DType dtype, DType weight_dtype, int64_t rows, int64_t cols) {
  if (rows < 0 || cols < 1) return "rms_norm: need rows >= 0 and cols >= 1";
  if (weight_dtype != dtype && weight_dtype != DType::kFloat32)
    return "rms_norm: weight must have the input's dtype or be float32";
  return kOk;
}

// Calls fn(T{}, W{}) with the storage types matching (dtype, weight_dtype).
template <typename Fn>
void dispatch(DType dtype, DType weight_dtype, Fn&& fn) {
  const bool w32 = weight_dtype == DType::kFloat32;
  switch (dtype) {
    case DType::kFloat32: fn(float{}, float{}); break;
    case DType::kFloat16: w32 ? fn(Half{}, float{}) : fn(Half{}, Half{}); break;
    case DType::kBFloat16: w32 ? fn(BFloat16{}, float{}) : fn(BFloat16{}, BFloat16{}); break;
  }
}

}  // namespace

Status rms_norm_forward_cpu(DType dtype, DType weight_dtype, const void* x, const void* residual,
                            const void* weight, void* y, void* residual_out, float* rstd, int64_t rows,
                            int64_t cols, float eps) {
  if (Status s = check_args(dtype, weight_dtype, rows, cols)) return s;
  if ((residual == nullptr) != (residual_out == nullptr))
    return "rms_norm: residual and residual_out must both be given or both be null";
  dispatch(dtype, weight_dtype, [&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    forward(static_cast<const T*>(x), static_cast<const T*>(residual), static_cast<const W*>(weight),
            static_cast<T*>(y), static_cast<T*>(residual_out), rstd, rows, cols, eps);
  });
  return kOk;
}

Status rms_norm_backward_cpu(DType dtype, DType weight_dtype, const void* dy, const void* h,
                             const void* dresidual, const void* weight, const float* rstd, void* dh,
                             void* dweight, int64_t rows, int64_t cols) {
  if (Status s = check_args(dtype, weight_dtype, rows, cols)) return s;
  dispatch(dtype, weight_dtype, [&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    backward(static_cast<const T*>(dy), static_cast<const T*>(h), static_cast<const T*>(dresidual),
             static_cast<const W*>(weight), rstd, static_cast<T*>(dh), static_cast<W*>(dweight), rows, cols);
  });
  return kOk;
}

}  // namespace llmsys

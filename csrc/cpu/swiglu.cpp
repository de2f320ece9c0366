// CPU twin of csrc/cuda/swiglu.cu (see llmsys/swiglu.h): elementwise, OpenMP over chunks, fp32 math.
#include "llmsys/swiglu.h"

#include <cmath>

namespace llmsys {
namespace {

constexpr int64_t kParallelMinElements = 1 << 16;

template <typename T>
void forward(const T* gate, const T* up, T* out, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= kParallelMinElements)
  for (int64_t i = 0; i < n; ++i) {
    const float g = to_float(gate[i]);
    out[i] = from_float<T>(g / (1.f + std::exp(-g)) * to_float(up[i]));
  }
}

template <typename T>
void backward(const T* dout, const T* gate, const T* up, T* dgate, T* dup, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= kParallelMinElements)
  for (int64_t i = 0; i < n; ++i) {
    const float g = to_float(gate[i]), u = to_float(up[i]), d = to_float(dout[i]);
    const float sig = 1.f / (1.f + std::exp(-g));
    dgate[i] = from_float<T>(d * u * sig * (1.f + g * (1.f - sig)));
    dup[i] = from_float<T>(d * g * sig);
  }
}

}  // namespace

Status swiglu_forward_cpu(DType dtype, const void* gate, const void* up, void* out, int64_t n) {
  if (n < 0) return "swiglu: negative size";
  switch (dtype) {
    case DType::kFloat32:
      forward(static_cast<const float*>(gate), static_cast<const float*>(up), static_cast<float*>(out), n);
      break;
    case DType::kFloat16:
      forward(static_cast<const Half*>(gate), static_cast<const Half*>(up), static_cast<Half*>(out), n);
      break;
    case DType::kBFloat16:
      forward(static_cast<const BFloat16*>(gate), static_cast<const BFloat16*>(up), static_cast<BFloat16*>(out), n);
      break;
  }
  return kOk;
}

Status swiglu_backward_cpu(DType dtype, const void* dout, const void* gate, const void* up, void* dgate,
                           void* dup, int64_t n) {
  if (n < 0) return "swiglu: negative size";
  switch (dtype) {
    case DType::kFloat32:
      backward(static_cast<const float*>(dout), static_cast<const float*>(gate), static_cast<const float*>(up),
               static_cast<float*>(dgate), static_cast<float*>(dup), n);
      break;
    case DType::kFloat16:
      backward(static_cast<const Half*>(dout), static_cast<const Half*>(gate), static_cast<const Half*>(up),
               static_cast<Half*>(dgate), static_cast<Half*>(dup), n);
      break;
    case DType::kBFloat16:
      backward(static_cast<const BFloat16*>(dout), static_cast<const BFloat16*>(gate),
               static_cast<const BFloat16*>(up), static_cast<BFloat16*>(dgate), static_cast<BFloat16*>(dup), n);
      break;
  }
  return kOk;
}

}  // namespace llmsys

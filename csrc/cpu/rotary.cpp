// CPU twin of csrc/cuda/rotary.cu (see llmsys/rotary.h): OpenMP over (B, T), fp32 math.
#include "llmsys/rotary.h"

namespace llmsys {
namespace {

constexpr int64_t kParallelMinElements = 1 << 15;

template <typename T>
void rotate(const T* x, T* out, const float* cos, const float* sin, const RotaryShape& s, bool inverse) {
  const int64_t half = s.D / 2;
  const float sign = inverse ? -1.f : 1.f;
#pragma omp parallel for collapse(2) schedule(static) if (s.B * s.T * s.H * s.D >= kParallelMinElements)
  for (int64_t b = 0; b < s.B; ++b) {
    for (int64_t t = 0; t < s.T; ++t) {
      const float* cr = cos + t * half;
      const float* sr = sin + t * half;
      for (int64_t h = 0; h < s.H; ++h) {
        const T* xr = x + b * s.stride_xb + t * s.stride_xt + h * s.stride_xh;
        T* orow = out + b * s.stride_ob + t * s.stride_ot + h * s.stride_oh;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = to_float(xr[i]), x2 = to_float(xr[i + half]);
          const float c = cr[i], sn = sign * sr[i];
          orow[i] = from_float<T>(x1 * c - x2 * sn);
          orow[i + half] = from_float<T>(x1 * sn + x2 * c);
        }
      }
    }
  }
}

}  // namespace

Status apply_rotary_cpu(DType dtype, const void* x, void* out, const float* cos, const float* sin,
                        const RotaryShape& shape, bool inverse) {
  if (shape.D < 2 || shape.D % 2 != 0) return "apply_rotary: head dim D must be even and >= 2";
  if (shape.B < 0 || shape.T < 0 || shape.H < 0) return "apply_rotary: negative size";
  switch (dtype) {
    case DType::kFloat32:
      rotate(static_cast<const float*>(x), static_cast<float*>(out), cos, sin, shape, inverse);
      break;
    case DType::kFloat16:
      rotate(static_cast<const Half*>(x), static_cast<Half*>(out), cos, sin, shape, inverse);
      break;
    case DType::kBFloat16:
      rotate(static_cast<const BFloat16*>(x), static_cast<BFloat16*>(out), cos, sin, shape, inverse);
      break;
  }
  return kOk;
}

}  // namespace llmsys

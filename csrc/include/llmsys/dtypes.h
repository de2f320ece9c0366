// dtypes.h: the element types llmsys's C++/CUDA ops accept, their portable fp32 conversions, and the
// error convention every CPU twin and CUDA launcher follows.
//
// Why our own: the CPU twins and the CUDA kernels are plain C++ (no torch headers; see csrc/README.md),
// so they cannot use at::Half / at::BFloat16, and the CPU twins cannot use cuda_fp16.h. `Half` and
// `BFloat16` below are 2-byte storage types with the same bit layout as at::Half / __half and
// at::BFloat16 / __nv_bfloat16, so a binding passes `tensor.data_ptr()` straight through.
// Arithmetic is always done in fp32: convert with to_float() on load, from_float() on store.
//
// Conversions round to nearest, ties to even (as PyTorch and the CUDA intrinsics do), keep NaN a NaN,
// overflow to +-inf, and handle fp16 subnormals. They are host-only: device code uses the CUDA
// intrinsics (__half2float, __float2bfloat16_rn, ...).
//
// Errors: a `Status` is nullptr on success, else a NUL-terminated message with static storage (a string
// literal or cudaGetErrorString's result). A plain pointer, not std::string, so nothing crosses the
// nvcc / g++ object boundary but a pointer; the binding turns a non-null Status into a C++ exception.
//
// Keep this header small and stable: every op (rms_norm, rotary, swiglu, decode_attention) includes it.
#pragma once

#include <cstdint>
#include <cstring>

namespace llmsys {

// Element types of a tensor handed to an op. Values are stable (they may be logged or compared).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

inline int dtype_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

using Status = const char*;
constexpr Status kOk = nullptr;

// 2-byte storage types (host side). Trivially copyable, no arithmetic on purpose.
struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };
static_assert(sizeof(Half) == 2 && sizeof(BFloat16) == 2, "storage types must be 2 bytes");

inline uint32_t float_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float bf16_bits_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even on the 16 dropped bits
  return static_cast<uint16_t>(u >> 16);
}

inline float fp16_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0x1fu) return bits_float(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp == 0) {                                                         // zero / subnormal: mant * 2^-24
    const float mag = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return bits_float(sign | float_bits(mag));
  }
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));  // rebias 15 -> 127
}

inline uint16_t float_to_fp16_bits(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 (and inf) rounds to inf
  if (a < 0x38800000u) {
    // |f| < 2^-14: a half subnormal (or zero). Adding 0.5 puts the value where the float ulp is 2^-24,
    // the half subnormal ulp, so the FPU does the round-to-nearest-even for us.
    const float shifted = bits_float(a) + 0.5f;
    return sign | static_cast<uint16_t>(float_bits(shifted) - 0x3f000000u);
  }
  a += 0xc8000fffu + ((a >> 13) & 1u);  // rebias exponent by -112 and round to nearest even
  return sign | static_cast<uint16_t>(a >> 13);
}

inline float to_float(float v) { return v; }
inline float to_float(Half v) { return fp16_bits_to_float(v.bits); }
inline float to_float(BFloat16 v) { return bf16_bits_to_float(v.bits); }

// from_float<T>(v): the nearest T. Used as `out[i] = from_float<T>(acc)`.
template <typename T> inline T from_float(float v);
template <> inline float from_float<float>(float v) { return v; }
template <> inline Half from_float<Half>(float v) { return Half{float_to_fp16_bits(v)}; }
template <> inline BFloat16 from_float<BFloat16>(float v) { return BFloat16{float_to_bf16_bits(v)}; }

}  // namespace llmsys

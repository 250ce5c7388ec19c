// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Element types for keys and values: float, half, bfloat16 (and fp8
/// e4m3 where the CUDA headers provide it), converted to float on host and device.

#include <pqkv/core/macros.hpp>

#include <concepts>
#include <cstdint>
#include <string_view>

#if __has_include(<cuda_fp16.h>)
#  include <cuda_fp16.h>
#  define PQKV_HAS_HALF 1
#endif
#if __has_include(<cuda_bf16.h>)
#  include <cuda_bf16.h>
#  define PQKV_HAS_BF16 1
#endif
#if __has_include(<cuda_fp8.h>)
#  include <cuda_fp8.h>
#  define PQKV_HAS_FP8 1
#endif

namespace pqkv {

/// Traits of a supported key/value element type: a short name, its size, and
/// exact conversion to float / rounding from float (round to nearest even).
template <class T>
struct dtype_traits;

template <>
struct dtype_traits<float> {
  static constexpr std::string_view name = "f32";
  PQKV_HD static float to_float(float x) { return x; }
  PQKV_HD static float from_float(float x) { return x; }
};

#if defined(PQKV_HAS_HALF)
template <>
struct dtype_traits<__half> {
  static constexpr std::string_view name = "f16";
  PQKV_HD static float to_float(__half x) { return __half2float(x); }
  PQKV_HD static __half from_float(float x) { return __float2half_rn(x); }
};
#endif

#if defined(PQKV_HAS_BF16)
template <>
struct dtype_traits<__nv_bfloat16> {
  static constexpr std::string_view name = "bf16";
  PQKV_HD static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  PQKV_HD static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};
#endif

#if defined(PQKV_HAS_FP8)
template <>
struct dtype_traits<__nv_fp8_e4m3> {
  static constexpr std::string_view name = "e4m3";
  PQKV_HD static float to_float(__nv_fp8_e4m3 x) { return static_cast<float>(x); }
  PQKV_HD static __nv_fp8_e4m3 from_float(float x) { return __nv_fp8_e4m3(x); }
};
#endif

/// A key/value element type pqkv knows how to read.
template <class T>
concept KvElement = requires(T x, float f) {
  { dtype_traits<T>::to_float(x) } -> std::same_as<float>;
  { dtype_traits<T>::from_float(f) } -> std::same_as<T>;
};

/// `x` as float (T without cv-qualifiers).
template <class T>
PQKV_HD float to_float(T x)
{
  return dtype_traits<T>::to_float(x);
}

/// `x` rounded to T.
template <class T>
PQKV_HD T from_float(float x)
{
  return dtype_traits<T>::from_float(x);
}

}  // namespace pqkv

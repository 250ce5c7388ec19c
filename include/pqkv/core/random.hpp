// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Counter-based random numbers: the same (seed, stream, counter) gives
/// the same value on host and device, in any thread order, so CPU and GPU
/// backends can draw identical samples without sharing a generator's state.

#include <pqkv/core/macros.hpp>

#include <cstdint>

namespace pqkv::detail {

/// SplitMix64 finalizer: a bijective 64-bit mix with good avalanche.
PQKV_HD std::uint64_t mix64(std::uint64_t x)
{
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

/// 64 random bits for (seed, stream, counter).
PQKV_HD std::uint64_t random_bits(std::uint64_t seed, std::uint64_t stream, std::uint64_t counter)
{
  return mix64(mix64(seed ^ mix64(stream)) + counter);
}

/// Uniform double in [0, 1) with 53 random bits.
PQKV_HD double random_unit(std::uint64_t seed, std::uint64_t stream, std::uint64_t counter)
{
  return static_cast<double>(random_bits(seed, stream, counter) >> 11) * 0x1.0p-53;
}

/// Uniform integer in [0, n) (n > 0), by 128-bit multiply-shift (Lemire);
/// its bias is below n / 2^64.
PQKV_HD std::uint64_t random_below(std::uint64_t seed, std::uint64_t stream, std::uint64_t counter,
                                   std::uint64_t n)
{
  std::uint64_t const r = random_bits(seed, stream, counter);
#if defined(__CUDA_ARCH__)
  return __umul64hi(r, n);
#else
  __extension__ using u128 = unsigned __int128;
  return static_cast<std::uint64_t>((static_cast<u128>(r) * n) >> 64);
#endif
}

}  // namespace pqkv::detail

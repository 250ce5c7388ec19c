// SPDX-License-Identifier: Apache-2.0
#pragma once
// Small helpers shared by the CPU test files.

#include <pqkv/core/error.hpp>
#include <pqkv/core/random.hpp>

#include <cstdint>
#include <string>

namespace pqkv::test {

/// The message of the pqkv::error that `fn` throws ("" when it throws none).
template <class Fn>
std::string error_message(Fn&& fn)
{
  try {
    fn();
  } catch (pqkv::error const& e) {
    return e.what();
  }
  return {};
}

/// Whether `s` contains `part` (error-message checks).
inline bool contains(std::string const& s, std::string const& part) { return s.find(part) != std::string::npos; }

/// Gaussian-ish values (sum of four uniforms, mean 0), a pure function of (seed, i).
inline float noise(std::uint64_t seed, std::uint64_t i)
{
  double s = 0;
  for (std::uint64_t r = 0; r < 4; ++r) { s += pqkv::detail::random_unit(seed, i, r); }
  return static_cast<float>(s - 2.0);
}

}  // namespace pqkv::test

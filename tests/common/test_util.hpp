// SPDX-License-Identifier: Apache-2.0
#pragma once
// Small helpers shared by the CPU test files.

#include <pqkv/core/error.hpp>
#include <pqkv/core/random.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

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

/// The best k of scores s over tokens [first, last) by a full sort (score
/// descending, ties to the lower index): the chosen indices ascending, then
/// -1 up to `len` (the selection contract's reference).
template <class Score>
std::vector<std::int32_t> oracle_topk(std::vector<Score> const& s, std::int64_t first, std::int64_t last,
                                      std::int64_t k, std::int64_t len)
{
  std::vector<std::int32_t> idx;
  for (std::int64_t t = first; t < last; ++t) { idx.push_back(static_cast<std::int32_t>(t)); }
  std::stable_sort(idx.begin(), idx.end(), [&](std::int32_t a, std::int32_t b) {
    return s[static_cast<std::size_t>(a)] > s[static_cast<std::size_t>(b)];
  });
  idx.resize(std::min<std::size_t>(idx.size(), static_cast<std::size_t>(k)));
  std::sort(idx.begin(), idx.end());
  idx.resize(static_cast<std::size_t>(len), -1);
  return idx;
}

}  // namespace pqkv::test

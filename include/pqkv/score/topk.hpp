// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Top-k selection of token indices by score: the order every pqkv
/// scorer (CPU and GPU) selects in, and its CPU primitive.
///
/// Contract (what a GPU top-k must reproduce):
/// - Tokens rank by score, largest first; equal scores rank by token index,
///   lower first. -0.0 and +0.0 are equal. NaN ranks below every number
///   (below -inf); NaNs among themselves rank by index. This is a strict
///   total order, so the selected set is unique.
/// - The order is exactly that of the 64-bit key `topk_key(score, index)`,
///   larger key = better: a radix select on these keys reproduces it.
/// - k is clamped to the number of candidates; the selected token indices are
///   written sorted ascending by token index, and the rest of the output row
///   is padded with -1. The call returns the number of valid entries.

#include <pqkv/core/error.hpp>
#include <pqkv/core/macros.hpp>
#include <pqkv/core/views.hpp>

#include <cuda/std/bit>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <span>
#include <vector>

namespace pqkv {

/// Order-preserving 32-bit key of a score: a > b (as floats) iff
/// key(a) > key(b); -0.0 maps to the key of +0.0 and every NaN to 0, below
/// the key of -inf (0x007FFFFF).
PQKV_HD std::uint32_t score_rank_key(float score)
{
  if (score != score) { return 0u; }  // NaN ranks lowest
  if (score == 0.f) { score = 0.f; }  // -0 == +0
  auto const bits = ::cuda::std::bit_cast<std::uint32_t>(score);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

/// The 64-bit selection key of token `index` (0 <= index <= INT32_MAX) with
/// `score`: score rank in the high half, the complement of the index in the
/// low half, so larger keys are better and ties go to the lower index.
PQKV_HD std::uint64_t topk_key(float score, std::uint32_t index)
{
  return (static_cast<std::uint64_t>(score_rank_key(score)) << 32) | static_cast<std::uint64_t>(~index);
}

/// The token index a `topk_key` was built from.
PQKV_HD std::int32_t topk_key_index(std::uint64_t key)
{
  return static_cast<std::int32_t>(~static_cast<std::uint32_t>(key & 0xFFFFFFFFu));
}

namespace detail {

/// Selects the min(k, n) largest of `keys[0, n)` (reordering them) and writes
/// their token indices ascending to out[0, valid), -1 to out[valid, out_len).
/// Arguments are trusted (the public calls validate).
inline index_t topk_select_keys(std::uint64_t* keys, index_t n, index_t k, std::int32_t* out, index_t out_len)
{
  index_t const valid = std::min(k, n);
  if (valid > 0 && valid < n) { std::nth_element(keys, keys + valid, keys + n, std::greater<>{}); }
  for (index_t i = 0; i < valid; ++i) { out[i] = topk_key_index(keys[i]); }
  std::sort(out, out + valid);
  std::fill(out + valid, out + out_len, std::int32_t{-1});
  return valid;
}

}  // namespace detail

namespace cpu {

/// Selects the k best of `scores`, where `scores[i]` is the score of token
/// `first_index + i`, in the order of the file's contract. Writes the selected
/// token indices ascending into out[0, valid) and -1 into the rest of `out`;
/// returns valid = min(k, scores.size()).
/// Throws `pqkv::error` if k < 0, k > out.size(), first_index < 0, or a token
/// index would not fit in int32.
inline index_t topk_select(std::span<float const> scores, index_t k, std::span<std::int32_t> out,
                           index_t first_index = 0)
{
  constexpr char const* where = "topk_select";
  auto const n = static_cast<index_t>(scores.size());
  auto const out_len = static_cast<index_t>(out.size());
  PQKV_EXPECTS(k >= 0, where, "k=", k, " must be >= 0");
  PQKV_EXPECTS(k <= out_len, where, "k=", k, " exceeds out.size()=", out_len);
  PQKV_EXPECTS(first_index >= 0, where, "first_index=", first_index, " must be >= 0");
  PQKV_EXPECTS(first_index + n - 1 <= index_t{std::numeric_limits<std::int32_t>::max()}, where,
               "first_index=", first_index, " + scores.size()=", n, " exceeds the int32 token range");
  PQKV_EXPECTS(scores.data() != nullptr || n == 0, where, "scores.data() is null");
  PQKV_EXPECTS(out.data() != nullptr || out_len == 0, where, "out.data() is null");
  std::vector<std::uint64_t> keys(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) {
    keys[static_cast<std::size_t>(i)] = topk_key(scores[static_cast<std::size_t>(i)],
                                                 static_cast<std::uint32_t>(first_index + i));
  }
  return pqkv::detail::topk_select_keys(keys.data(), n, k, out.data(), out_len);
}

}  // namespace cpu
}  // namespace pqkv

// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::rq_window_shape`: the shape of a VQKV-style KV cache window
/// (sink and local tokens in 16 bits, the tokens between them as residual
/// codes) and the rule of how many tokens are coded; the GPU window itself is
/// `pqkv::gpu::rq_window` (encode/residual_window.cuh).

#include <pqkv/core/config.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/macros.hpp>

namespace pqkv {

/// The shape of an `rq_window`. After n tokens, `coded_count(n)` of them
/// (tokens sink .. sink + coded_count(n) - 1) are held as codes: 0 while n <=
/// sink + local, else floor((n - sink - local) / chunk) * chunk, so tokens
/// leave the window a whole chunk at a time and between `local` and
/// `local + chunk - 1` of the latest tokens stay in 16 bits.
struct rq_window_shape {
  index_t kv_heads = 8;
  index_t dim = 128;
  index_t sink = 4;           ///< first tokens kept in 16 bits (VQKV: 4)
  index_t local = 1024;       ///< latest tokens kept in 16 bits at least (VQKV: 1024)
  index_t chunk = 64;         ///< tokens encoded per encoder call; the most one append may add
  index_t capacity = 131072;  ///< tokens the window can hold

  /// Throws `pqkv::error` naming the first field out of range.
  void validate(char const* where = "rq_window_shape") const
  {
    PQKV_EXPECTS(kv_heads > 0, where, "kv_heads=", kv_heads, " must be positive");
    PQKV_EXPECTS(dim > 0, where, "dim=", dim, " must be positive");
    PQKV_EXPECTS(sink >= 0, where, "sink=", sink, " must be >= 0");
    PQKV_EXPECTS(local >= 1, where, "local=", local, " must be >= 1");
    PQKV_EXPECTS(chunk >= 1, where, "chunk=", chunk, " must be >= 1");
    PQKV_EXPECTS(sink + local <= capacity, where, "sink + local=", sink + local, " exceeds capacity=", capacity);
    PQKV_EXPECTS(chunk <= capacity - sink, where, "chunk=", chunk, " exceeds capacity - sink=", capacity - sink);
  }

  /// Ring slots of the 16-bit window: token p >= sink lives in slot (p - sink) % ring().
  [[nodiscard]] PQKV_HD constexpr index_t ring() const noexcept { return local + chunk; }
  /// Code rows per KV head: code row r is token sink + r.
  [[nodiscard]] PQKV_HD constexpr index_t code_rows() const noexcept { return capacity - sink; }
  /// Tokens held as codes after n tokens.
  [[nodiscard]] PQKV_HD constexpr index_t coded_count(index_t n) const noexcept
  {
    return n <= sink + local ? 0 : (n - sink - local) / chunk * chunk;
  }
};

}  // namespace pqkv

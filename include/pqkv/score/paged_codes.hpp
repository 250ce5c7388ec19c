// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::paged_codes`: PQ codes kept in an engine's paged layout, a
/// pool of fixed-size pages addressed through the same block table as the
/// engine's paged K/V (vLLM / FlashInfer style).
///
/// Token t of sequence b, KV head g is `pool(block_table(b, t / P), g, t % P, :)`
/// with P = pool.extent(2), the page size (any positive value). The pool may
/// be strided (e.g. [pages, P, kv_heads, m] memory seen as
/// [pages, kv_heads, P, m] with swapped strides) as long as the m bytes of a
/// token are contiguous. Entries of the block table past a sequence's last
/// page are never read (they may hold anything, e.g. -1). The capacity of a
/// sequence is `block_table.extent(1) * P` tokens.

#include <pqkv/core/views.hpp>

#include <cstdint>

namespace pqkv {

/// A paged view of PQ codes (the file's contract). Both views are device
/// memory when a GPU call takes them; the struct owns nothing.
struct paged_codes {
  strided_view<std::uint8_t const, 4> pool;  // [num_pages, kv_heads, page_size, m]
  view<std::int32_t const, 2> block_table;   // [batch, max_pages_per_seq]: physical page of each logical page

  /// Tokens per page (P).
  [[nodiscard]] constexpr index_t page_size() const noexcept { return pool.extent(2); }
  /// Pages in the pool.
  [[nodiscard]] constexpr index_t num_pages() const noexcept { return pool.extent(0); }
  /// Block-table entries per sequence.
  [[nodiscard]] constexpr index_t max_pages_per_seq() const noexcept { return block_table.extent(1); }
  /// Tokens a sequence can address: max_pages_per_seq * page_size.
  [[nodiscard]] constexpr index_t capacity() const noexcept { return block_table.extent(1) * pool.extent(2); }
};

}  // namespace pqkv

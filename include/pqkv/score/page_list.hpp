// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file From token selections to what a paged attention kernel consumes: the
/// CPU reference (`pqkv::cpu`) of `score/page_list.cuh`. Shared contract:
///
/// Inputs: selections [batch, kv_heads, k] int32 (as `adc_topk` writes them:
/// token indices ascending, then -1) and valid_counts [batch, kv_heads]
/// (clamped to [0, k]); only the first valid_counts[b][g] entries of a row
/// are read. P is the page size (> 0). Row r = b * kv_heads + g.
///
/// `to_page_indices`: per row, the entries' logical pages p_i = t_i / P
/// (p_i = -1 for t_i < 0), and page p_i is emitted when p_i >= 0 and
/// (i == 0 or p_i != p_{i-1}): for ascending input, the distinct pages
/// ascending. With a block table [batch, max_pages_per_seq] an emitted page p
/// is written as block_table[b][p] (-1 when p >= max_pages_per_seq or the
/// entry is negative); without one, as p. pages[b][g] gets the emitted
/// pages, then -1; page_counts[b][g] their number.
///
/// `to_paged_kv` (FlashInfer's paged-KV arrays, one "request" per row):
/// kv_indptr [rows + 1] = exclusive scan of the rows' page counts (kv_indptr[0]
/// = 0); kv_indices[kv_indptr[r] + i] = row r's i-th page as above, and
/// kv_indices[kv_indptr[rows] ..] = -1 to its end; kv_last_page_len[r] =
/// 0 for a row without pages, else clamp(seq_lens[b] - P * last, 1, P) where
/// `last` is the row's last logical page (only a sequence's last page is
/// partly filled).
///
/// `to_physical_slots`: every entry t of selections (all k, not only the
/// valid ones) becomes block_table[b][t / P] * page_stride + t % P
/// (page_stride 0 means P), computed in 64 bits; -1 where t < 0,
/// t / P >= max_pages_per_seq, the entry is negative, or the slot exceeds
/// INT32_MAX.
///
/// Output sizes are fixed by the inputs' extents (pages.extent(2) >= k,
/// kv_indices.size() >= rows * k), so a GPU call never depends on device
/// values for its shape. Results are exact integers: the GPU equals the CPU.

#include <pqkv/core/error.hpp>
#include <pqkv/core/macros.hpp>
#include <pqkv/core/views.hpp>

#include <cstdint>
#include <limits>
#include <span>

namespace pqkv {

/// Inputs of a page-list call that every backend validates the same way.
namespace detail::page_list {

/// Logical page of token t (-1 for t < 0).
PQKV_HD std::int64_t logical_page(std::int32_t t, std::int64_t page_size)
{
  return t < 0 ? -1 : static_cast<std::int64_t>(t) / page_size;
}

/// Logical page p through the block-table row (width pages); -1 when unmapped.
PQKV_HD std::int32_t map_page(std::int64_t p, std::int32_t const* table_row, std::int64_t width)
{
  if (table_row == nullptr) { return static_cast<std::int32_t>(p); }
  if (p < 0 || p >= width) { return -1; }
  std::int32_t const phys = table_row[p];
  return phys < 0 ? -1 : phys;
}

/// The physical slot of token t (the file's contract).
PQKV_HD std::int32_t physical_slot(std::int32_t t, std::int32_t const* table_row, std::int64_t width,
                                   std::int64_t page_size, std::int64_t page_stride)
{
  if (t < 0) { return -1; }
  std::int64_t const p = static_cast<std::int64_t>(t) / page_size;
  if (p >= width) { return -1; }
  std::int32_t const phys = table_row[p];
  if (phys < 0) { return -1; }
  std::int64_t const slot = static_cast<std::int64_t>(phys) * page_stride + (static_cast<std::int64_t>(t) - p * page_size);
  return slot > std::int64_t{2147483647} ? -1 : static_cast<std::int32_t>(slot);
}

/// Clamps a device-read valid count to [0, k].
PQKV_HD std::int64_t clamp_count(std::int32_t v, std::int64_t k) { return v < 0 ? 0 : (v > k ? k : v); }

/// Throws unless selections [batch, kv_heads, k] and valid_counts
/// [batch, kv_heads] agree and P > 0 fits int32.
inline void check_selections(view<std::int32_t const, 3> selections, view<std::int32_t const, 2> valid_counts,
                             index_t page_size, char const* where)
{
  PQKV_EXPECTS(page_size > 0 && page_size <= index_t{std::numeric_limits<std::int32_t>::max()}, where,
               "page_size=", page_size, " is outside [1, INT32_MAX]");
  PQKV_EXPECTS(valid_counts.extent(0) == selections.extent(0) && valid_counts.extent(1) == selections.extent(1),
               where, "valid_counts extents (", valid_counts.extent(0), ", ", valid_counts.extent(1),
               ") differ from selections' (batch, kv_heads)=(", selections.extent(0), ", ", selections.extent(1), ")");
  PQKV_EXPECTS(selections.data_handle() != nullptr || element_count(selections) == 0, where,
               "selections.data_handle() is null");
  PQKV_EXPECTS(valid_counts.data_handle() != nullptr || element_count(valid_counts) == 0, where,
               "valid_counts.data_handle() is null");
}

/// Throws unless the block table (when given: non-null or non-empty) has
/// one row per sequence.
inline void check_block_table(view<std::int32_t const, 2> block_table, index_t batch, bool required,
                              char const* where)
{
  bool const given = block_table.data_handle() != nullptr || element_count(block_table) > 0;
  PQKV_EXPECTS(given || !required, where, "block_table is required");
  if (!given) { return; }
  PQKV_EXPECTS(block_table.extent(0) == batch, where, "block_table.extent(0)=", block_table.extent(0),
               ", batch=", batch);
  PQKV_EXPECTS(block_table.data_handle() != nullptr || block_table.extent(1) == 0 || batch == 0, where,
               "block_table.data_handle() is null");
}

/// Throws unless the arguments of `to_page_indices` agree (the CPU and GPU calls).
inline void check_page_indices(view<std::int32_t const, 3> selections, view<std::int32_t const, 2> valid_counts,
                               index_t page_size, view<std::int32_t const, 2> block_table,
                               view<std::int32_t, 3> pages, view<std::int32_t, 2> page_counts, char const* where)
{
  check_selections(selections, valid_counts, page_size, where);
  index_t const batch = selections.extent(0), heads = selections.extent(1), k = selections.extent(2);
  check_block_table(block_table, batch, false, where);
  PQKV_EXPECTS(pages.extent(0) == batch && pages.extent(1) == heads, where, "pages extents (", pages.extent(0),
               ", ", pages.extent(1), ", ", pages.extent(2), ") differ from (batch, kv_heads)=(", batch, ", ", heads,
               ")");
  PQKV_EXPECTS(pages.extent(2) >= k, where, "pages.extent(2)=", pages.extent(2), " < selections.extent(2)=", k);
  PQKV_EXPECTS(page_counts.extent(0) == batch && page_counts.extent(1) == heads, where, "page_counts extents (",
               page_counts.extent(0), ", ", page_counts.extent(1), ") differ from (batch, kv_heads)=(", batch, ", ",
               heads, ")");
  PQKV_EXPECTS(pages.data_handle() != nullptr || element_count(pages) == 0, where, "pages.data_handle() is null");
  PQKV_EXPECTS(page_counts.data_handle() != nullptr || element_count(page_counts) == 0, where,
               "page_counts.data_handle() is null");
}

/// Throws unless the arguments of `to_paged_kv` agree (the CPU and GPU calls).
inline void check_paged_kv(view<std::int32_t const, 3> selections, view<std::int32_t const, 2> valid_counts,
                           std::span<std::int32_t const> seq_lens, index_t page_size,
                           view<std::int32_t const, 2> block_table, std::span<std::int32_t> kv_indptr,
                           std::span<std::int32_t> kv_indices, std::span<std::int32_t> kv_last_page_len,
                           char const* where)
{
  check_selections(selections, valid_counts, page_size, where);
  index_t const batch = selections.extent(0), heads = selections.extent(1), k = selections.extent(2);
  index_t const rows = batch * heads;
  check_block_table(block_table, batch, false, where);
  PQKV_EXPECTS(static_cast<index_t>(seq_lens.size()) == batch, where, "seq_lens.size()=", seq_lens.size(),
               ", batch=", batch);
  PQKV_EXPECTS(static_cast<index_t>(kv_indptr.size()) == rows + 1, where, "kv_indptr.size()=", kv_indptr.size(),
               ", rows + 1=", rows + 1);
  PQKV_EXPECTS(static_cast<index_t>(kv_indices.size()) >= rows * k, where, "kv_indices.size()=", kv_indices.size(),
               " < rows * k=", rows * k);
  PQKV_EXPECTS(rows * k <= index_t{std::numeric_limits<std::int32_t>::max()}, where, "rows * k=", rows * k,
               " exceeds the int32 range of kv_indptr");
  PQKV_EXPECTS(static_cast<index_t>(kv_last_page_len.size()) == rows, where, "kv_last_page_len.size()=",
               kv_last_page_len.size(), ", rows=", rows);
  PQKV_EXPECTS(seq_lens.data() != nullptr || batch == 0, where, "seq_lens.data() is null");
  PQKV_EXPECTS(kv_indptr.data() != nullptr, where, "kv_indptr.data() is null");
  PQKV_EXPECTS(kv_indices.data() != nullptr || kv_indices.empty(), where, "kv_indices.data() is null");
  PQKV_EXPECTS(kv_last_page_len.data() != nullptr || rows == 0, where, "kv_last_page_len.data() is null");
}

/// Throws unless the arguments of `to_physical_slots` agree (the CPU and GPU calls).
inline void check_physical_slots(view<std::int32_t const, 3> selections, index_t page_size,
                                 view<std::int32_t const, 2> block_table, view<std::int32_t, 3> slots,
                                 index_t page_stride, char const* where)
{
  PQKV_EXPECTS(page_size > 0 && page_size <= index_t{std::numeric_limits<std::int32_t>::max()}, where,
               "page_size=", page_size, " is outside [1, INT32_MAX]");
  PQKV_EXPECTS(page_stride >= 0, where, "page_stride=", page_stride, " must be >= 0 (0: page_size)");
  index_t const batch = selections.extent(0), heads = selections.extent(1), k = selections.extent(2);
  PQKV_EXPECTS(selections.data_handle() != nullptr || element_count(selections) == 0, where,
               "selections.data_handle() is null");
  check_block_table(block_table, batch, batch > 0 && k > 0, where);
  PQKV_EXPECTS(slots.extent(0) == batch && slots.extent(1) == heads && slots.extent(2) == k, where,
               "slots extents (", slots.extent(0), ", ", slots.extent(1), ", ", slots.extent(2),
               ") differ from selections' (", batch, ", ", heads, ", ", k, ")");
  PQKV_EXPECTS(slots.data_handle() != nullptr || element_count(slots) == 0, where, "slots.data_handle() is null");
}

}  // namespace detail::page_list

namespace cpu {

/// Per (sequence, KV head): the pages of its selected tokens (the file's
/// contract), logical, or physical through `block_table` when it is given
/// (pass `{}` for logical pages). Throws `pqkv::error` on mismatched extents,
/// page_size <= 0, pages.extent(2) < selections.extent(2) or a null view;
/// nothing is written then.
inline void to_page_indices(view<std::int32_t const, 3> selections,    // [batch, kv_heads, k]
                            view<std::int32_t const, 2> valid_counts,  // [batch, kv_heads]
                            index_t page_size,
                            view<std::int32_t const, 2> block_table,   // [batch, max_pages_per_seq] or {}
                            view<std::int32_t, 3> pages,               // [batch, kv_heads, >= k], -1 padded
                            view<std::int32_t, 2> page_counts)         // [batch, kv_heads]
{
  constexpr char const* where = "to_page_indices";
  namespace pl = pqkv::detail::page_list;
  pl::check_page_indices(selections, valid_counts, page_size, block_table, pages, page_counts, where);
  index_t const batch = selections.extent(0), heads = selections.extent(1), k = selections.extent(2);
  bool const mapped = block_table.data_handle() != nullptr;
  for (index_t b = 0; b < batch; ++b) {
    std::int32_t const* table_row = mapped ? block_table.data_handle() + b * block_table.extent(1) : nullptr;
    for (index_t g = 0; g < heads; ++g) {
      index_t const n = pl::clamp_count(valid_counts(b, g), k);
      index_t count = 0;
      std::int64_t prev = -1;
      for (index_t i = 0; i < n; ++i) {
        std::int64_t const p = pl::logical_page(selections(b, g, i), page_size);
        if (p >= 0 && (i == 0 || p != prev)) { pages(b, g, count++) = pl::map_page(p, table_row, block_table.extent(1)); }
        prev = p;
      }
      page_counts(b, g) = static_cast<std::int32_t>(count);
      for (index_t i = count; i < pages.extent(2); ++i) { pages(b, g, i) = -1; }
    }
  }
}

/// FlashInfer's paged-KV arrays for the selected pages, one request per
/// (sequence, KV head) row (the file's contract). Pass `{}` as block_table
/// for logical pages. Throws `pqkv::error` on mismatched extents,
/// kv_indptr.size() != rows + 1, kv_indices.size() < rows * k,
/// kv_last_page_len.size() != rows, seq_lens.size() != batch, or a null span.
inline void to_paged_kv(view<std::int32_t const, 3> selections,    // [batch, kv_heads, k]
                        view<std::int32_t const, 2> valid_counts,  // [batch, kv_heads]
                        std::span<std::int32_t const> seq_lens,    // [batch]
                        index_t page_size,
                        view<std::int32_t const, 2> block_table,   // [batch, max_pages_per_seq] or {}
                        std::span<std::int32_t> kv_indptr,         // [rows + 1]
                        std::span<std::int32_t> kv_indices,        // [>= rows * k], -1 after kv_indptr[rows]
                        std::span<std::int32_t> kv_last_page_len)  // [rows]
{
  constexpr char const* where = "to_paged_kv";
  namespace pl = pqkv::detail::page_list;
  pl::check_paged_kv(selections, valid_counts, seq_lens, page_size, block_table, kv_indptr, kv_indices,
                     kv_last_page_len, where);
  index_t const batch = selections.extent(0), heads = selections.extent(1), k = selections.extent(2);
  bool const mapped = block_table.data_handle() != nullptr;
  std::int64_t at = 0;
  kv_indptr[0] = 0;
  for (index_t b = 0; b < batch; ++b) {
    std::int32_t const* table_row = mapped ? block_table.data_handle() + b * block_table.extent(1) : nullptr;
    for (index_t g = 0; g < heads; ++g) {
      index_t const row = b * heads + g;
      index_t const n = pl::clamp_count(valid_counts(b, g), k);
      std::int64_t prev = -1, last = -1;
      for (index_t i = 0; i < n; ++i) {
        std::int64_t const p = pl::logical_page(selections(b, g, i), page_size);
        if (p >= 0 && (i == 0 || p != prev)) {
          kv_indices[static_cast<std::size_t>(at++)] = pl::map_page(p, table_row, block_table.extent(1));
          last = p;
        }
        prev = p;
      }
      kv_indptr[static_cast<std::size_t>(row + 1)] = static_cast<std::int32_t>(at);
      std::int64_t len = 0;
      if (last >= 0) {
        len = static_cast<std::int64_t>(seq_lens[static_cast<std::size_t>(b)]) - last * page_size;
        len = len < 1 ? 1 : (len > page_size ? page_size : len);
      }
      kv_last_page_len[static_cast<std::size_t>(row)] = static_cast<std::int32_t>(len);
    }
  }
  for (auto i = static_cast<std::size_t>(at); i < kv_indices.size(); ++i) { kv_indices[i] = -1; }
}

/// Token indices to physical KV slots through the block table (the file's
/// contract): out[b][g][i] = block_table[b][t / P] * page_stride + t % P,
/// -1 stays -1. page_stride 0 means page_size. Throws `pqkv::error` on
/// mismatched extents, page_size <= 0, page_stride < 0 or a null view.
inline void to_physical_slots(view<std::int32_t const, 3> selections,   // [batch, kv_heads, k]
                              index_t page_size,
                              view<std::int32_t const, 2> block_table,  // [batch, max_pages_per_seq]
                              view<std::int32_t, 3> slots,              // [batch, kv_heads, k]
                              index_t page_stride = 0)
{
  constexpr char const* where = "to_physical_slots";
  namespace pl = pqkv::detail::page_list;
  pl::check_physical_slots(selections, page_size, block_table, slots, page_stride, where);
  index_t const batch = selections.extent(0), heads = selections.extent(1), k = selections.extent(2);
  std::int64_t const stride = page_stride > 0 ? page_stride : page_size;
  for (index_t b = 0; b < batch; ++b) {
    std::int32_t const* table_row = block_table.data_handle() + b * block_table.extent(1);
    for (index_t g = 0; g < heads; ++g) {
      for (index_t i = 0; i < k; ++i) {
        slots(b, g, i) = pl::physical_slot(selections(b, g, i), table_row, block_table.extent(1), page_size, stride);
      }
    }
  }
}

}  // namespace cpu
}  // namespace pqkv

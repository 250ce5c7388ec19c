// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::cpu::rq_reconstruct`: residual codes back to float, half or
/// bf16 K or V rows, for a token range or for a -1-padded index list, from
/// uint8 / uint16 codes or the packed bit stream; and
/// `pqkv::cpu::rq_reconstruct_paged`, the rows of an index list written into
/// a paged KV cache (FlashInfer's layout) for a paged attention kernel.
///
/// Contract, for row (h, t), codebook head hc (0 when shared, else h), split
/// s, channel i < dsub, code n = s * stages + st:
///   `acc = 0.f; for st ascending: acc += C(hc, s, st, code(h, t, n), i);`
///   `out(h, row, perm[s * dsub + i]) = from_float<Out>(acc)` (the inverse
///   permutation puts each channel back where it came from).
/// Every code is checked < 2^bits before anything is written.
///
/// Paged: pages [num_pages, P, heads, dim] (NHD; any strides, so the HND
/// layout [num_pages, heads, P, dim] is the same call with its strides
/// permuted), a block table of the sequence's logical pages. Token t =
/// indices(h, j) >= 0 is written to pages(block_table[t / P], t % P, h, :);
/// -1 entries are skipped, and nothing else in the pages is written.

#include <pqkv/codebook/residual.hpp>
#include <pqkv/core/dtype.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/parallel.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/encode/residual.hpp>

#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

namespace pqkv {

/// Packed residual codes [heads, tokens, packed_row_bytes(splits * stages, bits)];
/// a distinct type so byte views are never taken for uint8 codes.
struct rq_packed_view {
  view<std::uint8_t const, 3> bytes;
};

namespace detail::rq {

/// Reads code n of row (h, t) from uint8 / uint16 codes.
template <class Code>
struct code_reader {
  view<Code const, 3> codes;
  [[nodiscard]] index_t heads() const noexcept { return codes.extent(0); }
  [[nodiscard]] index_t tokens() const noexcept { return codes.extent(1); }
  [[nodiscard]] bool null() const noexcept { return codes.data_handle() == nullptr && element_count(codes) != 0; }
  [[nodiscard]] index_t get(index_t h, index_t t, index_t n, int) const noexcept { return codes(h, t, n); }
  void check_shape(rq_config const& cfg, char const* where) const
  {
    check_code_type<Code>(cfg.bits, where);
    PQKV_EXPECTS(codes.extent(2) == cfg.codes_per_row(), where, "codes.extent(2)=", codes.extent(2),
                 ", config.splits * config.stages=", cfg.codes_per_row());
  }
};

/// Reads code n of row (h, t) from the packed bit stream.
struct packed_reader {
  view<std::uint8_t const, 3> bytes;
  [[nodiscard]] index_t heads() const noexcept { return bytes.extent(0); }
  [[nodiscard]] index_t tokens() const noexcept { return bytes.extent(1); }
  [[nodiscard]] bool null() const noexcept { return bytes.data_handle() == nullptr && element_count(bytes) != 0; }
  [[nodiscard]] index_t get(index_t h, index_t t, index_t n, int bits) const noexcept
  {
    return packed_get(&bytes(h, t, 0), n, bits);
  }
  void check_shape(rq_config const& cfg, char const* where) const
  {
    PQKV_EXPECTS(bytes.extent(2) == packed_row_bytes(cfg.codes_per_row(), cfg.bits), where,
                 "packed.bytes.extent(2)=", bytes.extent(2), ", packed_row_bytes(splits * stages, bits)=",
                 packed_row_bytes(cfg.codes_per_row(), cfg.bits));
  }
};

/// Checks the shared arguments of a reconstruct call.
template <class Reader, class Out>
void check_reconstruct(rq_config const& cfg, rq_centroids_view<float const> centroids, Reader const& r,
                       kv_view<Out> const& out, char const* where)
{
  cfg.validate(where);
  r.check_shape(cfg, where);
  PQKV_EXPECTS(!r.null(), where, "codes.data_handle() is null");
  check_rq_centroids(centroids, cfg, r.heads(), where);
  PQKV_EXPECTS(out.extent(0) == r.heads(), where, "out.extent(0)=", out.extent(0), ", codes.extent(0)=", r.heads());
  PQKV_EXPECTS(out.extent(2) == cfg.dim, where, "out.extent(2)=", out.extent(2), ", config.dim=", cfg.dim);
  PQKV_EXPECTS(out.data_handle() != nullptr || element_count(out) == 0, where, "out.data_handle() is null");
}

/// The contract's sum for row (h, t) into out(h, row, :).
template <class Reader, class Out>
void reconstruct_row(rq_config const& cfg, rq_centroids_view<float const> centroids, Reader const& r, index_t h,
                     index_t t, kv_view<Out> const& out, index_t row)
{
  index_t const stages = cfg.stages, dsub = cfg.dsub(), hc = centroids.extent(0) == 1 ? 0 : h;
  for (index_t s = 0; s < cfg.splits; ++s) {
    for (index_t i = 0; i < dsub; ++i) {
      float acc = 0.f;
      for (index_t st = 0; st < stages; ++st) {
        acc += centroids(hc, s, st, r.get(h, t, s * stages + st, cfg.bits), i);
      }
      out(h, row, cfg.channel(s * dsub + i)) = from_float<Out>(acc);
    }
  }
}

/// Throws unless every code of rows `t` (t >= 0) of every head is < 2^bits.
template <class Reader, class Rows>
void check_codes_in_range(rq_config const& cfg, Reader const& r, Rows rows, index_t count, char const* where)
{
  index_t const ksub = cfg.ksub();
  for (index_t h = 0; h < r.heads(); ++h) {
    for (index_t k = 0; k < count; ++k) {
      index_t const t = rows(h, k);
      if (t < 0) { continue; }
      for (index_t n = 0; n < cfg.codes_per_row(); ++n) {
        index_t const c = r.get(h, t, n, cfg.bits);
        PQKV_EXPECTS(c < ksub, where, "codes(", h, ", ", t, ", ", n, ")=", c, " >= 2^bits=", ksub);
      }
    }
  }
}

template <class Reader, class Out>
void reconstruct_range(rq_config const& cfg, rq_centroids_view<float const> centroids, Reader const& r, index_t first,
                       kv_view<Out> out, char const* where)
{
  check_reconstruct(cfg, centroids, r, out, where);
  index_t const count = out.extent(1);
  PQKV_EXPECTS(first >= 0 && first <= r.tokens() - count, where, "first=", first, " + out.extent(1)=", count,
               " exceeds codes.extent(1)=", r.tokens());
  check_codes_in_range(cfg, r, [&](index_t, index_t k) { return first + k; }, count, where);
  cpu::parallel_for(r.heads(), [&](index_t h) {
    for (index_t k = 0; k < count; ++k) { reconstruct_row(cfg, centroids, r, h, first + k, out, k); }
  });
}

template <class Reader, class Out>
void reconstruct_indices(rq_config const& cfg, rq_centroids_view<float const> centroids, Reader const& r,
                         selection_view<std::int32_t const> indices, kv_view<Out> out, char const* where)
{
  check_reconstruct(cfg, centroids, r, out, where);
  index_t const k = indices.extent(1);
  PQKV_EXPECTS(indices.extent(0) == r.heads(), where, "indices.extent(0)=", indices.extent(0), ", codes.extent(0)=",
               r.heads());
  PQKV_EXPECTS(out.extent(1) == k, where, "out.extent(1)=", out.extent(1), ", indices.extent(1)=", k);
  PQKV_EXPECTS(indices.data_handle() != nullptr || element_count(indices) == 0, where,
               "indices.data_handle() is null");
  for (index_t h = 0; h < r.heads(); ++h) {
    for (index_t j = 0; j < k; ++j) {
      index_t const t = indices(h, j);
      PQKV_EXPECTS(t == -1 || (t >= 0 && t < r.tokens()), where, "indices(", h, ", ", j, ")=", t,
                   " is neither -1 nor in [0, codes.extent(1)=", r.tokens(), ")");
    }
  }
  check_codes_in_range(cfg, r, [&](index_t h, index_t j) { return index_t{indices(h, j)}; }, k, where);
  cpu::parallel_for(r.heads(), [&](index_t h) {
    for (index_t j = 0; j < k; ++j) {
      index_t const t = indices(h, j);
      if (t < 0) {
        for (index_t d = 0; d < cfg.dim; ++d) { out(h, j, d) = from_float<Out>(0.f); }
      } else {
        reconstruct_row(cfg, centroids, r, h, t, out, j);
      }
    }
  });
}

/// The paged write of the indices' rows (the file's contract).
template <class Reader, class Out>
void reconstruct_paged(rq_config const& cfg, rq_centroids_view<float const> centroids, Reader const& r,
                       selection_view<std::int32_t const> indices, std::span<std::int32_t const> block_table,
                       ::cuda::std::mdspan<Out, extents<4>, ::cuda::std::layout_stride> pages, char const* where)
{
  index_t const num_pages = pages.extent(0), page_size = pages.extent(1), k = indices.extent(1);
  index_t const heads = r.heads(), codes_heads = heads;
  PQKV_EXPECTS(pages.extent(2) == codes_heads && pages.extent(3) == cfg.dim, where, "pages extents (",
               pages.extent(0), ", ", pages.extent(1), ", ", pages.extent(2), ", ", pages.extent(3),
               ") differ from (num_pages, P, heads=", codes_heads, ", dim=", cfg.dim, ")");
  PQKV_EXPECTS(page_size > 0, where, "pages.extent(1)=", page_size, " (the page size) must be positive");
  // The shape checks of the other calls, on a [heads, 1, dim] view of the pages.
  check_reconstruct(cfg, centroids, r,
                    make_strided_view<Out, 3>(pages.data_handle(), {pages.extent(2), 1, pages.extent(3)},
                                              {pages.stride(2), 0, pages.stride(3)}),
                    where);
  PQKV_EXPECTS(indices.extent(0) == heads, where, "indices.extent(0)=", indices.extent(0), ", codes.extent(0)=",
               heads);
  PQKV_EXPECTS(indices.data_handle() != nullptr || element_count(indices) == 0, where,
               "indices.data_handle() is null");
  PQKV_EXPECTS(block_table.data() != nullptr || block_table.empty(), where, "block_table.data() is null");
  for (index_t h = 0; h < heads; ++h) {
    for (index_t j = 0; j < k; ++j) {
      index_t const t = indices(h, j);
      if (t == -1) { continue; }
      PQKV_EXPECTS(t >= 0 && t < r.tokens(), where, "indices(", h, ", ", j, ")=", t,
                   " is neither -1 nor in [0, codes.extent(1)=", r.tokens(), ")");
      auto const page = static_cast<std::size_t>(t / page_size);
      PQKV_EXPECTS(page < block_table.size(), where, "indices(", h, ", ", j, ")=", t, " is on logical page ", page,
                   ", past block_table.size()=", block_table.size());
      index_t const phys = block_table[page];
      PQKV_EXPECTS(phys >= 0 && phys < num_pages, where, "block_table[", page, "]=", phys,
                   " is outside [0, pages.extent(0)=", num_pages, ")");
    }
  }
  check_codes_in_range(cfg, r, [&](index_t h, index_t j) { return index_t{indices(h, j)}; }, k, where);
  cpu::parallel_for(heads, [&](index_t h) {
    for (index_t j = 0; j < k; ++j) {
      index_t const t = indices(h, j);
      if (t < 0) { continue; }
      index_t const phys = block_table[static_cast<std::size_t>(t / page_size)];
      // Row h of a [heads, 1, dim] view based at the token's slot.
      auto const slot = make_strided_view<Out, 3>(&pages(phys, t % page_size, 0, 0), {heads, 1, cfg.dim},
                                                  {pages.stride(2), 0, pages.stride(3)});
      reconstruct_row(cfg, centroids, r, h, t, slot, 0);
    }
  });
}

}  // namespace detail::rq

namespace cpu {

/// Rows [first, first + out.extent(1)) of codes [heads, tokens, splits *
/// stages] into out [heads, count, dim] (float, half or bf16; any strides).
/// Throws on a shape mismatch, a range past the codes, a null view, a code
/// type too narrow for bits, a code >= 2^bits or a non-finite centroid.
template <class Code, class Out, class Layout, class Accessor>
  requires(RqCode<std::remove_const_t<Code>> && KvElement<Out> && !std::is_const_v<Out>)
void rq_reconstruct(rq_config const& cfg,
                    rq_centroids_view<float const> centroids,  // [1|heads, splits, stages, ksub, dsub]
                    view<Code, 3> codes,                       // [heads, tokens, splits * stages]
                    index_t first,
                    ::cuda::std::mdspan<Out, extents<3>, Layout, Accessor> out)  // [heads, count, dim]
{
  pqkv::detail::rq::code_reader<std::remove_const_t<Code>> const reader{as_const(codes)};
  pqkv::detail::rq::reconstruct_range(cfg, centroids, reader, first, kv_view<Out>{out}, "rq_reconstruct");
}

/// As above, from the packed bit stream.
template <class Out, class Layout, class Accessor>
  requires(KvElement<Out> && !std::is_const_v<Out>)
void rq_reconstruct(rq_config const& cfg, rq_centroids_view<float const> centroids, rq_packed_view packed,
                    index_t first, ::cuda::std::mdspan<Out, extents<3>, Layout, Accessor> out)
{
  pqkv::detail::rq::reconstruct_range(cfg, centroids, pqkv::detail::rq::packed_reader{packed.bytes}, first,
                                      kv_view<Out>{out}, "rq_reconstruct");
}

/// Rows indices(h, j) of head h into out(h, j, :), a zero row where the index
/// is -1 (the scorer's padding). Throws as `rq_reconstruct`, and unless
/// indices is [heads, k] with entries -1 or in [0, tokens).
template <class Code, class Out, class Layout, class Accessor>
  requires(RqCode<std::remove_const_t<Code>> && KvElement<Out> && !std::is_const_v<Out>)
void rq_reconstruct_indices(rq_config const& cfg, rq_centroids_view<float const> centroids,
                            view<Code, 3> codes,                            // [heads, tokens, splits * stages]
                            selection_view<std::int32_t const> indices,     // [heads, k], -1 padded
                            ::cuda::std::mdspan<Out, extents<3>, Layout, Accessor> out)  // [heads, k, dim]
{
  pqkv::detail::rq::code_reader<std::remove_const_t<Code>> const reader{as_const(codes)};
  pqkv::detail::rq::reconstruct_indices(cfg, centroids, reader, indices, kv_view<Out>{out}, "rq_reconstruct_indices");
}

/// As above, from the packed bit stream.
template <class Out, class Layout, class Accessor>
  requires(KvElement<Out> && !std::is_const_v<Out>)
void rq_reconstruct_indices(rq_config const& cfg, rq_centroids_view<float const> centroids, rq_packed_view packed,
                            selection_view<std::int32_t const> indices,
                            ::cuda::std::mdspan<Out, extents<3>, Layout, Accessor> out)
{
  pqkv::detail::rq::reconstruct_indices(cfg, centroids, pqkv::detail::rq::packed_reader{packed.bytes}, indices,
                                        kv_view<Out>{out}, "rq_reconstruct_indices");
}

/// The rows of indices [heads, k] (-1 padded) into a paged cache pages
/// [num_pages, P, heads, dim] (float, half or bf16; any strides) through the
/// sequence's block_table (the file's contract). Throws before writing
/// anything on a shape mismatch, an index neither -1 nor in [0, tokens), a
/// token whose logical page is past the table or maps outside [0, num_pages),
/// a null view, a code type too narrow for bits, a code >= 2^bits or a
/// non-finite centroid.
template <class Code, class Out, class Layout, class Accessor>
  requires(RqCode<std::remove_const_t<Code>> && KvElement<Out> && !std::is_const_v<Out>)
void rq_reconstruct_paged(rq_config const& cfg, rq_centroids_view<float const> centroids,
                          view<Code, 3> codes,                         // [heads, tokens, splits * stages]
                          selection_view<std::int32_t const> indices,  // [heads, k], -1 padded
                          std::span<std::int32_t const> block_table,   // [logical pages]: physical page
                          ::cuda::std::mdspan<Out, extents<4>, Layout, Accessor> pages)  // [num_pages, P, heads, dim]
{
  pqkv::detail::rq::code_reader<std::remove_const_t<Code>> const reader{as_const(codes)};
  pqkv::detail::rq::reconstruct_paged(cfg, centroids, reader, indices, block_table,
                                      ::cuda::std::mdspan<Out, extents<4>, ::cuda::std::layout_stride>{pages},
                                      "rq_reconstruct_paged");
}

}  // namespace cpu
}  // namespace pqkv

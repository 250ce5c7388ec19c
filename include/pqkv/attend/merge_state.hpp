// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Merging partial attention states: attention over disjoint token sets
/// (e.g. the GPU-resident sink, window and cache hits, and the fetched misses)
/// run separately, each giving an output o [heads, dv] and the log-sum-exp
/// lse [heads] of its scaled logits (natural log, as `attend/dense.hpp` writes
/// it), combine into the attention over the union:
///   lse = log(exp(lse_a) + exp(lse_b)),
///   o   = (exp(lse_a) o_a + exp(lse_b) o_b) / exp(lse).
///
/// Contract (the GPU merge evaluates the same float operations in the same
/// order; only expf and logf may differ by their few-ulp error, so results
/// match to a few ulp): per head h, over the S states s = 0 .. S-1 in
/// ascending order (`merge_state` is S = 2 with a = state 0, b = state 1):
/// 1. A state with lse_s = -inf is empty (no token): its o_s row is never read,
///    so it may hold anything. All empty: o[h] = 0.f, lse[h] = -inf.
/// 2. `M = max over non-empty s of lse_s` (float).
/// 3. `w_s = expf(lse_s - M)` (float; one w_s is exactly 1).
/// 4. `Z = 0.f; for s: Z = Z + w_s` (float, non-empty s ascending).
/// 5. `acc = 0.f; for s: acc = fmaf(w_s, o_s[h][d], acc)` (non-empty s
///    ascending), then `o[h][d] = acc / Z` (float division).
/// 6. `lse[h] = M + logf(Z)` (float).
/// So a single non-empty state comes out bit for bit (w = 1, Z = 1), and
/// `merge_state(a, b)` equals `merge_states` of the two states bit for bit.
/// Accuracy: the result is as exact as the inputs allow; a float lse carries
/// an absolute rounding error of |lse| * 2^-24, which becomes a relative error
/// of that size in the weights.
///
/// Errors: every call validates all of its arguments before writing anything
/// and throws `pqkv::error` on a shape mismatch, a null view, an lse that is
/// NaN or +inf, or a non-finite o element of a non-empty state.

#include <pqkv/core/error.hpp>
#include <pqkv/core/views.hpp>

#include <cmath>
#include <cstddef>
#include <limits>
#include <span>
#include <vector>

namespace pqkv {
namespace detail {

/// Throws unless lse[i] is finite or -inf.
inline void check_lse(std::span<float const> lse, char const* name, char const* where)
{
  for (std::size_t i = 0; i < lse.size(); ++i) {
    float const x = lse[i];
    PQKV_EXPECTS(!std::isnan(x) && x != std::numeric_limits<float>::infinity(), where, name, "[", i, "]=", x,
                 " must be finite or -inf (an empty state)");
  }
}

/// Throws unless row h of o [heads, dv] is finite wherever lse[h] != -inf.
inline void check_state_rows(strided_view<float const, 2> o, std::span<float const> lse, char const* name,
                             char const* where)
{
  for (index_t h = 0; h < o.extent(0); ++h) {
    if (lse[static_cast<std::size_t>(h)] == -std::numeric_limits<float>::infinity()) { continue; }
    for (index_t d = 0; d < o.extent(1); ++d) {
      PQKV_EXPECTS(std::isfinite(o(h, d)), where, name, "(", h, ", ", d, ")=", o(h, d),
                   " is not finite in a non-empty state");
    }
  }
}

/// Throws unless o [heads, dv] has the given extents and data, and lse
/// holds `heads` entries.
inline void check_state_shape(strided_view<float const, 2> o, std::span<float const> lse, index_t heads, index_t dv,
                              char const* o_name, char const* lse_name, char const* where)
{
  PQKV_EXPECTS(o.extent(0) == heads && o.extent(1) == dv, where, o_name, " extents (", o.extent(0), ", ",
               o.extent(1), ") differ from (heads, dv)=(", heads, ", ", dv, ")");
  PQKV_EXPECTS(static_cast<index_t>(lse.size()) == heads, where, lse_name, ".size()=", lse.size(), ", heads=", heads);
  PQKV_EXPECTS(o.data_handle() != nullptr || heads * dv == 0, where, o_name, ".data_handle() is null");
  PQKV_EXPECTS(lse.data() != nullptr || heads == 0, where, lse_name, ".data() is null");
}

}  // namespace detail

namespace cpu {

/// Merges S partial states o [S, heads, dv] with lse [S, heads] into
/// out [heads, dv] and lse_out [heads] (the file's contract). out may not
/// alias the inputs. S = 0 gives empty states (out = 0, lse_out = -inf).
inline void merge_states(strided_view<float const, 3> o,  // [S, heads, dv]
                         view<float const, 2> lse,        // [S, heads]
                         strided_view<float, 2> out,      // [heads, dv]
                         std::span<float> lse_out)        // [heads]
{
  constexpr char const* where = "merge_states";
  index_t const states = o.extent(0), heads = o.extent(1), dv = o.extent(2);
  PQKV_EXPECTS(lse.extent(0) == states && lse.extent(1) == heads, where, "lse extents (", lse.extent(0), ", ",
               lse.extent(1), ") differ from o's (S, heads)=(", states, ", ", heads, ")");
  PQKV_EXPECTS(o.data_handle() != nullptr || element_count(o) == 0, where, "o.data_handle() is null");
  PQKV_EXPECTS(lse.data_handle() != nullptr || element_count(lse) == 0, where, "lse.data_handle() is null");
  PQKV_EXPECTS(out.extent(0) == heads && out.extent(1) == dv, where, "out extents (", out.extent(0), ", ",
               out.extent(1), ") differ from (heads, dv)=(", heads, ", ", dv, ")");
  PQKV_EXPECTS(out.data_handle() != nullptr || heads * dv == 0, where, "out.data_handle() is null");
  PQKV_EXPECTS(static_cast<index_t>(lse_out.size()) == heads, where, "lse_out.size()=", lse_out.size(),
               ", heads=", heads);
  PQKV_EXPECTS(lse_out.data() != nullptr || heads == 0, where, "lse_out.data() is null");
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  for (index_t s = 0; s < states; ++s) {
    for (index_t h = 0; h < heads; ++h) {
      float const x = lse(s, h);
      PQKV_EXPECTS(!std::isnan(x) && x != -neg_inf, where, "lse(", s, ", ", h, ")=", x,
                   " must be finite or -inf (an empty state)");
      if (x == neg_inf) { continue; }
      for (index_t d = 0; d < dv; ++d) {
        PQKV_EXPECTS(std::isfinite(o(s, h, d)), where, "o(", s, ", ", h, ", ", d, ")=", o(s, h, d),
                     " is not finite in a non-empty state");
      }
    }
  }

  std::vector<float> w(static_cast<std::size_t>(states));
  for (index_t h = 0; h < heads; ++h) {
    float mx = neg_inf;
    for (index_t s = 0; s < states; ++s) { mx = lse(s, h) > mx ? lse(s, h) : mx; }
    if (mx == neg_inf) {
      for (index_t d = 0; d < dv; ++d) { out(h, d) = 0.f; }
      lse_out[static_cast<std::size_t>(h)] = neg_inf;
      continue;
    }
    float z = 0.f;
    for (index_t s = 0; s < states; ++s) {
      w[static_cast<std::size_t>(s)] = lse(s, h) != neg_inf ? std::exp(lse(s, h) - mx) : 0.f;
      if (lse(s, h) != neg_inf) { z = z + w[static_cast<std::size_t>(s)]; }
    }
    for (index_t d = 0; d < dv; ++d) {
      float acc = 0.f;
      for (index_t s = 0; s < states; ++s) {
        if (lse(s, h) != neg_inf) { acc = std::fma(w[static_cast<std::size_t>(s)], o(s, h, d), acc); }
      }
      out(h, d) = acc / z;
    }
    lse_out[static_cast<std::size_t>(h)] = mx + std::log(z);
  }
}

/// Merges two partial states (o_a, lse_a) and (o_b, lse_b), each o [heads, dv]
/// and lse [heads], into out [heads, dv] and lse_out [heads]: the contract with
/// S = 2, a first. out and lse_out may alias a's or b's arrays exactly (the
/// same pointers and layout), not partially.
inline void merge_state(strided_view<float const, 2> o_a, std::span<float const> lse_a,  // [heads, dv], [heads]
                        strided_view<float const, 2> o_b, std::span<float const> lse_b,  // [heads, dv], [heads]
                        strided_view<float, 2> out, std::span<float> lse_out)          // [heads, dv], [heads]
{
  constexpr char const* where = "merge_state";
  index_t const heads = o_a.extent(0), dv = o_a.extent(1);
  pqkv::detail::check_state_shape(o_a, lse_a, heads, dv, "o_a", "lse_a", where);
  pqkv::detail::check_state_shape(o_b, lse_b, heads, dv, "o_b", "lse_b", where);
  pqkv::detail::check_state_shape(as_const(out), std::span<float const>{lse_out}, heads, dv, "out", "lse_out",
                                  where);
  pqkv::detail::check_lse(lse_a, "lse_a", where);
  pqkv::detail::check_lse(lse_b, "lse_b", where);
  pqkv::detail::check_state_rows(o_a, lse_a, "o_a", where);
  pqkv::detail::check_state_rows(o_b, lse_b, "o_b", where);

  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  for (index_t h = 0; h < heads; ++h) {
    auto const i = static_cast<std::size_t>(h);
    float const a = lse_a[i], b = lse_b[i];
    bool const has_a = a != neg_inf, has_b = b != neg_inf;
    if (!has_a && !has_b) {
      for (index_t d = 0; d < dv; ++d) { out(h, d) = 0.f; }
      lse_out[i] = neg_inf;
      continue;
    }
    float const mx = !has_b || (has_a && a >= b) ? a : b;
    float const wa = has_a ? std::exp(a - mx) : 0.f, wb = has_b ? std::exp(b - mx) : 0.f;
    float z = 0.f;
    if (has_a) { z = z + wa; }
    if (has_b) { z = z + wb; }
    // Each element is read before it is written, so exact aliasing is safe.
    for (index_t d = 0; d < dv; ++d) {
      float acc = 0.f;
      if (has_a) { acc = std::fma(wa, o_a(h, d), acc); }
      if (has_b) { acc = std::fma(wb, o_b(h, d), acc); }
      out(h, d) = acc / z;
    }
    lse_out[i] = mx + std::log(z);
  }
}

/// (o, lse) <- the merge of (o, lse) and (o_other, lse_other), each o
/// [heads, dv] and lse [heads]: `merge_state` with a = (o, lse), b = the other
/// state, written over a. Accumulating fetched parts one by one into the
/// resident part's state this way gives the left fold of pairwise merges,
/// which may differ from `merge_states` over all parts in the last bits.
inline void merge_state_in_place(strided_view<float, 2> o, std::span<float> lse,                   // [heads, dv], [heads]
                                 strided_view<float const, 2> o_other, std::span<float const> lse_other)  // [heads, dv], [heads]
{
  constexpr char const* where = "merge_state_in_place";
  index_t const heads = o.extent(0), dv = o.extent(1);
  pqkv::detail::check_state_shape(as_const(o), std::span<float const>{lse}, heads, dv, "o", "lse", where);
  pqkv::detail::check_state_shape(o_other, lse_other, heads, dv, "o_other", "lse_other", where);
  pqkv::detail::check_lse(std::span<float const>{lse}, "lse", where);
  pqkv::detail::check_lse(lse_other, "lse_other", where);
  pqkv::detail::check_state_rows(as_const(o), std::span<float const>{lse}, "o", where);
  pqkv::detail::check_state_rows(o_other, lse_other, "o_other", where);
  merge_state(as_const(o), std::span<float const>{lse}, o_other, lse_other, o, lse);
}

}  // namespace cpu
}  // namespace pqkv

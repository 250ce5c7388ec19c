// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Quality of a sparse selection against exact attention: recall of the
/// exact top-k, attention probability mass kept, and output error. All sums
/// are in double.

#include <pqkv/attend/dense.hpp>
#include <pqkv/core/dtype.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/parallel.hpp>
#include <pqkv/core/views.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

namespace pqkv::cpu {

/// A metric per head and its mean over the heads.
struct head_metric {
  std::vector<double> per_head;
  double mean = 0.0;
};

/// Per KV head g: |S_g ∩ E_g| / |E_g|, where S_g and E_g are the distinct
/// valid (>= 0) entries of selection row g and exact row g (-1 is padding);
/// 1 when E_g is empty. `mean` averages the rows. The rows may differ in length.
/// Throws `pqkv::error` if the row counts differ or an entry is below -1.
inline head_metric recall_at_k(selection_view<std::int32_t const> selection,  // [kv_heads, k]
                               selection_view<std::int32_t const> exact)      // [kv_heads, k_exact]
{
  constexpr char const* where = "recall_at_k";
  PQKV_EXPECTS(selection.extent(0) == exact.extent(0), where, "selection.extent(0)=", selection.extent(0),
               ", exact.extent(0)=", exact.extent(0));
  PQKV_EXPECTS(selection.data_handle() != nullptr || element_count(selection) == 0, where,
               "selection.data_handle() is null");
  PQKV_EXPECTS(exact.data_handle() != nullptr || element_count(exact) == 0, where, "exact.data_handle() is null");
  auto row = [&](selection_view<std::int32_t const> v, index_t g, char const* name) {
    std::vector<std::int32_t> r;
    for (index_t i = 0; i < v.extent(1); ++i) {
      PQKV_EXPECTS(v(g, i) >= -1, where, name, "(", g, ", ", i, ")=", v(g, i), " is below -1");
      if (v(g, i) >= 0) { r.push_back(v(g, i)); }
    }
    std::sort(r.begin(), r.end());
    r.erase(std::unique(r.begin(), r.end()), r.end());
    return r;
  };
  head_metric result;
  for (index_t g = 0; g < exact.extent(0); ++g) {
    auto const s = row(selection, g, "selection");
    auto const e = row(exact, g, "exact");
    std::vector<std::int32_t> both;
    std::set_intersection(s.begin(), s.end(), e.begin(), e.end(), std::back_inserter(both));
    result.per_head.push_back(e.empty() ? 1.0 : static_cast<double>(both.size()) / static_cast<double>(e.size()));
  }
  if (!result.per_head.empty()) {
    result.mean = std::accumulate(result.per_head.begin(), result.per_head.end(), 0.0) /
                  static_cast<double>(result.per_head.size());
  }
  return result;
}

/// Per q head: the fraction of its exact softmax attention probability over
/// all n = keys.extent(1) tokens that falls on the tokens its KV head attends
/// (sink [0, sink), window [n - window, n), and the valid selection entries,
/// each counted once). Logits and probabilities follow `attend/dense.hpp`'s
/// contract; 1 when n = 0. `mean` averages the q heads. Throws as
/// `attention_sparse` does for q, keys, selection, sink, window and scale.
template <class K, class LK, class AK>
  requires KvElement<std::remove_const_t<K>>
head_metric attention_mass_kept(query_view<float const> q,                        // [q_heads, dim]
                                ::cuda::std::mdspan<K, extents<3>, LK, AK> keys,  // [kv_heads, n, dim]
                                selection_view<std::int32_t const> selection,     // [kv_heads, k], -1 padded
                                index_t sink, index_t window, float scale = 0.f)
{
  constexpr char const* where = "attention_mass_kept";
  kv_view<std::remove_const_t<K> const> const k{keys};
  index_t const kv_heads = k.extent(0), n = k.extent(1), q_heads = q.extent(0);
  pqkv::detail::check_queries_keys(q, k, where);
  float const s = pqkv::detail::attention_scale(scale, k.extent(2), where);
  PQKV_EXPECTS(selection.extent(0) == kv_heads, where, "selection.extent(0)=", selection.extent(0),
               ", kv_heads=", kv_heads);
  auto const lists = pqkv::detail::attended_tokens(selection, n, sink, window, where);
  pqkv::detail::check_rows_finite(k, pqkv::detail::all_tokens(kv_heads, n), "keys", where);  // all are read

  std::vector<index_t> all(static_cast<std::size_t>(n));
  std::iota(all.begin(), all.end(), index_t{0});
  head_metric result;
  result.per_head.assign(static_cast<std::size_t>(q_heads), 1.0);
  index_t const r = q_heads / kv_heads;
  parallel_for(q_heads, [&](index_t h) {
    if (n == 0) { return; }
    std::vector<float> logit;
    pqkv::detail::attention_logits(q, k, h, h / r, s, std::span<index_t const>{all}, logit);
    float mx = -std::numeric_limits<float>::infinity();
    for (float x : logit) { mx = x > mx ? x : mx; }
    double z = 0.0, kept = 0.0;
    auto const& list = lists[static_cast<std::size_t>(h / r)];
    std::size_t next = 0;
    for (index_t t = 0; t < n; ++t) {
      double const w = std::exp(static_cast<double>(logit[static_cast<std::size_t>(t)]) - static_cast<double>(mx));
      z += w;
      if (next < list.size() && list[next] == t) {
        kept += w;
        ++next;
      }
    }
    result.per_head[static_cast<std::size_t>(h)] = kept / z;
  });
  result.mean = std::accumulate(result.per_head.begin(), result.per_head.end(), 0.0) /
                static_cast<double>(std::max<index_t>(q_heads, 1));
  return result;
}

/// Relative output error of an approximate attention output.
struct output_error {
  std::vector<double> per_head;  ///< ||out[h] - dense[h]|| / ||dense[h]|| (L2 over the row)
  double mean = 0.0;             ///< mean of per_head over the q heads
  double overall = 0.0;          ///< ||out - dense||_F / ||dense||_F over all heads at once
};

/// Compares out with dense_out, both [q_heads, dv]. A zero reference norm
/// gives 0 when the difference is 0 too, +inf otherwise. Throws
/// `pqkv::error` on a shape mismatch, a null view or a non-finite element.
inline output_error relative_output_error(view<float const, 2> out,        // [q_heads, dv]
                                          view<float const, 2> dense_out)  // [q_heads, dv]
{
  constexpr char const* where = "relative_output_error";
  PQKV_EXPECTS(out.extent(0) == dense_out.extent(0) && out.extent(1) == dense_out.extent(1), where,
               "out extents (", out.extent(0), ", ", out.extent(1), ") differ from dense_out's (",
               dense_out.extent(0), ", ", dense_out.extent(1), ")");
  PQKV_EXPECTS(out.data_handle() != nullptr || element_count(out) == 0, where, "out.data_handle() is null");
  PQKV_EXPECTS(dense_out.data_handle() != nullptr || element_count(dense_out) == 0, where,
               "dense_out.data_handle() is null");
  auto ratio = [](double diff2, double ref2) {
    if (ref2 == 0.0) { return diff2 == 0.0 ? 0.0 : std::numeric_limits<double>::infinity(); }
    return std::sqrt(diff2 / ref2);
  };
  output_error result;
  double diff_all = 0.0, ref_all = 0.0;
  for (index_t h = 0; h < out.extent(0); ++h) {
    double diff2 = 0.0, ref2 = 0.0;
    for (index_t d = 0; d < out.extent(1); ++d) {
      PQKV_EXPECTS(std::isfinite(out(h, d)), where, "out(", h, ", ", d, ")=", out(h, d), " is not finite");
      PQKV_EXPECTS(std::isfinite(dense_out(h, d)), where, "dense_out(", h, ", ", d, ")=", dense_out(h, d),
                   " is not finite");
      double const e = static_cast<double>(out(h, d)) - static_cast<double>(dense_out(h, d));
      diff2 += e * e;
      ref2 += static_cast<double>(dense_out(h, d)) * static_cast<double>(dense_out(h, d));
    }
    result.per_head.push_back(ratio(diff2, ref2));
    diff_all += diff2;
    ref_all += ref2;
  }
  if (!result.per_head.empty()) {
    result.mean = std::accumulate(result.per_head.begin(), result.per_head.end(), 0.0) /
                  static_cast<double>(result.per_head.size());
  }
  result.overall = ratio(diff_all, ref_all);
  return result;
}

}  // namespace pqkv::cpu

// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Exact reference attention for one decode step: over all tokens
/// (`attention_dense`) or over a sparse set per KV head (`attention_sparse`:
/// a selection plus the always-attended sink and window tokens).
///
/// Contract, per q head h (KV head g = h / (q_heads / kv_heads)) and its
/// attended tokens T in ascending order:
/// - `dot = 0.f; for d: dot = fmaf(q[h][d], float(key[t][d]), dot);`
///   `s_t = scale * dot` (float; scale 0 means float(1 / sqrt(double(dim))));
/// - `M = max s_t` (float); `w_t = exp(double(s_t) - M)` (double);
///   `Z = sum w_t`, `acc = sum w_t * double(value[t])` in double, ascending t;
/// - `out[h] = float(acc / Z)`, `lse[h] = float(M + log(Z))`.
/// With no attended token (n = 0), out[h] = 0 and lse[h] = -inf: a state that
/// contributes nothing when partial attention states are merged by lse.
/// This is an accuracy reference (double accumulation), not a bit contract
/// for GPU kernels; compare those with a tolerance.

#include <pqkv/core/dtype.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/parallel.hpp>
#include <pqkv/core/views.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <type_traits>
#include <vector>

namespace pqkv {
namespace detail {

/// The logit scale for head dimension `dim` (0 means 1 / sqrt(dim)).
inline float attention_scale(float scale, index_t dim, char const* where)
{
  PQKV_EXPECTS(std::isfinite(scale) && scale >= 0.f, where, "scale=", scale,
               " must be finite and >= 0 (0: 1/sqrt(dim))");
  return scale != 0.f ? scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(dim)));
}

/// Checks shapes and nulls of q [q_heads, dim] and keys [kv_heads, n, dim], and
/// that q is finite (`check_rows_finite` checks the key rows read).
template <class Key>
void check_queries_keys(query_view<float const> q, kv_view<Key const> keys, char const* where)
{
  index_t const kv_heads = keys.extent(0), n = keys.extent(1), dim = keys.extent(2);
  PQKV_EXPECTS(kv_heads > 0, where, "keys.extent(0)=", kv_heads, " must be positive");
  PQKV_EXPECTS(dim > 0, where, "keys.extent(2)=", dim, " must be positive");
  PQKV_EXPECTS(q.extent(0) > 0 && q.extent(0) % kv_heads == 0, where, "q.extent(0)=", q.extent(0),
               " is not a positive multiple of kv_heads=", kv_heads);
  PQKV_EXPECTS(q.extent(1) == dim, where, "q.extent(1)=", q.extent(1), ", keys.extent(2)=", dim);
  PQKV_EXPECTS(q.data_handle() != nullptr, where, "q.data_handle() is null");
  PQKV_EXPECTS(keys.data_handle() != nullptr || n == 0, where, "keys.data_handle() is null");
  for (index_t h = 0; h < q.extent(0); ++h) {
    for (index_t d = 0; d < dim; ++d) {
      PQKV_EXPECTS(std::isfinite(q(h, d)), where, "q(", h, ", ", d, ")=", q(h, d), " is not finite");
    }
  }
}

/// Throws unless rows tokens[g] of every head g of x [heads, n, d] are finite;
/// `name` is how the message calls x. Only the rows an attention reads are
/// checked, so a sparse call costs what it reads, not O(n).
template <class T>
void check_rows_finite(kv_view<T const> x, std::vector<std::vector<index_t>> const& tokens, char const* name,
                       char const* where)
{
  cpu::parallel_for(x.extent(0), [&](index_t g) {
    for (index_t t : tokens[static_cast<std::size_t>(g)]) {
      for (index_t d = 0; d < x.extent(2); ++d) {
        float const v = to_float(x(g, t, d));
        PQKV_EXPECTS(std::isfinite(v), where, name, "(", g, ", ", t, ", ", d, ")=", v, " is not finite");
      }
    }
  });
}

/// Every token of every head: the lists a dense call reads.
inline std::vector<std::vector<index_t>> all_tokens(index_t heads, index_t n)
{
  std::vector<index_t> all(static_cast<std::size_t>(n));
  for (index_t t = 0; t < n; ++t) { all[static_cast<std::size_t>(t)] = t; }
  return std::vector<std::vector<index_t>>(static_cast<std::size_t>(heads), all);
}

/// Checks values [kv_heads, n, dv] against keys, out [q_heads, dv] and lse
/// ([q_heads] or empty).
template <class Key, class Value>
void check_values_out(index_t q_heads, kv_view<Key const> keys, kv_view<Value const> values, view<float, 2> out,
                      std::span<float> lse, char const* where)
{
  index_t const kv_heads = keys.extent(0), n = keys.extent(1), dv = values.extent(2);
  PQKV_EXPECTS(values.extent(0) == kv_heads && values.extent(1) == n, where, "values extents (", values.extent(0),
               ", ", values.extent(1), ") differ from keys' (", kv_heads, ", ", n, ")");
  PQKV_EXPECTS(dv > 0, where, "values.extent(2)=", dv, " must be positive");
  PQKV_EXPECTS(out.extent(0) == q_heads && out.extent(1) == dv, where, "out extents (", out.extent(0), ", ",
               out.extent(1), ") differ from (q_heads, values.extent(2))=(", q_heads, ", ", dv, ")");
  PQKV_EXPECTS(lse.empty() || static_cast<index_t>(lse.size()) == q_heads, where, "lse.size()=", lse.size(),
               ", q_heads=", q_heads);
  PQKV_EXPECTS(out.data_handle() != nullptr, where, "out.data_handle() is null");
  PQKV_EXPECTS(values.data_handle() != nullptr || n == 0, where, "values.data_handle() is null");
}

/// The exact logits s_t of q head h over `tokens` of KV head g (contract).
template <class Key>
void attention_logits(query_view<float const> q, kv_view<Key const> keys, index_t h, index_t g, float scale,
                      std::span<index_t const> tokens, std::vector<float>& s)
{
  index_t const dim = keys.extent(2);
  s.resize(tokens.size());
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    float dot = 0.f;
    for (index_t d = 0; d < dim; ++d) { dot = std::fma(q(h, d), to_float(keys(g, tokens[i], d)), dot); }
    s[i] = scale * dot;
  }
}

/// Attention of every q head over its KV head's ascending token list
/// `tokens[g]` (contract).
template <class Key, class Value>
void attend_lists(query_view<float const> q, kv_view<Key const> keys, kv_view<Value const> values,
                  std::vector<std::vector<index_t>> const& tokens, view<float, 2> out, float scale,
                  std::span<float> lse)
{
  index_t const q_heads = q.extent(0), r = q_heads / keys.extent(0), dv = values.extent(2);
  cpu::parallel_for(q_heads, [&](index_t h) {
    index_t const g = h / r;
    auto const& list = tokens[static_cast<std::size_t>(g)];
    std::vector<float> s;
    attention_logits(q, keys, h, g, scale, std::span<index_t const>{list}, s);
    float mx = -std::numeric_limits<float>::infinity();
    for (float x : s) { mx = x > mx ? x : mx; }
    std::vector<double> acc(static_cast<std::size_t>(dv), 0.0);
    double z = 0.0;
    for (std::size_t i = 0; i < list.size(); ++i) {
      double const w = std::exp(static_cast<double>(s[i]) - static_cast<double>(mx));
      z += w;
      for (index_t d = 0; d < dv; ++d) {
        acc[static_cast<std::size_t>(d)] += w * static_cast<double>(to_float(values(g, list[i], d)));
      }
    }
    for (index_t d = 0; d < dv; ++d) {
      out(h, d) = list.empty() ? 0.f : static_cast<float>(acc[static_cast<std::size_t>(d)] / z);
    }
    if (!lse.empty()) {
      lse[static_cast<std::size_t>(h)] = list.empty() ? -std::numeric_limits<float>::infinity()
                                                      : static_cast<float>(static_cast<double>(mx) + std::log(z));
    }
  });
}

/// Per KV head, the ascending distinct attended tokens of a sequence of n:
/// [0, sink), [n - window, n) and the valid selection entries. Throws unless
/// every entry is -1 or in [0, n).
inline std::vector<std::vector<index_t>> attended_tokens(selection_view<std::int32_t const> selection, index_t n,
                                                         index_t sink, index_t window, char const* where)
{
  index_t const kv_heads = selection.extent(0);
  PQKV_EXPECTS(sink >= 0, where, "sink=", sink, " must be >= 0");
  PQKV_EXPECTS(window >= 0, where, "window=", window, " must be >= 0");
  PQKV_EXPECTS(selection.data_handle() != nullptr || element_count(selection) == 0, where,
               "selection.data_handle() is null");
  std::vector<std::vector<index_t>> lists(static_cast<std::size_t>(kv_heads));
  std::vector<char> mark(static_cast<std::size_t>(n));
  for (index_t g = 0; g < kv_heads; ++g) {
    std::fill(mark.begin(), mark.end(), char{0});
    for (index_t t = 0; t < std::min(sink, n); ++t) { mark[static_cast<std::size_t>(t)] = 1; }
    for (index_t t = std::max<index_t>(n - window, 0); t < n; ++t) { mark[static_cast<std::size_t>(t)] = 1; }
    for (index_t i = 0; i < selection.extent(1); ++i) {
      index_t const t = selection(g, i);
      if (t == -1) { continue; }
      PQKV_EXPECTS(t >= 0 && t < n, where, "selection(", g, ", ", i, ")=", t, " is neither -1 nor in [0, n=", n,
                   ")");
      mark[static_cast<std::size_t>(t)] = 1;
    }
    auto& list = lists[static_cast<std::size_t>(g)];
    for (index_t t = 0; t < n; ++t) {
      if (mark[static_cast<std::size_t>(t)] != 0) { list.push_back(t); }
    }
  }
  return lists;
}

}  // namespace detail

namespace cpu {

/// Attention of queries [q_heads, dim] over all n = keys.extent(1) tokens:
/// out [q_heads, dv] (the file's contract). Keys and values: float, half or
/// bf16, any strides. lse, when not empty, gets [q_heads] log-sum-exp of the
/// scaled logits. Throws `pqkv::error` on a shape mismatch, a null view, a
/// negative or non-finite scale, or a non-finite q, key or value.
template <class K, class LK, class AK, class V, class LV, class AV>
  requires(KvElement<std::remove_const_t<K>> && KvElement<std::remove_const_t<V>>)
void attention_dense(query_view<float const> q,                              // [q_heads, dim]
                     ::cuda::std::mdspan<K, extents<3>, LK, AK> keys,        // [kv_heads, n, dim]
                     ::cuda::std::mdspan<V, extents<3>, LV, AV> values,      // [kv_heads, n, dv]
                     view<float, 2> out,                                     // [q_heads, dv]
                     float scale = 0.f, std::span<float> lse = {})           // lse: [q_heads] or empty
{
  constexpr char const* where = "attention_dense";
  kv_view<std::remove_const_t<K> const> const k{keys};
  kv_view<std::remove_const_t<V> const> const v{values};
  pqkv::detail::check_queries_keys(q, k, where);
  pqkv::detail::check_values_out(q.extent(0), k, v, out, lse, where);
  float const s = pqkv::detail::attention_scale(scale, k.extent(2), where);
  auto const lists = pqkv::detail::all_tokens(k.extent(0), k.extent(1));
  pqkv::detail::check_rows_finite(k, lists, "keys", where);
  pqkv::detail::check_rows_finite(v, lists, "values", where);
  pqkv::detail::attend_lists(q, k, v, lists, out, s, lse);
}

/// Attention over, per KV head g, the union of the sink tokens [0, sink), the
/// window [n - window, n) and the valid entries of selection row g (-1 entries
/// skipped, duplicates counted once), in ascending token order; n =
/// keys.extent(1). With every token attended this equals `attention_dense`
/// bit for bit. Throws as `attention_dense`, and unless selection is
/// [kv_heads, k] with entries -1 or in [0, n), and sink, window >= 0.
template <class K, class LK, class AK, class V, class LV, class AV>
  requires(KvElement<std::remove_const_t<K>> && KvElement<std::remove_const_t<V>>)
void attention_sparse(query_view<float const> q,                             // [q_heads, dim]
                      ::cuda::std::mdspan<K, extents<3>, LK, AK> keys,       // [kv_heads, n, dim]
                      ::cuda::std::mdspan<V, extents<3>, LV, AV> values,     // [kv_heads, n, dv]
                      selection_view<std::int32_t const> selection,          // [kv_heads, k], -1 padded
                      index_t sink, index_t window,
                      view<float, 2> out,                                    // [q_heads, dv]
                      float scale = 0.f, std::span<float> lse = {})          // lse: [q_heads] or empty
{
  constexpr char const* where = "attention_sparse";
  kv_view<std::remove_const_t<K> const> const k{keys};
  kv_view<std::remove_const_t<V> const> const v{values};
  pqkv::detail::check_queries_keys(q, k, where);
  pqkv::detail::check_values_out(q.extent(0), k, v, out, lse, where);
  float const s = pqkv::detail::attention_scale(scale, k.extent(2), where);
  PQKV_EXPECTS(selection.extent(0) == k.extent(0), where, "selection.extent(0)=", selection.extent(0),
               ", kv_heads=", k.extent(0));
  auto const lists = pqkv::detail::attended_tokens(selection, k.extent(1), sink, window, where);
  pqkv::detail::check_rows_finite(k, lists, "keys", where);
  pqkv::detail::check_rows_finite(v, lists, "values", where);
  pqkv::detail::attend_lists(q, k, v, lists, out, s, lse);
}

}  // namespace cpu
}  // namespace pqkv

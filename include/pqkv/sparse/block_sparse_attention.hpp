// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Correctness-first causal prefill attention over the key blocks a bit
/// mask keeps (sparse/sale_mask.hpp), the reference a block-sparse kernel fed
/// pqkv's masks is compared with.
///
/// Contract, per packed row i of sequence s (position p = i - cu[s], q block
/// qb = p / Bq) and q head h (KV head g = h / (q_heads / kv_heads)): the
/// attended keys are the positions j <= p whose key block j / Bk has its bit
/// set in row (s, h, qb), ascending; over them the arithmetic of
/// attend/dense.hpp: `s_j = scale * fma-chain(q_i, k_j)` (float), `M = max s_j`,
/// `w_j = exp(double(s_j) - M)`, `Z = sum w_j`, `acc = sum w_j double(v_j)`
/// (double, ascending j), `out = float(acc / Z)`; a row with no attended key
/// gets 0. With every causal block set this is exact causal attention.

#include <pqkv/attend/dense.hpp>
#include <pqkv/core/dtype.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/parallel.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/sparse/sale_mask.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <type_traits>
#include <vector>

namespace pqkv {
namespace detail {

/// Rows [r0, r1) of sequence s of q head h (the file's contract), into out.
template <class Qe, class Ke, class Ve>
void block_sparse_rows(kv_view<Qe const> q, kv_view<Ke const> k, kv_view<Ve const> v,
                       std::span<std::int32_t const> cu, sparse_config const& cfg,
                       view<std::uint32_t const, 4> bitmask, index_t s, index_t h, index_t r0, index_t r1, float scale,
                       view<float, 3> out)
{
  index_t const dim = q.extent(2), dv = v.extent(2), g = h / (q.extent(0) / k.extent(0));
  index_t const t0 = cu[static_cast<std::size_t>(s)];
  std::vector<float> logits;
  std::vector<index_t> keys;
  std::vector<double> acc(static_cast<std::size_t>(dv));
  for (index_t p = r0; p < r1; ++p) {
    index_t const qb = p / cfg.block_q;
    logits.clear();
    keys.clear();
    float mx = -std::numeric_limits<float>::infinity();
    for (index_t j = 0; j <= p; ++j) {
      index_t const kb = j / cfg.block_k;
      if (((bitmask(s, h, qb, kb / 32) >> (kb % 32)) & 1u) == 0) {
        j = (kb + 1) * cfg.block_k - 1;  // skip the rest of the block
        continue;
      }
      float dot = 0.f;
      for (index_t c = 0; c < dim; ++c) { dot = std::fma(to_float(q(h, t0 + p, c)), to_float(k(g, t0 + j, c)), dot); }
      float const x = scale * dot;
      logits.push_back(x);
      keys.push_back(j);
      mx = x > mx ? x : mx;
    }
    std::fill(acc.begin(), acc.end(), 0.0);
    double z = 0.0;
    for (std::size_t a = 0; a < keys.size(); ++a) {
      double const w = std::exp(static_cast<double>(logits[a]) - static_cast<double>(mx));
      z += w;
      for (index_t d = 0; d < dv; ++d) {
        acc[static_cast<std::size_t>(d)] += w * static_cast<double>(to_float(v(g, t0 + keys[a], d)));
      }
    }
    for (index_t d = 0; d < dv; ++d) {
      out(h, t0 + p, d) = keys.empty() ? 0.f : static_cast<float>(acc[static_cast<std::size_t>(d)] / z);
    }
  }
}

/// Checks every argument of a block-sparse attention call; returns the scale.
template <class Qe, class Ke, class Ve>
float check_block_sparse(kv_view<Qe const> q, kv_view<Ke const> k, kv_view<Ve const> v,
                         std::span<std::int32_t const> cu, sparse_config const& cfg,
                         view<std::uint32_t const, 4> bitmask, view<float, 3> out, char const* where)
{
  cfg.validate(where);
  check_prefill_qk(q, k, cu, where);
  PQKV_EXPECTS(v.extent(0) == k.extent(0) && v.extent(1) == k.extent(1), where, "v extents (", v.extent(0), ", ",
               v.extent(1), ") differ from k's (", k.extent(0), ", ", k.extent(1), ")");
  PQKV_EXPECTS(v.extent(2) > 0, where, "v.extent(2)=", v.extent(2), " must be positive");
  check_finite_values(v, "v", where);
  mask_shape const m = make_mask_shape(cu, q.extent(0), k.extent(0), cfg);
  check_bitmask(bitmask, m, where);
  PQKV_EXPECTS(out.extent(0) == q.extent(0) && out.extent(1) == q.extent(1) && out.extent(2) == v.extent(2), where,
               "out extents (", out.extent(0), ", ", out.extent(1), ", ", out.extent(2),
               ") differ from (q_heads, tokens, v.extent(2))=(", q.extent(0), ", ", q.extent(1), ", ", v.extent(2),
               ")");
  PQKV_EXPECTS(out.data_handle() != nullptr || element_count(out) == 0, where, "out.data_handle() is null");
  return attention_scale(cfg.scale, q.extent(2), where);
}

}  // namespace detail

namespace cpu {

/// Block-sparse causal attention of the packed batch (the file's contract):
/// out [q_heads, tokens, dv]. Throws `pqkv::error` on a bad config, head_dim
/// not 64, 128 or 256, q/k dtype mismatch, q heads not a multiple of KV heads,
/// bad cu_seqlens, a bitmask or out whose extents differ from the shape
/// (`make_mask_shape`), or a non-finite q, k or v.
template <class Q, class LQ, class AQ, class K, class LK, class AK, class V, class LV, class AV>
  requires(KvElement<std::remove_const_t<Q>> && KvElement<std::remove_const_t<K>> &&
           KvElement<std::remove_const_t<V>>)
void block_sparse_attention(::cuda::std::mdspan<Q, extents<3>, LQ, AQ> q_in,  // [q_heads, tokens, dim]
                            ::cuda::std::mdspan<K, extents<3>, LK, AK> k_in,  // [kv_heads, tokens, dim]
                            ::cuda::std::mdspan<V, extents<3>, LV, AV> v_in,  // [kv_heads, tokens, dv]
                            std::span<std::int32_t const> cu_seqlens,          // [batch + 1]
                            sparse_config const& cfg,
                            view<std::uint32_t const, 4> bitmask,  // [batch, q_heads, q_blocks, words]
                            view<float, 3> out)                    // [q_heads, tokens, dv]
{
  constexpr char const* where = "block_sparse_attention";
  kv_view<std::remove_const_t<Q> const> const q{q_in};
  kv_view<std::remove_const_t<K> const> const k{k_in};
  kv_view<std::remove_const_t<V> const> const v{v_in};
  float const scale = pqkv::detail::check_block_sparse(q, k, v, cu_seqlens, cfg, bitmask, out, where);
  auto const batch = static_cast<index_t>(cu_seqlens.size()) - 1;
  constexpr index_t chunk = 64;
  // Jobs are (head, sequence, 64-row chunk); rows are independent, so the
  // split does not change a bit of the result.
  std::vector<std::array<index_t, 4>> jobs;
  for (index_t h = 0; h < q.extent(0); ++h) {
    for (index_t s = 0; s < batch; ++s) {
      index_t const n = cu_seqlens[static_cast<std::size_t>(s) + 1] - cu_seqlens[static_cast<std::size_t>(s)];
      for (index_t r = 0; r < n; r += chunk) { jobs.push_back({h, s, r, std::min(r + chunk, n)}); }
    }
  }
  cpu::parallel_for(static_cast<index_t>(jobs.size()), [&](index_t i) {
    auto const& j = jobs[static_cast<std::size_t>(i)];
    pqkv::detail::block_sparse_rows(q, k, v, cu_seqlens, cfg, bitmask, j[1], j[0], j[2], j[3], scale, out);
  });
}

/// Mean over the rows (tokens) of sum_d |a - b| of each head, into
/// per_head [heads] (double sums); a, b [heads, tokens, dv]. 0 with no rows.
inline void mean_row_l1(view<float const, 3> a, view<float const, 3> b, std::span<double> per_head)
{
  constexpr char const* where = "mean_row_l1";
  PQKV_EXPECTS(a.extent(0) == b.extent(0) && a.extent(1) == b.extent(1) && a.extent(2) == b.extent(2), where,
               "a extents (", a.extent(0), ", ", a.extent(1), ", ", a.extent(2), ") differ from b's (", b.extent(0),
               ", ", b.extent(1), ", ", b.extent(2), ")");
  PQKV_EXPECTS(static_cast<index_t>(per_head.size()) >= a.extent(0), where, "per_head.size()=", per_head.size(),
               " is smaller than heads=", a.extent(0));
  for (index_t h = 0; h < a.extent(0); ++h) {
    double sum = 0.0;
    for (index_t t = 0; t < a.extent(1); ++t) {
      for (index_t d = 0; d < a.extent(2); ++d) {
        sum += std::fabs(static_cast<double>(a(h, t, d)) - static_cast<double>(b(h, t, d)));
      }
    }
    per_head[static_cast<std::size_t>(h)] = a.extent(1) > 0 ? sum / static_cast<double>(a.extent(1)) : 0.0;
  }
}

}  // namespace cpu
}  // namespace pqkv

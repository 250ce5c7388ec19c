// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::cpu::exact_topk` and `pqkv::cpu::exact_scorer`: the same
/// selection as `adc_topk` (GQA mapping, candidates, softmax, aggregation,
/// top-k order and padding: steps 1 and 4-7 of `score/adc_topk.hpp`) but with
/// exact logits from the full keys. The ceiling a PQ selection is judged by.
///
/// Logit contract: `dot = 0.f; for d = 0 .. dim-1: dot = fmaf(q[h][d], float(key[t][d]), dot);`
/// `logit[h][t] = scale * dot` (float, the key element converted to float
/// exactly; scale defaults to float(1 / sqrt(double(dim)))).

#include <pqkv/core/concepts.hpp>
#include <pqkv/core/dtype.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/parallel.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/score/adc_topk.hpp>
#include <pqkv/score/gqa.hpp>

#include <cmath>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

namespace pqkv {
namespace detail {

/// Throws unless keys(g, t, :) is finite for every KV head g and t in [first, last).
template <class Key>
void check_key_rows_finite(kv_view<Key const> keys, index_t first, index_t last, char const* where)
{
  cpu::parallel_for(keys.extent(0), [&](index_t g) {
    for (index_t t = first; t < last; ++t) {
      for (index_t d = 0; d < keys.extent(2); ++d) {
        float const x = to_float(keys(g, t, d));
        PQKV_EXPECTS(std::isfinite(x), where, "keys(", g, ", ", t, ", ", d, ")=", x, " is not finite");
      }
    }
  });
}

/// The exact logits of q heads g*r .. g*r + r-1 over tokens [first, first + n):
/// logits[hl * n + i], as the file's contract says. Eight tokens at a time,
/// transposed, so each of the eight independent fma chains is a vector lane.
template <class Key>
void exact_logits(query_view<float const> q, kv_view<Key const> keys, index_t g, index_t r, float scale,
                  index_t first, index_t n, float* logits)
{
  constexpr index_t tile = 8;
  index_t const dim = keys.extent(2);
  std::vector<float> kt(static_cast<std::size_t>(dim * tile));  // [dim][tile]
  std::vector<float> qh(static_cast<std::size_t>(dim));
  for (index_t i0 = 0; i0 < n; i0 += tile) {
    index_t const cnt = std::min(tile, n - i0);
    for (index_t tt = 0; tt < tile; ++tt) {
      for (index_t d = 0; d < dim; ++d) {
        kt[static_cast<std::size_t>(d * tile + tt)] = tt < cnt ? to_float(keys(g, first + i0 + tt, d)) : 0.f;
      }
    }
    for (index_t hl = 0; hl < r; ++hl) {
      for (index_t d = 0; d < dim; ++d) { qh[static_cast<std::size_t>(d)] = q(g * r + hl, d); }
      float acc[tile] = {};
      for (index_t d = 0; d < dim; ++d) {
        float const qd = qh[static_cast<std::size_t>(d)];
        float const* kd = kt.data() + d * tile;
        for (index_t tt = 0; tt < tile; ++tt) { acc[tt] = std::fma(qd, kd[tt], acc[tt]); }
      }
      for (index_t tt = 0; tt < cnt; ++tt) { logits[hl * n + i0 + tt] = scale * acc[tt]; }
    }
  }
}

}  // namespace detail

namespace cpu {

/// CPU reference of exact scoring + GQA aggregation + top-k. Thread-safe.
template <GqaAggregation Aggregation = gqa::softmax_sum>
class exact_topk {
 public:
  /// Validates the head counts, dim and params; throws `pqkv::error`.
  exact_topk(index_t q_heads, index_t kv_heads, index_t dim, selection_params const& params, Aggregation agg = {})
    : q_heads_{q_heads}, kv_heads_{kv_heads}, dim_{dim}, params_{params}, agg_{agg}
  {
    constexpr char const* where = "exact_topk";
    PQKV_EXPECTS(kv_heads > 0, where, "kv_heads=", kv_heads, " must be positive");
    PQKV_EXPECTS(q_heads > 0 && q_heads % kv_heads == 0, where, "q_heads=", q_heads,
                 " is not a positive multiple of kv_heads=", kv_heads);
    PQKV_EXPECTS(dim > 0, where, "dim=", dim, " must be positive");
    params_.validate(where);
    scale_ = params_.resolved_scale(dim);
  }

  [[nodiscard]] index_t q_heads() const noexcept { return q_heads_; }
  [[nodiscard]] index_t kv_heads() const noexcept { return kv_heads_; }
  [[nodiscard]] index_t dim() const noexcept { return dim_; }
  [[nodiscard]] selection_params const& params() const noexcept { return params_; }
  [[nodiscard]] float scale() const noexcept { return scale_; }

  /// Selects up to k tokens per KV head among the first `n_tokens` of `keys`
  /// [kv_heads, >= n_tokens, dim] (float, half or bf16; any strides). Outputs
  /// and errors as `adc_topk::operator()`; keys read must be finite.
  template <class Key, class Layout, class Accessor>
    requires KvElement<std::remove_const_t<Key>>
  void operator()(query_view<float const> q,                                    // [q_heads, dim]
                  ::cuda::std::mdspan<Key, extents<3>, Layout, Accessor> keys,  // [kv_heads, >= n_tokens, dim]
                  index_t n_tokens,
                  selection_view<std::int32_t> out,                             // [kv_heads, >= k]
                  std::span<std::int32_t> valid_counts,                         // [kv_heads]
                  view<float, 2> scores = {}) const                             // [kv_heads, >= n_tokens]
  {
    run(q, kv_view<std::remove_const_t<Key> const>{keys}, n_tokens, out, valid_counts, scores);
  }

 private:
  template <class Key>
  void run(query_view<float const> q, kv_view<Key const> keys, index_t n_tokens, selection_view<std::int32_t> out,
           std::span<std::int32_t> valid_counts, view<float, 2> scores) const
  {
    constexpr char const* where = "exact_topk";
    PQKV_EXPECTS(keys.extent(0) == kv_heads_, where, "keys.extent(0)=", keys.extent(0), ", kv_heads=", kv_heads_);
    PQKV_EXPECTS(keys.extent(2) == dim_, where, "keys.extent(2)=", keys.extent(2), ", dim=", dim_);
    PQKV_EXPECTS(n_tokens >= 0, where, "n_tokens=", n_tokens, " must be >= 0");
    PQKV_EXPECTS(n_tokens <= keys.extent(1), where, "n_tokens=", n_tokens, " exceeds keys.extent(1)=",
                 keys.extent(1));
    PQKV_EXPECTS(n_tokens <= pqkv::detail::max_tokens, where, "n_tokens=", n_tokens, " exceeds the int32 token range");
    PQKV_EXPECTS(keys.data_handle() != nullptr || element_count(keys) == 0, where, "keys.data_handle() is null");
    pqkv::detail::check_queries(q, q_heads_, dim_, where);
    pqkv::detail::check_selection_outputs(out, valid_counts, scores, kv_heads_, params_.k, n_tokens, where);
    token_range const cand = candidate_range(n_tokens, params_.sink, params_.window);
    pqkv::detail::check_key_rows_finite(keys, cand.first, cand.last, where);

    index_t const r = q_heads_ / kv_heads_, nc = cand.size();
    parallel_for(kv_heads_, [&](index_t g) {
      std::vector<float> logits(static_cast<std::size_t>(r * nc));
      std::vector<std::uint64_t> keys_scratch;
      pqkv::detail::exact_logits(q, keys, g, r, scale_, cand.first, nc, logits.data());
      float* score_row = scores.data_handle() != nullptr ? scores.data_handle() + g * scores.extent(1) + cand.first
                                                         : nullptr;
      valid_counts[static_cast<std::size_t>(g)] = static_cast<std::int32_t>(
        pqkv::detail::aggregate_and_select(agg_, r, cand.first, nc, logits.data(), params_.k,
                                     out.data_handle() + g * out.extent(1), out.extent(1), score_row, keys_scratch));
      pqkv::detail::fill_non_candidate_scores(scores, g, n_tokens, cand);
    });
  }

  index_t q_heads_, kv_heads_, dim_;
  selection_params params_;
  Aggregation agg_;
  float scale_ = 1.f;
};

/// The `KeyScorer` over full keys: binds a keys buffer [kv_heads, capacity,
/// dim] and the current token count to an `exact_topk`. Views are not owned.
template <KvElement Key, GqaAggregation Aggregation = gqa::softmax_sum>
class exact_scorer {
 public:
  exact_scorer(index_t q_heads, kv_view<Key const> keys,  // [kv_heads, capacity, dim]
               index_t n_tokens, selection_params const& params, Aggregation agg = {})
    : op_{q_heads, keys.extent(0), keys.extent(2), params, agg}, keys_{keys},
      valid_(static_cast<std::size_t>(keys.extent(0)), 0)
  {
    set_tokens(n_tokens);
  }

  [[nodiscard]] index_t kv_heads() const noexcept { return op_.kv_heads(); }
  [[nodiscard]] index_t n_tokens() const noexcept { return n_tokens_; }
  [[nodiscard]] exact_topk<Aggregation> const& op() const noexcept { return op_; }

  /// Sets how many leading tokens of the keys buffer are live.
  void set_tokens(index_t n_tokens)
  {
    PQKV_EXPECTS(n_tokens >= 0 && n_tokens <= keys_.extent(1), "exact_scorer.set_tokens", "n_tokens=", n_tokens,
                 " is outside [0, keys.extent(1)=", keys_.extent(1), "]");
    n_tokens_ = n_tokens;
  }

  /// Writes selection [kv_heads, >= k] for queries [q_heads, dim].
  void select(query_view<float const> queries, selection_view<std::int32_t> selection)
  {
    op_(queries, keys_, n_tokens_, selection, valid_);
  }

  /// Valid entries per KV head of the last `select`.
  [[nodiscard]] std::span<std::int32_t const> valid_counts() const noexcept { return valid_; }

 private:
  exact_topk<Aggregation> op_;
  kv_view<Key const> keys_;
  index_t n_tokens_ = 0;
  std::vector<std::int32_t> valid_;
};

template <class Key, class Layout, class Accessor>
exact_scorer(index_t, ::cuda::std::mdspan<Key, extents<3>, Layout, Accessor>, index_t, selection_params const&)
  -> exact_scorer<std::remove_const_t<Key>>;
template <class Key, class Layout, class Accessor, class Aggregation>
exact_scorer(index_t, ::cuda::std::mdspan<Key, extents<3>, Layout, Accessor>, index_t, selection_params const&,
             Aggregation) -> exact_scorer<std::remove_const_t<Key>, Aggregation>;

static_assert(KeyScorer<exact_scorer<float>>);

}  // namespace cpu
}  // namespace pqkv

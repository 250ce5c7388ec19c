// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::cpu::adc_topk`: PQ asymmetric-distance scoring of the cached
/// tokens of one sequence, GQA aggregation and top-k, for one decode step; and
/// `pqkv::cpu::pq_scorer`, the `KeyScorer` that binds it to codes.
///
/// Contract (the GPU `adc_topk` must give the same selection; for `gqa::sum`
/// and `gqa::max` the same bits):
/// 1. GQA: r = q_heads / kv_heads; q head h belongs to KV head h / r; KV head
///    g's group is q heads g*r .. g*r + r-1, combined in that order.
/// 2. LUT: `lut[h][j][c]` as in `score/lut.hpp` (fma chain over dsub from 0.f).
/// 3. Logit: `s = 0.f; for j = 0 .. m-1: s = s + lut[h][j][code[t][j]];`
///    `logit[h][t] = scale * s` (float, each operation rounded: no fma
///    contraction of the product into a later sum). scale defaults to
///    `float(1 / sqrt(double(dim)))`.
/// 4. Candidates: tokens t in [sink, n - window); the first `sink` and last
///    `window` tokens are always attended, so they are never selected. When
///    sink + window >= n there are no candidates.
/// 5. Softmax (policies with `needs_softmax`, e.g. `gqa::softmax_sum`), per q
///    head over the candidates: `M = max logit` (float); `e_t = expf(logit_t - M)`
///    (float); `Z = sum of e_t` in double, ascending t; `p_t = e_t * float(1.0 / Z)`.
///    expf and the order of Z's sum differ on a GPU, so this step matches to a
///    few ulp, not bit for bit; selections then agree except at near-ties.
/// 6. Aggregate: `score[t] = finish(combine(...combine(init(), x_{g*r}[t])...,
///    x_{g*r+r-1}[t]))` with x = logit, or p under `needs_softmax`.
/// 7. Top-k over the candidates' scores in the order of `score/topk.hpp`
///    (score descending, ties to the lower token index, NaN lowest), k clamped
///    to the candidate count; the row of `out` gets the selected token indices
///    ascending, then -1 up to its end; `valid_counts[g]` the number selected.
///
/// Determinism: results do not depend on the thread count.

#include <pqkv/codebook/codebook.hpp>
#include <pqkv/core/concepts.hpp>
#include <pqkv/core/config.hpp>
#include <pqkv/core/dtype.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/parallel.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/score/gqa.hpp>
#include <pqkv/score/lut.hpp>
#include <pqkv/score/topk.hpp>

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <span>
#include <type_traits>
#include <vector>

namespace pqkv {

/// Shape of a PQ scorer: head counts and the product quantizer's layout.
struct adc_shape {
  index_t q_heads = 32;  ///< query heads; a multiple of kv_heads
  index_t kv_heads = 8;  ///< KV heads (= codebook heads)
  index_t dim = 128;     ///< head dimension
  index_t m = 8;         ///< subspaces; must divide dim
  int nbits = 8;         ///< bits per code, 1..8

  /// The shape of `cfg`'s quantizer with the given head counts.
  [[nodiscard]] static adc_shape from(pq_config const& cfg, index_t q_heads, index_t kv_heads) noexcept
  {
    return {q_heads, kv_heads, cfg.dim, cfg.m, cfg.nbits};
  }
  [[nodiscard]] constexpr index_t dsub() const noexcept { return m > 0 ? dim / m : 0; }
  [[nodiscard]] constexpr index_t ksub() const noexcept { return index_t{1} << nbits; }
  /// Query heads per KV head.
  [[nodiscard]] constexpr index_t group() const noexcept { return kv_heads > 0 ? q_heads / kv_heads : 0; }
  /// The quantizer part as a `pq_config` (training fields defaulted).
  [[nodiscard]] pq_config config() const noexcept { return pq_config{.dim = dim, .m = m, .nbits = nbits}; }

  /// Throws `pqkv::error` naming the first field out of range.
  void validate(char const* where = "adc_shape") const
  {
    config().validate(where);
    PQKV_EXPECTS(kv_heads > 0, where, "kv_heads=", kv_heads, " must be positive");
    PQKV_EXPECTS(q_heads > 0 && q_heads % kv_heads == 0, where, "q_heads=", q_heads,
                 " is not a positive multiple of kv_heads=", kv_heads);
    PQKV_EXPECTS(dsub() <= pqkv::detail::max_lut_dsub, where, "dim / m=", dsub(), " exceeds ",
                 pqkv::detail::max_lut_dsub);
  }
};

/// What to select: k tokens per KV head among the tokens outside the `sink`
/// first and `window` last ones (those are always attended).
struct selection_params {
  index_t k = 2048;     ///< tokens to select per KV head; clamped to the candidate count
  index_t sink = 0;     ///< leading tokens always attended, never selected
  index_t window = 0;   ///< trailing tokens always attended, never selected
  float scale = 0.f;    ///< logit scale; 0 means 1 / sqrt(dim)

  /// The scale the scorer uses for head dimension `dim`.
  [[nodiscard]] float resolved_scale(index_t dim) const noexcept
  {
    return scale != 0.f ? scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(dim)));
  }

  /// Throws `pqkv::error` naming the first field out of range.
  void validate(char const* where = "selection_params") const
  {
    PQKV_EXPECTS(k >= 0, where, "params.k=", k, " must be >= 0");
    PQKV_EXPECTS(k <= index_t{std::numeric_limits<std::int32_t>::max()}, where, "params.k=", k,
                 " exceeds the int32 range");
    PQKV_EXPECTS(sink >= 0, where, "params.sink=", sink, " must be >= 0");
    PQKV_EXPECTS(window >= 0, where, "params.window=", window, " must be >= 0");
    PQKV_EXPECTS(std::isfinite(scale) && scale >= 0.f, where, "params.scale=", scale,
                 " must be finite and >= 0 (0: 1/sqrt(dim))");
  }
};

/// A half-open token range [first, last).
struct token_range {
  index_t first = 0;
  index_t last = 0;
  [[nodiscard]] constexpr index_t size() const noexcept { return last > first ? last - first : 0; }
};

/// The candidate tokens of a sequence of n tokens: [sink, n - window), empty
/// when sink + window >= n.
PQKV_HD token_range candidate_range(index_t n, index_t sink, index_t window)
{
  return sink + window >= n ? token_range{sink < n ? sink : n, sink < n ? sink : n} : token_range{sink, n - window};
}

namespace detail {

/// Largest sequence length a selection can index (token indices are int32).
inline constexpr index_t max_tokens = index_t{std::numeric_limits<std::int32_t>::max()} + 1;

/// Softmax of x[0, n) in place, as step 5 of the contract.
inline void softmax_inplace(float* x, index_t n)
{
  if (n <= 0) { return; }
  float mx = -std::numeric_limits<float>::infinity();
  for (index_t t = 0; t < n; ++t) { mx = x[t] > mx ? x[t] : mx; }
  double z = 0.0;
  for (index_t t = 0; t < n; ++t) {
    float const e = std::exp(x[t] - mx);
    x[t] = e;
    z += static_cast<double>(e);
  }
  float const inv_z = static_cast<float>(1.0 / z);
  for (index_t t = 0; t < n; ++t) { x[t] *= inv_z; }
}

/// Steps 5-7 of the contract for one KV head whose r q heads' logits over the
/// candidates [first, first + n) are in logits[h_local * n + i] (overwritten).
/// Writes the aggregated scores to scores[0, n) when scores is not null.
template <class Aggregation>
index_t aggregate_and_select(Aggregation const& agg, index_t r, index_t first, index_t n, float* logits, index_t k,
                             std::int32_t* out, index_t out_len, float* scores, std::vector<std::uint64_t>& keys)
{
  if constexpr (Aggregation::needs_softmax) {
    for (index_t hl = 0; hl < r; ++hl) { softmax_inplace(logits + hl * n, n); }
  }
  keys.resize(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) {
    float acc = agg.init();
    for (index_t hl = 0; hl < r; ++hl) { acc = agg.combine(acc, logits[hl * n + i]); }
    float const s = agg.finish(acc);
    if (scores != nullptr) { scores[i] = s; }
    keys[static_cast<std::size_t>(i)] = topk_key(s, static_cast<std::uint32_t>(first + i));
  }
  return topk_select_keys(keys.data(), n, k, out, out_len);
}

/// Step 3 for tokens [first, first + n) of one KV head: logits[hl * n + i].
/// R > 0 fixes the group size at compile time (so the per-code read of the
/// interleaved LUT is one vector load); R == 0 reads it from r.
template <index_t R>
void adc_logits(float const* lut, std::uint8_t const* codes, index_t m, index_t ksub, index_t r, float scale,
                index_t first, index_t n, float* logits)
{
  index_t const rr = R > 0 ? R : r;
  float acc[R > 0 ? R : 64];
  for (index_t i = 0; i < n; ++i) {
    std::uint8_t const* row = codes + (first + i) * m;
    for (index_t hl = 0; hl < rr; ++hl) { acc[hl] = 0.f; }
    for (index_t j = 0; j < m; ++j) {
      float const* e = lut + (j * ksub + row[j]) * rr;
      for (index_t hl = 0; hl < rr; ++hl) { acc[hl] += e[hl]; }
    }
    for (index_t hl = 0; hl < rr; ++hl) { logits[hl * n + i] = scale * acc[hl]; }
  }
}

/// Throws unless `out` and `valid_counts` fit kv_heads rows of k, and
/// `scores` (when given) holds [kv_heads, >= n_tokens].
inline void check_selection_outputs(selection_view<std::int32_t> out, std::span<std::int32_t> valid_counts,
                                    view<float, 2> scores, index_t kv_heads, index_t k, index_t n_tokens,
                                    char const* where)
{
  PQKV_EXPECTS(out.extent(0) == kv_heads, where, "out.extent(0)=", out.extent(0), ", kv_heads=", kv_heads);
  PQKV_EXPECTS(k <= out.extent(1), where, "params.k=", k, " exceeds out.extent(1)=", out.extent(1));
  PQKV_EXPECTS(out.data_handle() != nullptr || element_count(out) == 0, where, "out.data_handle() is null");
  PQKV_EXPECTS(static_cast<index_t>(valid_counts.size()) == kv_heads, where,
               "valid_counts.size()=", valid_counts.size(), ", kv_heads=", kv_heads);
  PQKV_EXPECTS(valid_counts.data() != nullptr || kv_heads == 0, where, "valid_counts.data() is null");
  if (scores.data_handle() != nullptr) {
    PQKV_EXPECTS(scores.extent(0) == kv_heads, where, "scores.extent(0)=", scores.extent(0), ", kv_heads=",
                 kv_heads);
    PQKV_EXPECTS(scores.extent(1) >= n_tokens, where, "scores.extent(1)=", scores.extent(1), " < n_tokens=",
                 n_tokens);
  }
}

/// Writes -inf into scores(g, t) for the tokens outside `cand` (they are never
/// candidates) when scores is given.
inline void fill_non_candidate_scores(view<float, 2> scores, index_t g, index_t n_tokens, token_range cand)
{
  if (scores.data_handle() == nullptr) { return; }
  float const ninf = -std::numeric_limits<float>::infinity();
  for (index_t t = 0; t < n_tokens; ++t) {
    if (t < cand.first || t >= cand.last) { scores(g, t) = ninf; }
  }
}

}  // namespace detail

namespace cpu {

/// CPU reference of PQ scoring + GQA aggregation + top-k (the file's
/// contract). Built once per shape; each call scores one decode step.
/// Thread-safe: calls are const and allocate their own scratch.
template <GqaAggregation Aggregation = gqa::softmax_sum>
class adc_topk {
 public:
  /// Validates `shape` and `params`; throws `pqkv::error` naming a bad field.
  adc_topk(adc_shape const& shape, selection_params const& params, Aggregation agg = {})
    : shape_{shape}, params_{params}, agg_{agg}
  {
    shape_.validate("adc_topk");
    params_.validate("adc_topk");
    scale_ = params_.resolved_scale(shape_.dim);
  }
  /// The scorer of `cfg`'s quantizer for the given head counts.
  adc_topk(pq_config const& cfg, index_t q_heads, index_t kv_heads, selection_params const& params,
           Aggregation agg = {})
    : adc_topk(adc_shape::from(cfg, q_heads, kv_heads), params, agg)
  {
  }

  [[nodiscard]] adc_shape const& shape() const noexcept { return shape_; }
  [[nodiscard]] selection_params const& params() const noexcept { return params_; }
  /// The logit scale in use (params.scale, or 1/sqrt(dim) when that is 0).
  [[nodiscard]] float scale() const noexcept { return scale_; }

  /// Selects up to k tokens per KV head among the first `n_tokens` of `codes`.
  /// @param scores optional [kv_heads, >= n_tokens]: each candidate's aggregated
  ///        score, -inf for the sink and window tokens; pass `{}` to skip.
  /// Throws `pqkv::error` on a shape mismatch, n_tokens out of [0, codes.extent(1)],
  /// k > out.extent(1), a code >= ksub, or a query or centroid that is not finite;
  /// nothing is written then.
  void operator()(query_view<float const> q,                 // [q_heads, dim]
                  codes_view<std::uint8_t const> codes,      // [kv_heads, >= n_tokens, m]
                  centroids_view<float const> centroids,     // [kv_heads, m, ksub, dsub]
                  index_t n_tokens,
                  selection_view<std::int32_t> out,          // [kv_heads, >= k], ascending, -1 padded
                  std::span<std::int32_t> valid_counts,      // [kv_heads]
                  view<float, 2> scores = {}) const          // [kv_heads, >= n_tokens], optional
  {
    constexpr char const* where = "adc_topk";
    check_codes(codes, n_tokens, where);
    pqkv::detail::check_queries(q, shape_.q_heads, shape_.dim, where);
    check_centroids(centroids, shape_.config(), shape_.kv_heads, where);
    pqkv::detail::check_centroids_finite(centroids, where);
    pqkv::detail::check_selection_outputs(out, valid_counts, scores, shape_.kv_heads, params_.k, n_tokens, where);
    check_code_values(codes, n_tokens, where);

    index_t const r = shape_.group(), m = shape_.m, ksub = shape_.ksub();
    token_range const cand = candidate_range(n_tokens, params_.sink, params_.window);
    index_t const nc = cand.size();
    parallel_for(shape_.kv_heads, [&](index_t g) {
      std::vector<float> lut(static_cast<std::size_t>(r * m * ksub));
      std::vector<float> logits(static_cast<std::size_t>(r * nc));
      std::vector<std::uint64_t> keys;
      pqkv::detail::build_group_lut(q, centroids, g, r, lut.data());
      std::uint8_t const* head_codes = codes.data_handle() + g * codes.extent(1) * m;
      auto score = [&]<index_t R>() {
        pqkv::detail::adc_logits<R>(lut.data(), head_codes, m, ksub, r, scale_, cand.first, nc, logits.data());
      };
      switch (r) {  // common group sizes get a compile-time width
        case 1: score.template operator()<1>(); break;
        case 2: score.template operator()<2>(); break;
        case 4: score.template operator()<4>(); break;
        case 8: score.template operator()<8>(); break;
        default: score_any_group(lut.data(), head_codes, r, cand.first, nc, logits.data()); break;
      }
      float* score_row = scores.data_handle() != nullptr ? scores.data_handle() + g * scores.extent(1) + cand.first
                                                         : nullptr;
      valid_counts[static_cast<std::size_t>(g)] = static_cast<std::int32_t>(
        pqkv::detail::aggregate_and_select(agg_, r, cand.first, nc, logits.data(), params_.k,
                                     out.data_handle() + g * out.extent(1), out.extent(1), score_row, keys));
      pqkv::detail::fill_non_candidate_scores(scores, g, n_tokens, cand);
    });
  }

  /// The same call with queries of another element type (__half,
  /// __nv_bfloat16, ...): they are widened to float (exactly) first, as the
  /// GPU scorer does when it builds the LUT, so both see the same queries.
  template <class Query, class Layout>
    requires(!std::same_as<std::remove_const_t<Query>, float> && KvElement<std::remove_const_t<Query>>)
  void operator()(::cuda::std::mdspan<Query, extents<2>, Layout> q,  // [q_heads, dim]
                  codes_view<std::uint8_t const> codes,               // [kv_heads, >= n_tokens, m]
                  centroids_view<float const> centroids,              // [kv_heads, m, ksub, dsub]
                  index_t n_tokens,
                  selection_view<std::int32_t> out,                   // [kv_heads, >= k]
                  std::span<std::int32_t> valid_counts,               // [kv_heads]
                  view<float, 2> scores = {}) const                   // [kv_heads, >= n_tokens], optional
  {
    PQKV_EXPECTS(q.data_handle() != nullptr || q.size() == 0, "adc_topk", "q.data_handle() is null");
    std::vector<float> wide(static_cast<std::size_t>(q.extent(0) * q.extent(1)));
    for (index_t h = 0; h < q.extent(0); ++h) {
      for (index_t d = 0; d < q.extent(1); ++d) {
        wide[static_cast<std::size_t>(h * q.extent(1) + d)] = to_float(static_cast<std::remove_const_t<Query>>(q(h, d)));
      }
    }
    (*this)(query_view<float const>{make_view(static_cast<float const*>(wide.data()), q.extent(0), q.extent(1))}, codes,
            centroids, n_tokens, out, valid_counts, scores);
  }

 private:
  void check_codes(codes_view<std::uint8_t const> codes, index_t n_tokens, char const* where) const
  {
    PQKV_EXPECTS(codes.extent(0) == shape_.kv_heads, where, "codes.extent(0)=", codes.extent(0),
                 ", kv_heads=", shape_.kv_heads);
    PQKV_EXPECTS(codes.extent(2) == shape_.m, where, "codes.extent(2)=", codes.extent(2), ", shape.m=", shape_.m);
    PQKV_EXPECTS(n_tokens >= 0, where, "n_tokens=", n_tokens, " must be >= 0");
    PQKV_EXPECTS(n_tokens <= codes.extent(1), where, "n_tokens=", n_tokens, " exceeds codes.extent(1)=",
                 codes.extent(1));
    PQKV_EXPECTS(n_tokens <= pqkv::detail::max_tokens, where, "n_tokens=", n_tokens, " exceeds the int32 token range");
    PQKV_EXPECTS(codes.data_handle() != nullptr || element_count(codes) == 0, where, "codes.data_handle() is null");
  }

  // A code >= ksub would read past its LUT row; with 8 bits every byte is valid.
  void check_code_values(codes_view<std::uint8_t const> codes, index_t n_tokens, char const* where) const
  {
    if (shape_.nbits >= 8) { return; }
    auto const ksub = shape_.ksub();
    for (index_t g = 0; g < shape_.kv_heads; ++g) {
      std::uint8_t const* p = codes.data_handle() + g * codes.extent(1) * shape_.m;
      for (index_t i = 0; i < n_tokens * shape_.m; ++i) {
        PQKV_EXPECTS(p[i] < ksub, where, "codes(", g, ", ", i / shape_.m, ", ", i % shape_.m, ")=", int{p[i]},
                     " >= ksub=", ksub, " (nbits=", shape_.nbits, ")");
      }
    }
  }

  void score_any_group(float const* lut, std::uint8_t const* codes, index_t r, index_t first, index_t n,
                       float* logits) const
  {
    if (r <= 64) {
      pqkv::detail::adc_logits<0>(lut, codes, shape_.m, shape_.ksub(), r, scale_, first, n, logits);
      return;
    }
    // Groups above 64 q heads: one head at a time, the same per-head arithmetic.
    index_t const m = shape_.m, ksub = shape_.ksub();
    for (index_t hl = 0; hl < r; ++hl) {
      for (index_t i = 0; i < n; ++i) {
        std::uint8_t const* row = codes + (first + i) * m;
        float s = 0.f;
        for (index_t j = 0; j < m; ++j) { s += lut[(j * ksub + row[j]) * r + hl]; }
        logits[hl * n + i] = scale_ * s;
      }
    }
  }

  adc_shape shape_;
  selection_params params_;
  Aggregation agg_;
  float scale_ = 1.f;
};

/// The `KeyScorer` over PQ codes: binds a codes buffer [kv_heads, capacity, m],
/// its centroids and the current token count to an `adc_topk`. Views are not
/// owned; after appending codes, call `set_tokens`.
template <GqaAggregation Aggregation = gqa::softmax_sum>
class pq_scorer {
 public:
  /// Validates the shape, params, and the views' shapes against them.
  pq_scorer(adc_shape const& shape, selection_params const& params,
            codes_view<std::uint8_t const> codes,        // [kv_heads, capacity, m]
            centroids_view<float const> centroids,       // [kv_heads, m, ksub, dsub]
            index_t n_tokens, Aggregation agg = {})
    : op_{shape, params, agg}, codes_{codes}, centroids_{centroids},
      valid_(static_cast<std::size_t>(shape.kv_heads), 0)
  {
    constexpr char const* where = "pq_scorer";
    PQKV_EXPECTS(codes.extent(0) == shape.kv_heads, where, "codes.extent(0)=", codes.extent(0), ", kv_heads=",
                 shape.kv_heads);
    PQKV_EXPECTS(codes.extent(2) == shape.m, where, "codes.extent(2)=", codes.extent(2), ", shape.m=", shape.m);
    check_centroids(centroids, shape.config(), shape.kv_heads, where);
    set_tokens(n_tokens);
  }

  [[nodiscard]] index_t kv_heads() const noexcept { return op_.shape().kv_heads; }
  [[nodiscard]] index_t n_tokens() const noexcept { return n_tokens_; }
  [[nodiscard]] adc_topk<Aggregation> const& op() const noexcept { return op_; }

  /// Sets how many leading tokens of the codes buffer are live.
  void set_tokens(index_t n_tokens)
  {
    PQKV_EXPECTS(n_tokens >= 0 && n_tokens <= codes_.extent(1), "pq_scorer.set_tokens", "n_tokens=", n_tokens,
                 " is outside [0, codes.extent(1)=", codes_.extent(1), "]");
    n_tokens_ = n_tokens;
  }

  /// Writes selection [kv_heads, >= k] for queries [q_heads, dim]; the valid
  /// counts are kept in `valid_counts()`.
  void select(query_view<float const> queries, selection_view<std::int32_t> selection)
  {
    op_(queries, codes_, centroids_, n_tokens_, selection, valid_);
  }

  /// Valid entries per KV head of the last `select`.
  [[nodiscard]] std::span<std::int32_t const> valid_counts() const noexcept { return valid_; }

 private:
  adc_topk<Aggregation> op_;
  codes_view<std::uint8_t const> codes_;
  centroids_view<float const> centroids_;
  index_t n_tokens_ = 0;
  std::vector<std::int32_t> valid_;
};

static_assert(KeyScorer<pq_scorer<gqa::softmax_sum>>);
static_assert(KeyScorer<pq_scorer<gqa::max>>);

}  // namespace cpu
}  // namespace pqkv

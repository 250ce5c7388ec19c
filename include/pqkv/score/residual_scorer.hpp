// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::cpu::rq_scorer`: the `KeyScorer` over residual (VQKV-style)
/// key codes. The top-k token selection of `score/adc_topk.hpp`, with each
/// logit read from the codes through the key LUT of `attend/code_attention.hpp`
/// (the same function computes both), so no key row is ever rebuilt.
///
/// Contract, for KV head g, its q heads h = g*r .. g*r + r-1 (r = q_heads /
/// kv_heads, combined in that order), codebook head hc = 0 when the centroids
/// are shared (extent(0) == 1), else g; code n = s * stages + st:
/// 1. Scale: params.scale, or float(1 / sqrt(double(dim))) when it is 0.
/// 2. LUT (code_attention step 2): qp_i = q(h, perm[i]);
///    `lut[n][c] = 0.f; for i ascending: lut[n][c] = fmaf(qp[s * dsub + i], C(hc, s, st, c, i), lut[n][c]);`
/// 3. Logit (code_attention step 3): `a = 0.f; for n ascending: a += lut[n][code(g, t, n)];`
///    `logit[h][t] = scale * a` (float, each operation rounded, no contraction).
///    a equals q . (the reconstructed key) up to rounding.
/// 4. Candidates: tokens t in [sink, n_tokens - window); none when sink +
///    window >= n_tokens (adc_topk step 4).
/// 5. Softmax per q head over the candidates under `needs_softmax` policies
///    (adc_topk step 5: float max, expf, double sum ascending, one float scale).
/// 6. Aggregate: `score[t] = finish(combine(...combine(init(), x_{g*r}[t])...,
///    x_{g*r+r-1}[t]))`, x = logit, or the probability under `needs_softmax`.
/// 7. Top-k over the candidates in the order of `score/topk.hpp` (score
///    descending, ties to the lower token index, NaN lowest), k clamped to the
///    candidate count; selection row g gets the chosen token indices ascending,
///    then -1 to its end; `valid_counts()[g]` the number chosen.
/// Steps 2-3 are `cpu::code_attention`'s own code (`detail::rq::key_lut`,
/// `detail::rq::key_logit`) and steps 4-7 `adc_topk`'s
/// (`detail::aggregate_and_select`), so the logits are the ones code attention
/// softmaxes, bit for bit, and a config with stages = 1, splits = m and no
/// permutation (centroids [h, m, 1, ksub, dsub] are PQ's [h, m, ksub, dsub])
/// gives `pq_scorer`'s scores and selection bit for bit under every policy.
/// Codes past n_tokens are never read. Determinism: results do not depend on
/// the thread count.
/// Errors (`pqkv::error` naming the call, the argument and its value; nothing
/// is written): construction and `set_tokens` check key_cfg, params, q_heads a
/// positive multiple of codes.extent(0), uint8 codes for bits > 8,
/// codes.extent(2) != splits * stages, centroids not [1|kv_heads, splits,
/// stages, 2^bits, dsub], null views, n_tokens outside [0, codes.extent(1)];
/// `select` checks q [q_heads, dim] non-null and finite, out [kv_heads, >= k],
/// scores, finite centroids and every live code (rows [0, n_tokens)) < 2^bits.

#include <pqkv/attend/code_attention.hpp>
#include <pqkv/codebook/residual.hpp>
#include <pqkv/core/concepts.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/parallel.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/encode/residual.hpp>
#include <pqkv/score/adc_topk.hpp>
#include <pqkv/score/gqa.hpp>
#include <pqkv/score/lut.hpp>

#include <cstdint>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

namespace pqkv::cpu {

/// The `KeyScorer` over residual key codes (the file's contract): binds a
/// codes buffer [kv_heads, capacity, splits * stages] (uint8 for bits <= 8,
/// or uint16), its centroids and the live token count. Views are not owned;
/// after appending codes, call `set_tokens`.
template <RqCode Code, GqaAggregation Aggregation = gqa::softmax_sum>
class rq_scorer {
 public:
  /// Validates key_cfg, params, the head counts, the code type and the views'
  /// shapes; throws `pqkv::error` naming the first bad one.
  rq_scorer(rq_config key_cfg, index_t q_heads,
            rq_centroids_view<float const> centroids,  // [1|kv_heads, splits, stages, 2^bits, dsub]
            view<Code const, 3> codes,                 // [kv_heads, capacity, splits * stages]
            index_t n_tokens, selection_params const& params, Aggregation agg = {})
    : cfg_{std::move(key_cfg)}, params_{params}, agg_{agg}, q_heads_{q_heads}, centroids_{centroids}, codes_{codes}
  {
    constexpr char const* where = "rq_scorer";
    cfg_.validate(where);
    params_.validate(where);
    index_t const kv = codes.extent(0);
    PQKV_EXPECTS(kv > 0, where, "codes.extent(0)=", kv, " must be positive (the KV heads)");
    PQKV_EXPECTS(q_heads > 0 && q_heads % kv == 0, where, "q_heads=", q_heads,
                 " is not a positive multiple of kv_heads=", kv);
    pqkv::detail::rq::check_code_type<Code>(cfg_.bits, "rq_scorer (codes)");
    PQKV_EXPECTS(codes.extent(2) == cfg_.codes_per_row(), where, "codes.extent(2)=", codes.extent(2),
                 ", key_cfg.splits * key_cfg.stages=", cfg_.codes_per_row());
    PQKV_EXPECTS(codes.data_handle() != nullptr || element_count(codes) == 0, where, "codes.data_handle() is null");
    check_rq_centroids(centroids, cfg_, kv, "rq_scorer (centroids)", false);
    scale_ = params_.resolved_scale(cfg_.dim);
    valid_.assign(static_cast<std::size_t>(kv), 0);
    set_tokens(n_tokens);
  }

  [[nodiscard]] index_t kv_heads() const noexcept { return codes_.extent(0); }
  [[nodiscard]] index_t q_heads() const noexcept { return q_heads_; }
  [[nodiscard]] index_t n_tokens() const noexcept { return n_tokens_; }
  [[nodiscard]] rq_config const& config() const noexcept { return cfg_; }
  [[nodiscard]] selection_params const& params() const noexcept { return params_; }
  /// The logit scale in use (params.scale, or 1/sqrt(dim) when that is 0).
  [[nodiscard]] float scale() const noexcept { return scale_; }

  /// Sets how many leading tokens of the codes buffer are live.
  void set_tokens(index_t n_tokens)
  {
    constexpr char const* where = "rq_scorer.set_tokens";
    PQKV_EXPECTS(n_tokens >= 0 && n_tokens <= codes_.extent(1), where, "n_tokens=", n_tokens,
                 " is outside [0, codes.extent(1)=", codes_.extent(1), "]");
    PQKV_EXPECTS(n_tokens <= pqkv::detail::max_tokens, where, "n_tokens=", n_tokens,
                 " exceeds the int32 token range");
    n_tokens_ = n_tokens;
  }

  /// Writes the selection `out` [kv_heads, >= k] for queries `q` [q_heads,
  /// dim]; the valid counts are kept in `valid_counts()`.
  /// @param scores optional [kv_heads, >= n_tokens]: each candidate's
  ///        aggregated score (step 6), -inf for the other tokens; `{}` skips it.
  /// Throws `pqkv::error`, writing nothing, on a shape mismatch, a null view,
  /// a query or centroid that is not finite, or a live code >= 2^bits.
  void select(query_view<float const> q,           // [q_heads, dim]
              selection_view<std::int32_t> out,    // [kv_heads, >= k], ascending, -1 padded
              view<float, 2> scores = {})          // [kv_heads, >= n_tokens], optional
  {
    constexpr char const* where = "rq_scorer.select";
    index_t const kv = kv_heads(), n = n_tokens_;
    pqkv::detail::check_queries(q, q_heads_, cfg_.dim, where);
    pqkv::detail::check_selection_outputs(out, valid_, scores, kv, params_.k, n, where);
    check_rq_centroids(centroids_, cfg_, kv, "rq_scorer.select (centroids)");
    // Every value of a full-width code type is a valid codeword.
    if (cfg_.bits < 8 * static_cast<int>(sizeof(Code))) {
      pqkv::detail::rq::check_code_values(codes_, 0, n, cfg_.ksub(), "rq_scorer.select (codes)");
    }

    index_t const r = q_heads_ / kv, nk = cfg_.codes_per_row(), ksub = cfg_.ksub();
    token_range const cand = candidate_range(n, params_.sink, params_.window);
    index_t const nc = cand.size();
    parallel_for(kv, [&](index_t g) {
      std::vector<float> logits(static_cast<std::size_t>(r * nc));  // [r, nc]
      std::vector<std::uint64_t> keys;
      if (nc > 0) {
        index_t const hc = centroids_.extent(0) == 1 ? 0 : g;
        std::vector<float> qp(static_cast<std::size_t>(cfg_.dim));
        std::vector<float> lut(static_cast<std::size_t>(nk * ksub));  // [splits * stages, ksub]
        for (index_t hl = 0; hl < r; ++hl) {
          pqkv::detail::rq::key_lut(q, g * r + hl, cfg_, centroids_, hc, qp.data(), lut.data());
          float* row = logits.data() + hl * nc;
          for (index_t i = 0; i < nc; ++i) {
            row[i] = pqkv::detail::rq::key_logit(lut.data(), &codes_(g, cand.first + i, 0), nk, ksub, scale_);
          }
        }
      }
      float* score_row = scores.data_handle() != nullptr ? scores.data_handle() + g * scores.extent(1) + cand.first
                                                         : nullptr;
      valid_[static_cast<std::size_t>(g)] = static_cast<std::int32_t>(
        pqkv::detail::aggregate_and_select(agg_, r, cand.first, nc, logits.data(), params_.k,
                                           out.data_handle() + g * out.extent(1), out.extent(1),
                                           score_row, keys));
      pqkv::detail::fill_non_candidate_scores(scores, g, n, cand);
    });
  }

  /// Valid entries per KV head of the last `select`.
  [[nodiscard]] std::span<std::int32_t const> valid_counts() const noexcept { return valid_; }

 private:
  rq_config cfg_;
  selection_params params_;
  Aggregation agg_;
  index_t q_heads_;
  rq_centroids_view<float const> centroids_;
  view<Code const, 3> codes_;
  index_t n_tokens_ = 0;
  float scale_ = 1.f;
  std::vector<std::int32_t> valid_;
};

// Codes views may be const or not; the class names the plain code type.
template <class Code>
rq_scorer(rq_config, index_t, rq_centroids_view<float const>, view<Code, 3>, index_t, selection_params const&)
  -> rq_scorer<std::remove_const_t<Code>>;
template <class Code, class Aggregation>
rq_scorer(rq_config, index_t, rq_centroids_view<float const>, view<Code, 3>, index_t, selection_params const&,
          Aggregation) -> rq_scorer<std::remove_const_t<Code>, Aggregation>;

static_assert(KeyScorer<rq_scorer<std::uint8_t>>);
static_assert(KeyScorer<rq_scorer<std::uint16_t>>);
static_assert(KeyScorer<rq_scorer<std::uint8_t, gqa::max>>);

}  // namespace pqkv::cpu

// SPDX-License-Identifier: Apache-2.0
#include <pqkv/codebook/residual.hpp>
#include <pqkv/core/concepts.hpp>
#include <pqkv/core/host_tensor.hpp>
#include <pqkv/core/parallel.hpp>
#include <pqkv/core/random.hpp>
#include <pqkv/decode/residual_reconstruct.hpp>
#include <pqkv/score/adc_topk.hpp>
#include <pqkv/score/exact.hpp>
#include <pqkv/score/gqa.hpp>
#include <pqkv/score/residual_scorer.hpp>

#include "common/residual_util.hpp"
#include "common/test_util.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using pqkv::index_t;
using pqkv::test::error_message;
using pqkv::test::oracle_topk;
using pqkv::test::noise;
constexpr double ninf = -std::numeric_limits<double>::infinity();

pqkv::rq_config make_cfg(index_t dim, int splits, int stages, int bits, bool permute)
{
  auto c = pqkv::test::rq_test_config(dim, splits, stages, bits);
  if (permute) { c.permutation = pqkv::test::stride_permutation(dim); }
  return c;
}

/// Random residual key codes of kv_heads x capacity rows, their centroids
/// (shared: one codebook head) and q_heads queries.
template <class Code>
struct problem {
  pqkv::rq_config cfg;
  index_t q_heads, kv_heads, capacity;
  pqkv::host_tensor<float, 2> q;          // [q_heads, dim]
  pqkv::host_tensor<float, 5> centroids;  // [1|kv_heads, splits, stages, ksub, dsub]
  pqkv::host_tensor<Code, 3> codes;       // [kv_heads, capacity, splits * stages]

  problem(pqkv::rq_config c, index_t qh, index_t kvh, index_t cap, bool shared, std::uint64_t seed)
    : cfg{std::move(c)}, q_heads{qh}, kv_heads{kvh}, capacity{cap}, q(qh, cfg.dim),
      centroids(shared ? 1 : kvh, cfg.splits, cfg.stages, cfg.ksub(), cfg.dsub()), codes(kvh, cap, cfg.codes_per_row())
  {
    for (std::size_t i = 0; i < q.size(); ++i) { q.data()[i] = noise(seed, i); }
    for (std::size_t i = 0; i < centroids.size(); ++i) { centroids.data()[i] = noise(seed + 1, i); }
    for (std::size_t i = 0; i < codes.size(); ++i) {
      codes.data()[i] = static_cast<Code>(pqkv::detail::random_below(seed, 2, i, static_cast<std::uint64_t>(cfg.ksub())));
    }
  }
  [[nodiscard]] index_t group() const { return q_heads / kv_heads; }
  /// Fills rows [n, capacity) with the largest value of the code type: not
  /// a codeword when bits is below the type's width, so a read would show.
  void poison_from(index_t n)
  {
    for (index_t g = 0; g < kv_heads; ++g) {
      for (index_t t = n; t < capacity; ++t) {
        for (index_t j = 0; j < cfg.codes_per_row(); ++j) { codes.view()(g, t, j) = std::numeric_limits<Code>::max(); }
      }
    }
  }
};

/// Steps 1-3 of the contract, written out plainly in float: logits[hl * n + t]
/// of the q heads of KV head g over tokens [0, n).
template <class Code>
std::vector<float> contract_logits(problem<Code> const& p, index_t g, index_t n, float scale)
{
  auto const q = p.q.const_view();
  auto const c = p.centroids.const_view();
  auto const codes = p.codes.const_view();
  index_t const r = p.group(), dsub = p.cfg.dsub(), stages = p.cfg.stages, hc = c.extent(0) == 1 ? 0 : g;
  std::vector<float> logits(static_cast<std::size_t>(r * n));
  for (index_t hl = 0; hl < r; ++hl) {
    for (index_t t = 0; t < n; ++t) {
      float a = 0.f;
      for (index_t s = 0; s < p.cfg.splits; ++s) {
        for (index_t st = 0; st < stages; ++st) {
          index_t const code = codes(g, t, s * stages + st);
          float lut = 0.f;
          for (index_t i = 0; i < dsub; ++i) {
            lut = std::fma(q(g * r + hl, p.cfg.channel(s * dsub + i)), c(hc, s, st, code, i), lut);
          }
          a = a + lut;
        }
      }
      logits[static_cast<std::size_t>(hl * n + t)] = scale * a;
    }
  }
  return logits;
}

/// Aggregated reference scores of the candidates [first, last), -inf elsewhere:
/// the policy in float for sum and max (the contract exactly), a double
/// softmax summed in double for softmax_sum (to compare selections).
template <class Agg>
std::vector<double> reference_scores(std::vector<float> const& logits, index_t r, index_t n, index_t first,
                                     index_t last)
{
  std::vector<double> out(static_cast<std::size_t>(n), ninf);
  auto at = [&](index_t hl, index_t t) { return logits[static_cast<std::size_t>(hl * n + t)]; };
  if constexpr (Agg::needs_softmax) {
    for (index_t t = first; t < last; ++t) { out[static_cast<std::size_t>(t)] = 0; }
    for (index_t hl = 0; hl < r; ++hl) {
      double mx = ninf, z = 0;
      for (index_t t = first; t < last; ++t) { mx = std::max(mx, static_cast<double>(at(hl, t))); }
      for (index_t t = first; t < last; ++t) { z += std::exp(static_cast<double>(at(hl, t)) - mx); }
      for (index_t t = first; t < last; ++t) {
        out[static_cast<std::size_t>(t)] += std::exp(static_cast<double>(at(hl, t)) - mx) / z;
      }
    }
  } else {
    Agg const agg{};
    for (index_t t = first; t < last; ++t) {
      float acc = agg.init();
      for (index_t hl = 0; hl < r; ++hl) { acc = agg.combine(acc, at(hl, t)); }
      out[static_cast<std::size_t>(t)] = agg.finish(acc);
    }
  }
  return out;
}

template <class T>
std::vector<T> row_of(pqkv::host_tensor<T, 2> const& t, index_t g, index_t len)
{
  auto const b = t.storage().begin() + g * t.extent(1);
  return {b, b + len};
}

/// One select of a fresh scorer; sel [kv_heads, k_cap] starts as 4242, scores [kv_heads, max(n, 1)].
struct run_result {
  pqkv::host_tensor<std::int32_t, 2> sel;
  pqkv::host_tensor<float, 2> scores;
  std::vector<std::int32_t> valid;
};

template <class Agg, class Code>
run_result run_rq(problem<Code> const& p, pqkv::selection_params const& params, index_t n, index_t k_cap)
{
  run_result r{pqkv::host_tensor<std::int32_t, 2>(p.kv_heads, k_cap),
               pqkv::host_tensor<float, 2>(p.kv_heads, std::max<index_t>(n, 1)), {}};
  std::fill(r.sel.storage().begin(), r.sel.storage().end(), 4242);
  pqkv::cpu::rq_scorer<Code, Agg> s{p.cfg, p.q_heads, p.centroids.const_view(), p.codes.const_view(), n, params};
  s.select(p.q.const_view(), r.sel.view(), r.scores.view());
  r.valid.assign(s.valid_counts().begin(), s.valid_counts().end());
  return r;
}

/// Checks rq_scorer against the plain contract for every k in 0 .. candidates + 1.
template <class Agg, class Code>
void check_against_contract(problem<Code> const& p, index_t n, index_t sink, index_t window)
{
  float const scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(p.cfg.dim)));
  pqkv::token_range const cand = pqkv::candidate_range(n, sink, window);
  index_t const nc = cand.size(), k_cap = n + 2;
  std::vector<std::vector<double>> ref, sorted;
  for (index_t g = 0; g < p.kv_heads; ++g) {
    ref.push_back(reference_scores<Agg>(contract_logits(p, g, n, scale), p.group(), n, cand.first, cand.last));
    std::vector<double> d(ref.back().begin() + cand.first, ref.back().begin() + cand.last);
    std::sort(d.begin(), d.end(), std::greater<>{});
    sorted.push_back(std::move(d));
  }
  index_t checked = 0, skipped = 0;
  for (index_t k = 0; k <= std::min(nc + 1, k_cap); ++k) {
    auto const got = run_rq<Agg>(p, {.k = k, .sink = sink, .window = window}, n, k_cap);
    for (index_t g = 0; g < p.kv_heads; ++g) {
      auto const& d = sorted[static_cast<std::size_t>(g)];
      CHECK(got.valid[static_cast<std::size_t>(g)] == std::min(k, nc));
      if constexpr (Agg::needs_softmax) {
        // Softmax matches to a few ulp, not bits: compare selections only where
        // the k-th and (k+1)-th reference scores are distinct beyond that.
        if (k > 0 && k < nc &&
            d[static_cast<std::size_t>(k - 1)] - d[static_cast<std::size_t>(k)] <= 1e-5 * d[static_cast<std::size_t>(k - 1)]) {
          ++skipped;
          continue;
        }
      }
      ++checked;
      CHECK(row_of(got.sel, g, k_cap) == oracle_topk(ref[static_cast<std::size_t>(g)], cand.first, cand.last, k, k_cap));
      if (k == 1 && n > 0) {  // scores: the contract's bits for sum / max, 1e-5 relative for softmax
        for (index_t t = 0; t < n; ++t) {
          double const want = ref[static_cast<std::size_t>(g)][static_cast<std::size_t>(t)];
          double const have = got.scores.view()(g, t);
          if constexpr (Agg::needs_softmax) {
            if (std::isinf(want)) {
              CHECK(have == want);
            } else {
              CHECK(std::abs(have - want) <= 1e-5 * std::abs(want) + 1e-12);
            }
          } else {
            CHECK(have == want);
          }
        }
      }
    }
  }
  CHECK(skipped * 10 <= checked);
}

struct variant {
  index_t dim;
  int splits, stages, bits;
  bool permute, shared;
  index_t q_heads, kv_heads;
};

template <class Agg, class Code>
void check_variant(variant const& v)
{
  CAPTURE(v.splits);
  CAPTURE(v.stages);
  CAPTURE(v.bits);
  CAPTURE(v.shared);
  CAPTURE(sizeof(Code));
  problem<Code> p(make_cfg(v.dim, v.splits, v.stages, v.bits, v.permute), v.q_heads, v.kv_heads, 36, v.shared, 11);
  p.poison_from(32);  // rows past n_tokens are never read (nor checked)
  for (auto const& [sink, window] : {std::pair<index_t, index_t>{0, 0}, {3, 5}}) {
    CAPTURE(sink);
    check_against_contract<Agg>(p, 32, sink, window);
  }
}

template <class S>
  requires pqkv::KeyScorer<S>
void select_through_concept(S& s, pqkv::query_view<float const> q, pqkv::selection_view<std::int32_t> out)
{
  s.select(q, out);
}

}  // namespace

TEST_CASE_TEMPLATE("rq_scorer: selections and scores follow the contract for every k", Agg, pqkv::gqa::sum,
                   pqkv::gqa::max, pqkv::gqa::softmax_sum)
{
  //                 dim splits stages bits perm  shared q  kv
  check_variant<Agg, std::uint8_t>({16, 1, 3, 4, false, true, 4, 2});
  check_variant<Agg, std::uint8_t>({16, 2, 2, 8, true, false, 6, 2});
  check_variant<Agg, std::uint16_t>({8, 2, 2, 10, true, true, 4, 2});
  check_variant<Agg, std::uint16_t>({16, 2, 3, 4, true, false, 2, 2});
}

TEST_CASE("rq_scorer: n = 0 and n <= sink + window select nothing; k above the candidates pads with -1")
{
  problem<std::uint8_t> p(make_cfg(16, 2, 2, 5, true), 4, 2, 12, false, 21);
  for (index_t n : {0, 6, 8}) {  // sink + window = 8
    auto const r = run_rq<pqkv::gqa::softmax_sum>(p, {.k = 3, .sink = 3, .window = 5}, n, 4);
    for (std::int32_t x : r.sel.storage()) { CHECK(x == -1); }
    CHECK(r.valid == std::vector<std::int32_t>{0, 0});
    for (index_t t = 0; t < n; ++t) { CHECK(r.scores.view()(0, t) == -std::numeric_limits<float>::infinity()); }
  }
  auto const one = run_rq<pqkv::gqa::max>(p, {.k = 3, .sink = 3, .window = 5}, 9, 4);  // one candidate: token 3
  CHECK(row_of(one.sel, 0, 4) == std::vector<std::int32_t>{3, -1, -1, -1});
  CHECK(row_of(one.sel, 1, 4) == std::vector<std::int32_t>{3, -1, -1, -1});
  CHECK(one.valid == std::vector<std::int32_t>{1, 1});
  auto const none = run_rq<pqkv::gqa::sum>(p, {.k = 0}, 12, 2);  // k = 0
  for (std::int32_t x : none.sel.storage()) { CHECK(x == -1); }
}

TEST_CASE_TEMPLATE("rq_scorer: stages = 1, splits = m is PQ: selects as pq_scorer on the same codes", Agg,
                   pqkv::gqa::sum, pqkv::gqa::max, pqkv::gqa::softmax_sum)
{
  for (auto const& shape : {pqkv::adc_shape{.q_heads = 8, .kv_heads = 2, .dim = 16, .m = 4, .nbits = 8},
                            pqkv::adc_shape{.q_heads = 4, .kv_heads = 2, .dim = 16, .m = 2, .nbits = 6}}) {
    CAPTURE(shape.m);
    index_t const n = 100;
    // The same memory is PQ centroids [kv, m, ksub, dsub] and residual [kv, splits = m, 1, ksub, dsub].
    problem<std::uint8_t> p(make_cfg(shape.dim, static_cast<int>(shape.m), 1, shape.nbits, false), shape.q_heads,
                            shape.kv_heads, n, false, 31);
    pqkv::centroids_view<float const> const pq_c{p.centroids.data(), shape.kv_heads, shape.m, shape.ksub(),
                                                 shape.dsub()};
    for (index_t k : {1, 10, 50, 89, 95}) {
      pqkv::selection_params const params{.k = k, .sink = 2, .window = 8};
      pqkv::cpu::pq_scorer<Agg> pq{shape, params, p.codes.const_view(), pq_c, n};
      pqkv::host_tensor<std::int32_t, 2> want(shape.kv_heads, 96);
      pq.select(p.q.const_view(), want.view());
      auto const got = run_rq<Agg>(p, params, n, 96);
      CHECK(got.sel.storage() == want.storage());
      CHECK(got.valid == std::vector<std::int32_t>(pq.valid_counts().begin(), pq.valid_counts().end()));
      // and the aggregated scores, bit for bit
      pqkv::host_tensor<float, 2> pq_scores(shape.kv_heads, n);
      std::vector<std::int32_t> valid(static_cast<std::size_t>(shape.kv_heads));
      pq.op()(p.q.const_view(), p.codes.const_view(), pq_c, n, want.view(), valid, pq_scores.view());
      CHECK(got.scores.storage() == pq_scores.storage());
    }
  }
}

TEST_CASE("rq_scorer: gqa::max selection equals exact top-k on the reconstructed keys (recall >= 0.99)")
{
  // Not bit for bit: the code logit sums one LUT entry per stage, while the
  // exact logit dots q with the rounded sum of the stages, so scores differ by
  // rounding (checked <= 1e-5 of the largest) and a near-tie could swap a
  // token. Hence recall >= 0.99 of the exact top-k, not equality.
  pqkv::rq_config const cfg = make_cfg(32, 2, 4, 6, true);
  index_t const n = 400, kv = 2, qh = 8;
  problem<std::uint8_t> p(cfg, qh, kv, n, false, 41);
  pqkv::host_tensor<float, 3> keys(kv, n, cfg.dim);
  pqkv::cpu::rq_reconstruct(cfg, p.centroids.const_view(), p.codes.const_view(), 0, keys.view());
  pqkv::selection_params const params{.k = 100, .sink = 4, .window = 16};

  auto const got = run_rq<pqkv::gqa::max>(p, params, n, 100);
  pqkv::cpu::exact_topk<pqkv::gqa::max> const exact{qh, kv, cfg.dim, params};
  pqkv::host_tensor<std::int32_t, 2> want(kv, 100);
  pqkv::host_tensor<float, 2> want_scores(kv, n);
  std::vector<std::int32_t> valid(static_cast<std::size_t>(kv));
  exact(p.q.const_view(), keys.const_view(), n, want.view(), valid, want_scores.view());

  float top = 0.f;
  for (float x : want_scores.storage()) { top = std::isinf(x) ? top : std::max(top, std::abs(x)); }
  for (std::size_t i = 0; i < want_scores.size(); ++i) {
    float const w = want_scores.storage()[i], h = got.scores.storage()[i];
    if (std::isinf(w)) {
      CHECK(h == w);
    } else {
      CHECK(std::abs(h - w) <= 1e-5f * top);
    }
  }
  index_t hits = 0;
  for (index_t g = 0; g < kv; ++g) {
    auto const a = row_of(got.sel, g, 100), b = row_of(want, g, 100);
    std::set<std::int32_t> const sb(b.begin(), b.end());
    for (std::int32_t x : a) { hits += sb.count(x) > 0 ? 1 : 0; }
  }
  CHECK(static_cast<double>(hits) / static_cast<double>(kv * 100) >= 0.99);
  CHECK(got.valid == valid);
}

TEST_CASE("rq_scorer: a KeyScorer; set_tokens; uint16 codes of 8-bit codebooks select as uint8; any thread count")
{
  static_assert(pqkv::KeyScorer<pqkv::cpu::rq_scorer<std::uint16_t, pqkv::gqa::softmax_sum>>);
  problem<std::uint8_t> p(make_cfg(16, 2, 3, 8, true), 8, 4, 150, false, 51);
  pqkv::host_tensor<std::uint16_t, 3> wide(4, 150, 6);
  std::copy(p.codes.storage().begin(), p.codes.storage().end(), wide.storage().begin());
  pqkv::selection_params const params{.k = 16, .sink = 2, .window = 8};
  // CTAD from a mutable codes view and a policy argument
  pqkv::cpu::rq_scorer s8{p.cfg, 8, p.centroids.const_view(), p.codes.view(), 100, params, pqkv::gqa::max{}};
  static_assert(std::is_same_v<decltype(s8), pqkv::cpu::rq_scorer<std::uint8_t, pqkv::gqa::max>>);
  pqkv::cpu::rq_scorer s16{p.cfg, 8, p.centroids.const_view(), wide.const_view(), 100, params, pqkv::gqa::max{}};
  CHECK(s8.kv_heads() == 4);
  CHECK(s8.q_heads() == 8);
  CHECK(s8.scale() == static_cast<float>(1.0 / std::sqrt(16.0)));
  pqkv::host_tensor<std::int32_t, 2> a(4, 16), b(4, 16);
  for (index_t n : {100, 150, 7}) {
    s8.set_tokens(n);
    s16.set_tokens(n);
    CHECK(s8.n_tokens() == n);
    select_through_concept(s8, p.q.const_view(), a.view());
    select_through_concept(s16, p.q.const_view(), b.view());
    CHECK(a.storage() == b.storage());
    auto const want = run_rq<pqkv::gqa::max>(p, params, n, 16);
    CHECK(a.storage() == want.sel.storage());
    CHECK(std::vector<std::int32_t>(s8.valid_counts().begin(), s8.valid_counts().end()) == want.valid);
  }
  pqkv::cpu::set_num_threads(1);
  auto const one = run_rq<pqkv::gqa::softmax_sum>(p, params, 150, 16);
  pqkv::cpu::set_num_threads(3);
  auto const three = run_rq<pqkv::gqa::softmax_sum>(p, params, 150, 16);
  pqkv::cpu::set_num_threads(0);
  CHECK(one.sel.storage() == three.sel.storage());
  CHECK(one.scores.storage() == three.scores.storage());
}

TEST_CASE("rq_scorer: each bad input throws naming it, and nothing is written")
{
  using scorer = pqkv::cpu::rq_scorer<std::uint8_t>;
  problem<std::uint8_t> p(make_cfg(16, 2, 2, 4, true), 4, 2, 30, false, 61);
  pqkv::selection_params const params{.k = 5, .sink = 1, .window = 2};
  auto const cent = p.centroids.const_view();
  auto const codes = p.codes.const_view();
  auto ctor_error = [&](auto&&... args) { return error_message([&] { scorer s{args...}; }); };

  SUBCASE("construction")
  {
    pqkv::host_tensor<std::uint8_t, 3> narrow(2, 30, 3);
    CHECK(ctor_error(p.cfg, index_t{4}, cent, narrow.const_view(), index_t{20}, params)
            .find("rq_scorer: codes.extent(2)=3, key_cfg.splits * key_cfg.stages=4") != std::string::npos);
    pqkv::host_tensor<float, 5> three_heads(3, 2, 2, 16, 8), bad_ksub(1, 2, 2, 8, 8);
    CHECK(ctor_error(p.cfg, index_t{4}, three_heads.const_view(), codes, index_t{20}, params)
            .find("rq_scorer (centroids): centroids.extent(0)=3") != std::string::npos);
    CHECK(ctor_error(p.cfg, index_t{4}, bad_ksub.const_view(), codes, index_t{20}, params)
            .find("centroids.extent(3)=8, 2^config.bits=16") != std::string::npos);
    CHECK(ctor_error(p.cfg, index_t{5}, cent, codes, index_t{20}, params)
            .find("q_heads=5 is not a positive multiple of kv_heads=2") != std::string::npos);
    CHECK(ctor_error(p.cfg, index_t{4}, cent, codes, index_t{31}, params)
            .find("rq_scorer.set_tokens: n_tokens=31 is outside [0, codes.extent(1)=30]") != std::string::npos);
    CHECK(ctor_error(p.cfg, index_t{4}, cent, codes, index_t{-1}, params).find("n_tokens=-1") != std::string::npos);
    CHECK(ctor_error(p.cfg, index_t{4}, cent, pqkv::view<std::uint8_t const, 3>{nullptr, 2, 30, 4}, index_t{20},
                     params)
            .find("codes.data_handle() is null") != std::string::npos);
    CHECK(ctor_error(p.cfg, index_t{4}, pqkv::rq_centroids_view<float const>{nullptr, 1, 2, 2, 16, 8}, codes,
                     index_t{20}, params)
            .find("centroids.data_handle() is null") != std::string::npos);
    pqkv::rq_config wide = p.cfg;
    wide.bits = 10;
    CHECK(ctor_error(wide, index_t{4}, cent, codes, index_t{20}, params)
            .find("codes dtype uint8 is too narrow for bits=10") != std::string::npos);
    pqkv::rq_config bad_splits = p.cfg;
    bad_splits.splits = 3;
    CHECK(ctor_error(bad_splits, index_t{4}, cent, codes, index_t{20}, params).find("rq_scorer: splits=3")
          != std::string::npos);
    CHECK(ctor_error(p.cfg, index_t{4}, cent, codes, index_t{20}, pqkv::selection_params{.k = -1})
            .find("params.k=-1") != std::string::npos);
  }

  SUBCASE("select")
  {
    scorer s{p.cfg, 4, cent, codes, 20, params};
    pqkv::host_tensor<std::int32_t, 2> sel(2, 5);
    s.select(p.q.const_view(), sel.view());
    auto const valid_before = std::vector<std::int32_t>(s.valid_counts().begin(), s.valid_counts().end());
    CHECK(valid_before == std::vector<std::int32_t>{5, 5});
    std::fill(sel.storage().begin(), sel.storage().end(), 4242);
    auto const sel_before = sel.storage();
    auto select_error = [&](auto&& q, auto&&... rest) {
      std::string const msg = error_message([&] { s.select(q, sel.view(), rest...); });
      CHECK(sel.storage() == sel_before);
      CHECK(std::vector<std::int32_t>(s.valid_counts().begin(), s.valid_counts().end()) == valid_before);
      return msg;
    };
    auto const q = p.q.const_view();

    pqkv::host_tensor<float, 2> short_q(4, 8), few_q(2, 16);
    CHECK(select_error(short_q.const_view()).find("rq_scorer.select: q.extent(1)=8, dim=16") != std::string::npos);
    CHECK(select_error(few_q.const_view()).find("rq_scorer.select: q.extent(0)=2, q_heads=4") != std::string::npos);
    CHECK(select_error(pqkv::view<float const, 2>{nullptr, 4, 16}).find("q.data_handle() is null")
          != std::string::npos);
    for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
      pqkv::host_tensor<float, 2> nq = p.q;
      nq.view()(1, 3) = bad;
      std::string const msg = select_error(nq.const_view());
      CHECK(msg.find("rq_scorer.select: q(1, 3)=") != std::string::npos);
      CHECK(msg.find("is not finite") != std::string::npos);
    }
    pqkv::host_tensor<float, 2> short_scores(2, 10);
    CHECK(select_error(q, short_scores.view()).find("scores.extent(1)=10 < n_tokens=20") != std::string::npos);

    p.codes.view()(1, 7, 2) = 16;  // a live code >= 2^4
    CHECK(select_error(q).find("rq_scorer.select (codes): codes(1, 7, 2)=16 >= 2^bits=16") != std::string::npos);
    p.codes.view()(1, 7, 2) = 3;
    p.codes.view()(1, 25, 2) = 200;  // past n_tokens: never read, never checked
    CHECK_NOTHROW(s.select(q, sel.view()));
    p.codes.view()(1, 25, 2) = 0;
    std::fill(sel.storage().begin(), sel.storage().end(), 4242);

    p.centroids.view()(1, 1, 0, 5, 2) = std::numeric_limits<float>::infinity();
    CHECK(select_error(q).find("rq_scorer.select (centroids): centroids element") != std::string::npos);
    p.centroids.view()(1, 1, 0, 5, 2) = 0.5f;

    std::fill(sel.storage().begin(), sel.storage().end(), 4242);
    pqkv::host_tensor<std::int32_t, 2> three_rows(3, 5), narrow(2, 4);
    auto const three_before = three_rows.storage();
    CHECK(error_message([&] { s.select(q, three_rows.view()); }).find("rq_scorer.select: out.extent(0)=3, kv_heads=2")
          != std::string::npos);
    CHECK(three_rows.storage() == three_before);
    CHECK(error_message([&] { s.select(q, narrow.view()); }).find("params.k=5 exceeds out.extent(1)=4")
          != std::string::npos);
    CHECK(error_message([&] { s.select(q, pqkv::selection_view<std::int32_t>{nullptr, 2, 5}); })
            .find("out.data_handle() is null") != std::string::npos);

    CHECK(error_message([&] { s.set_tokens(31); }).find("rq_scorer.set_tokens: n_tokens=31") != std::string::npos);
    CHECK(s.n_tokens() == 20);
  }
}

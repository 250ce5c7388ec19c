// SPDX-License-Identifier: Apache-2.0
#include <pqkv/core/host_tensor.hpp>
#include <pqkv/core/parallel.hpp>
#include <pqkv/core/random.hpp>
#include <pqkv/decode/reconstruct.hpp>
#include <pqkv/score/adc_topk.hpp>
#include <pqkv/score/exact.hpp>
#include <pqkv/score/lut.hpp>

#include "common/test_util.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

namespace {

using pqkv::test::noise;
using pqkv::test::oracle_topk;

using pqkv::index_t;
constexpr float ninf = -std::numeric_limits<float>::infinity();

/// A random PQ problem: queries, codes and centroids of `shape` over n tokens.
struct problem {
  pqkv::adc_shape shape;
  index_t n;
  pqkv::host_tensor<float, 2> q;               // [q_heads, dim]
  pqkv::host_tensor<std::uint8_t, 3> codes;    // [kv_heads, n, m]
  pqkv::host_tensor<float, 4> centroids;       // [kv_heads, m, ksub, dsub]

  problem(pqkv::adc_shape s, index_t tokens, std::uint64_t seed)
    : shape{s}, n{tokens}, q(s.q_heads, s.dim), codes(s.kv_heads, tokens, s.m),
      centroids(s.kv_heads, s.m, s.ksub(), s.dsub())
  {
    for (std::size_t i = 0; i < q.size(); ++i) { q.data()[i] = noise(seed, i); }
    for (std::size_t i = 0; i < centroids.size(); ++i) { centroids.data()[i] = noise(seed + 1, i); }
    for (std::size_t i = 0; i < codes.size(); ++i) {
      codes.data()[i] = static_cast<std::uint8_t>(pqkv::detail::random_below(seed, 2, i, s.ksub()));
    }
  }
};

/// Output buffers of one selection call.
struct result {
  pqkv::host_tensor<std::int32_t, 2> sel;
  std::vector<std::int32_t> valid;
  pqkv::host_tensor<float, 2> scores;
  result(index_t kv_heads, index_t k_cap, index_t n) : sel(kv_heads, k_cap), valid(kv_heads, -7), scores(kv_heads, n)
  {
    std::fill(sel.storage().begin(), sel.storage().end(), 4242);
  }
  std::vector<std::int32_t> row(index_t g) const
  {
    auto const b = sel.storage().begin() + g * sel.extent(1);
    return {b, b + sel.extent(1)};
  }
};

template <class Agg>
result run_adc(problem const& p, pqkv::selection_params const& params, index_t k_cap, index_t n_tokens = -1)
{
  index_t const n = n_tokens < 0 ? p.n : n_tokens;
  result r(p.shape.kv_heads, k_cap, std::max<index_t>(n, 1));
  pqkv::cpu::adc_topk<Agg> const op{p.shape, params};
  op(p.q.const_view(), p.codes.const_view(), p.centroids.const_view(), n, r.sel.view(), r.valid, r.scores.view());
  return r;
}

/// The contract of score/adc_topk.hpp written out plainly for sum and max:
/// aggregated score of every token (-inf outside the candidates).
template <class Agg>
std::vector<float> contract_scores(problem const& p, index_t g, index_t sink, index_t window, float scale)
{
  auto const q = p.q.const_view();
  auto const codes = p.codes.const_view();
  auto const c = p.centroids.const_view();
  index_t const r = p.shape.group(), dsub = p.shape.dsub();
  std::vector<float> logits(static_cast<std::size_t>(r * p.n), 0.f);
  for (index_t hl = 0; hl < r; ++hl) {
    for (index_t t = 0; t < p.n; ++t) {
      float s = 0.f;
      for (index_t j = 0; j < p.shape.m; ++j) {
        float lut = 0.f;
        for (index_t i = 0; i < dsub; ++i) {
          lut = std::fma(q(g * r + hl, j * dsub + i), c(g, j, codes(g, t, j), i), lut);
        }
        s = s + lut;
      }
      logits[static_cast<std::size_t>(hl * p.n + t)] = scale * s;
    }
  }
  std::vector<float> out(static_cast<std::size_t>(p.n), ninf);
  Agg const agg{};
  for (index_t t = sink; t < p.n - window; ++t) {
    float acc = agg.init();
    for (index_t hl = 0; hl < r; ++hl) { acc = agg.combine(acc, logits[static_cast<std::size_t>(hl * p.n + t)]); }
    out[static_cast<std::size_t>(t)] = agg.finish(acc);
  }
  return out;
}

std::vector<float> score_row(result const& r, index_t g, index_t n)
{
  auto const b = r.scores.storage().begin() + g * r.scores.extent(1);
  return {b, b + n};
}

}  // namespace

TEST_CASE("adc_topk: ADC logit equals scale * q . reconstructed key")
{
  problem const p({.q_heads = 3, .kv_heads = 3, .dim = 32, .m = 8, .nbits = 5}, 60, 21);
  pqkv::selection_params const params{.k = 5, .scale = 0.75f};
  auto const r = run_adc<pqkv::gqa::sum>(p, params, 5);  // one q head per group: the score is the logit
  pqkv::host_tensor<float, 3> keys(3, p.n, 32);
  pqkv::cpu::reconstruct(p.codes.const_view(), p.centroids.const_view(), keys.view());
  for (index_t g = 0; g < 3; ++g) {
    for (index_t t = 0; t < p.n; ++t) {
      double dot = 0, mag = 0;
      for (index_t d = 0; d < 32; ++d) {
        dot += static_cast<double>(p.q.view()(g, d)) * keys.view()(g, t, d);
        mag += std::abs(static_cast<double>(p.q.view()(g, d)) * keys.view()(g, t, d));
      }
      CHECK(std::abs(r.scores.view()(g, t) - 0.75 * dot) <= 1e-6 * mag + 1e-7);
    }
  }
}

TEST_CASE("adc_topk: build_lut entries are the contract's fma chain")
{
  problem const p({.q_heads = 4, .kv_heads = 2, .dim = 12, .m = 3, .nbits = 3}, 1, 4);
  pqkv::host_tensor<float, 3> lut(4, 3, 8);
  pqkv::cpu::build_lut(p.q.const_view(), p.centroids.const_view(), lut.view());
  for (index_t h = 0; h < 4; ++h) {
    for (index_t j = 0; j < 3; ++j) {
      for (index_t c = 0; c < 8; ++c) {
        float acc = 0.f;
        for (index_t i = 0; i < 4; ++i) {
          acc = std::fma(p.q.view()(h, j * 4 + i), p.centroids.view()(h / 2, j, c, i), acc);
        }
        CHECK(lut.view()(h, j, c) == acc);
      }
    }
  }
}

TEST_CASE_TEMPLATE("adc_topk: scores match the contract bit for bit and the selection is their top-k", Agg,
                   pqkv::gqa::sum, pqkv::gqa::max)
{
  for (index_t r : {1, 2, 3, 4, 8}) {
    problem const p({.q_heads = 2 * r, .kv_heads = 2, .dim = 16, .m = 4, .nbits = 3}, 300, 100 + r);
    pqkv::selection_params const params{.k = 20, .sink = 3, .window = 7};
    auto const res = run_adc<Agg>(p, params, 24);
    float const scale = 1.f / 4.f;  // 1 / sqrt(16)
    for (index_t g = 0; g < 2; ++g) {
      CAPTURE(r);
      CAPTURE(g);
      auto const want = contract_scores<Agg>(p, g, 3, 7, scale);
      CHECK(score_row(res, g, p.n) == want);  // -inf outside the candidates, same bits inside
      CHECK(res.row(g) == oracle_topk(want, 3, p.n - 7, 20, 24));
      CHECK(res.valid[static_cast<std::size_t>(g)] == 20);
    }
  }
}

TEST_CASE_TEMPLATE("adc_topk: half and bf16 queries score as their float widening", Q, __half, __nv_bfloat16)
{
  problem p({.q_heads = 8, .kv_heads = 2, .dim = 32, .m = 8, .nbits = 5}, 400, 77);
  pqkv::host_tensor<Q, 2> qn(p.shape.q_heads, p.shape.dim);
  for (std::size_t i = 0; i < p.q.size(); ++i) {
    qn.data()[i] = pqkv::from_float<Q>(p.q.data()[i]);
    p.q.data()[i] = pqkv::to_float(qn.data()[i]);  // the float queries the narrow ones widen to
  }
  pqkv::selection_params const params{.k = 25, .sink = 2, .window = 5};
  auto const want = run_adc<pqkv::gqa::softmax_sum>(p, params, 30);
  result got(2, 30, p.n);
  pqkv::cpu::adc_topk<pqkv::gqa::softmax_sum> const op{p.shape, params};
  op(qn.const_view(), p.codes.const_view(), p.centroids.const_view(), p.n, got.sel.view(), got.valid,
     got.scores.view());
  CHECK(got.sel.storage() == want.sel.storage());
  CHECK(got.valid == want.valid);
  CHECK(got.scores.storage() == want.scores.storage());
}

TEST_CASE("adc_topk: GQA policies on a hand-computed case")
{
  // m = 1, dsub = 2, 4 centroids; q head h reads KV head h / 2. KV head 1 holds
  // KV head 0's centroids negated and its codes reversed, and its queries are
  // negated too, so its logits are KV head 0's in reverse token order.
  pqkv::adc_shape const shape{.q_heads = 4, .kv_heads = 2, .dim = 2, .m = 1, .nbits = 2};
  problem p(shape, 4, 0);
  float const cents[] = {4, -3, 1, 1, 2.5f, 0, -1, -1};
  float const queries[] = {1, 0, 0, 1, -1, 0, 0, -1};
  std::copy(std::begin(queries), std::end(queries), p.q.data());
  for (int i = 0; i < 8; ++i) {
    p.centroids.data()[i] = cents[i];
    p.centroids.data()[8 + i] = -cents[i];
  }
  for (std::uint8_t t = 0; t < 4; ++t) {
    p.codes.view()(0, t, 0) = t;
    p.codes.view()(1, t, 0) = static_cast<std::uint8_t>(3 - t);
  }
  // Logits of KV head 0's q heads over tokens 0..3 (scale 1):
  double const l0[] = {4, 1, 2.5, -1};   // q0 = (1, 0)
  double const l1[] = {-3, 1, 0, -1};    // q1 = (0, 1)
  pqkv::selection_params const params{.k = 2, .scale = 1.f};

  auto check_scores = [&](result const& r, auto expected) {
    for (index_t t = 0; t < 4; ++t) {
      CHECK(r.scores.view()(0, t) == doctest::Approx(expected(t)).epsilon(1e-6));
      CHECK(r.scores.view()(1, 3 - t) == doctest::Approx(expected(t)).epsilon(1e-6));
    }
  };
  {
    auto const r = run_adc<pqkv::gqa::sum>(p, params, 2);  // [1, 2, 2.5, -2]
    check_scores(r, [&](index_t t) { return l0[t] + l1[t]; });
    CHECK(r.row(0) == std::vector<std::int32_t>{1, 2});
    CHECK(r.row(1) == std::vector<std::int32_t>{1, 2});
  }
  {
    auto const r = run_adc<pqkv::gqa::max>(p, params, 2);  // [4, 1, 2.5, -1]
    check_scores(r, [&](index_t t) { return std::max(l0[t], l1[t]); });
    CHECK(r.row(0) == std::vector<std::int32_t>{0, 2});
    CHECK(r.row(1) == std::vector<std::int32_t>{1, 3});
  }
  {
    // softmax rows: [0.7815, 0.0389, 0.1744, 0.0053] + [0.0120, 0.6572, 0.2418, 0.0889]
    auto softmax = [](double const* l, index_t t) {
      double z = 0;
      for (int i = 0; i < 4; ++i) { z += std::exp(l[i]); }
      return std::exp(l[t]) / z;
    };
    auto const r = run_adc<pqkv::gqa::softmax_sum>(p, params, 2);  // [0.794, 0.696, 0.416, 0.094]
    check_scores(r, [&](index_t t) { return softmax(l0, t) + softmax(l1, t); });
    CHECK(r.row(0) == std::vector<std::int32_t>{0, 1});
    CHECK(r.row(1) == std::vector<std::int32_t>{2, 3});
  }
}

TEST_CASE("adc_topk: softmax_sum scores are per-head softmaxes over the candidates only")
{
  problem const p({.q_heads = 8, .kv_heads = 2, .dim = 16, .m = 4, .nbits = 4}, 90, 8);
  pqkv::selection_params const params{.k = 10, .sink = 5, .window = 11};
  auto const r = run_adc<pqkv::gqa::softmax_sum>(p, params, 10);
  for (index_t g = 0; g < 2; ++g) {
    // Per q head logits, from one-head scorers over that head alone.
    std::vector<double> agg(static_cast<std::size_t>(p.n), 0.0);
    for (index_t hl = 0; hl < 4; ++hl) {
      problem one({.q_heads = 1, .kv_heads = 1, .dim = 16, .m = 4, .nbits = 4}, p.n, 0);
      for (index_t d = 0; d < 16; ++d) { one.q.view()(0, d) = p.q.view()(g * 4 + hl, d); }
      std::copy_n(&p.codes.view()(g, 0, 0), p.n * 4, one.codes.data());
      std::copy_n(&p.centroids.view()(g, 0, 0, 0), 4 * 16 * 4, one.centroids.data());
      auto const l = run_adc<pqkv::gqa::sum>(one, params, 10);
      double mx = -1e300, z = 0;
      for (index_t t = 5; t < p.n - 11; ++t) { mx = std::max(mx, static_cast<double>(l.scores.view()(0, t))); }
      for (index_t t = 5; t < p.n - 11; ++t) { z += std::exp(l.scores.view()(0, t) - mx); }
      for (index_t t = 5; t < p.n - 11; ++t) {
        agg[static_cast<std::size_t>(t)] += std::exp(l.scores.view()(0, t) - mx) / z;
      }
    }
    double total = 0;
    for (index_t t = 0; t < p.n; ++t) {
      if (t < 5 || t >= p.n - 11) {
        CHECK(r.scores.view()(g, t) == ninf);
        continue;
      }
      CHECK(r.scores.view()(g, t) == doctest::Approx(agg[static_cast<std::size_t>(t)]).epsilon(1e-5));
      total += r.scores.view()(g, t);
    }
    CHECK(total == doctest::Approx(4.0).epsilon(1e-5));  // four probability rows
    CHECK(r.valid[static_cast<std::size_t>(g)] == 10);
  }
}

TEST_CASE("adc_topk: sink and window tokens are never selected, even with the best scores")
{
  pqkv::adc_shape const shape{.q_heads = 2, .kv_heads = 1, .dim = 4, .m = 1, .nbits = 1};
  problem p(shape, 10, 1);
  // centroid 1 is aligned with both queries, centroid 0 opposed.
  float const cents[] = {-1, -1, -1, -1, 1, 1, 1, 1};
  std::copy(std::begin(cents), std::end(cents), p.centroids.data());
  std::fill(p.q.storage().begin(), p.q.storage().end(), 1.f);
  std::uint8_t const codes[] = {1, 1, 0, 1, 0, 0, 1, 1, 1, 1};  // best tokens: 0, 1, 3, 6..9
  std::copy(std::begin(codes), std::end(codes), p.codes.data());
  pqkv::selection_params const params{.k = 2, .sink = 2, .window = 3};  // candidates 2..6
  auto const r = run_adc<pqkv::gqa::softmax_sum>(p, params, 4);
  CHECK(r.row(0) == std::vector<std::int32_t>{3, 6, -1, -1});
  CHECK(r.valid[0] == 2);
  for (index_t t : {0, 1, 7, 8, 9}) { CHECK(r.scores.view()(0, t) == ninf); }
  auto const all = run_adc<pqkv::gqa::max>(p, {.k = 10, .sink = 2, .window = 3}, 12);
  CHECK(all.row(0) == std::vector<std::int32_t>{2, 3, 4, 5, 6, -1, -1, -1, -1, -1, -1, -1});
  CHECK(all.valid[0] == 5);
}

TEST_CASE("adc_topk: k above the candidates, n = 0, tiny n and sink + window >= n")
{
  problem const p({.q_heads = 4, .kv_heads = 2, .dim = 8, .m = 2, .nbits = 2}, 6, 3);
  auto rows_are = [](result const& r, std::vector<std::int32_t> const& want, std::int32_t valid) {
    for (index_t g = 0; g < 2; ++g) {
      CHECK(r.row(g) == want);
      CHECK(r.valid[static_cast<std::size_t>(g)] == valid);
    }
  };
  rows_are(run_adc<pqkv::gqa::sum>(p, {.k = 9}, 9), {0, 1, 2, 3, 4, 5, -1, -1, -1}, 6);
  rows_are(run_adc<pqkv::gqa::sum>(p, {.k = 3}, 3, 0), {-1, -1, -1}, 0);  // n = 0
  rows_are(run_adc<pqkv::gqa::softmax_sum>(p, {.k = 3}, 4, 1), {0, -1, -1, -1}, 1);
  rows_are(run_adc<pqkv::gqa::max>(p, {.k = 3, .sink = 1}, 3, 2), {1, -1, -1}, 1);
  rows_are(run_adc<pqkv::gqa::max>(p, {.k = 3, .sink = 1, .window = 1}, 3, 2), {-1, -1, -1}, 0);
  rows_are(run_adc<pqkv::gqa::softmax_sum>(p, {.k = 3, .sink = 4, .window = 2}, 3), {-1, -1, -1}, 0);
  rows_are(run_adc<pqkv::gqa::softmax_sum>(p, {.k = 3, .sink = 9, .window = 0}, 3), {-1, -1, -1}, 0);
  rows_are(run_adc<pqkv::gqa::sum>(p, {.k = 0}, 2), {-1, -1}, 0);
  auto const empty = run_adc<pqkv::gqa::sum>(p, {.k = 3, .sink = 4, .window = 2}, 3);
  for (index_t t = 0; t < 6; ++t) { CHECK(empty.scores.view()(1, t) == ninf); }
}

TEST_CASE("adc_topk: equal scores select the lowest candidates; tokens past n_tokens are ignored")
{
  problem p({.q_heads = 4, .kv_heads = 1, .dim = 8, .m = 2, .nbits = 4}, 40, 5);
  std::fill(p.codes.storage().begin(), p.codes.storage().end(), std::uint8_t{3});
  auto const r = run_adc<pqkv::gqa::softmax_sum>(p, {.k = 4, .sink = 2}, 4, 30);
  CHECK(r.row(0) == std::vector<std::int32_t>{2, 3, 4, 5});

  // Centroid 15 of each subspace is the sum of the queries there, every other
  // centroid is 0: tokens coded 15 score |sum q|^2 * scale, the rest 0.
  std::fill(p.centroids.storage().begin(), p.centroids.storage().end(), 0.f);
  for (index_t j = 0; j < 2; ++j) {
    for (index_t i = 0; i < 4; ++i) {
      for (index_t h = 0; h < 4; ++h) { p.centroids.view()(0, j, 15, i) += p.q.view()(h, j * 4 + i); }
    }
  }
  std::fill(p.codes.storage().begin(), p.codes.storage().end(), std::uint8_t{0});
  std::fill(p.codes.storage().begin() + 30 * 2, p.codes.storage().end(), std::uint8_t{15});
  auto const limited = run_adc<pqkv::gqa::sum>(p, {.k = 3}, 3, 30);
  CHECK(limited.row(0) == std::vector<std::int32_t>{0, 1, 2});
  auto const whole = run_adc<pqkv::gqa::sum>(p, {.k = 3}, 3, 40);
  CHECK(whole.row(0) == std::vector<std::int32_t>{30, 31, 32});
}

TEST_CASE("adc_topk: results do not depend on the thread count")
{
  problem const p({.q_heads = 12, .kv_heads = 4, .dim = 32, .m = 8, .nbits = 8}, 500, 77);
  pqkv::selection_params const params{.k = 50, .sink = 4, .window = 16};
  pqkv::cpu::set_num_threads(1);
  auto const a = run_adc<pqkv::gqa::softmax_sum>(p, params, 50);
  pqkv::cpu::set_num_threads(3);
  auto const b = run_adc<pqkv::gqa::softmax_sum>(p, params, 50);
  pqkv::cpu::set_num_threads(0);
  CHECK(a.sel.storage() == b.sel.storage());
  CHECK(a.scores.storage() == b.scores.storage());
  CHECK(a.valid == b.valid);
}

TEST_CASE("pq_scorer: a KeyScorer that selects as adc_topk does, over the live tokens")
{
  static_assert(pqkv::KeyScorer<pqkv::cpu::pq_scorer<pqkv::gqa::sum>>);
  problem const p({.q_heads = 8, .kv_heads = 2, .dim = 16, .m = 4, .nbits = 6}, 120, 9);
  pqkv::selection_params const params{.k = 16, .sink = 2, .window = 8};
  pqkv::cpu::pq_scorer<> scorer{p.shape, params, p.codes.const_view(), p.centroids.const_view(), 100};
  CHECK(scorer.kv_heads() == 2);
  pqkv::host_tensor<std::int32_t, 2> sel(2, 16);
  for (index_t n : {100, 120, 7}) {
    scorer.set_tokens(n);
    scorer.select(p.q.const_view(), sel.view());
    auto const want = run_adc<pqkv::gqa::softmax_sum>(p, params, 16, n);
    CHECK(sel.storage() == want.sel.storage());
    CHECK(std::vector<std::int32_t>(scorer.valid_counts().begin(), scorer.valid_counts().end()) == want.valid);
  }
  CHECK_THROWS_WITH_AS(scorer.set_tokens(121), doctest::Contains("n_tokens=121"), pqkv::error);
}

TEST_CASE("exact_scorer: finds planted needles; sum scores match the contract")
{
  index_t const kv_heads = 2, r = 2, dim = 16, n = 200;
  pqkv::host_tensor<float, 3> keys(kv_heads, n, dim);
  pqkv::host_tensor<float, 2> q(kv_heads * r, dim);
  for (std::size_t i = 0; i < keys.size(); ++i) { keys.data()[i] = 0.3f * noise(31, i); }
  for (std::size_t i = 0; i < q.size(); ++i) { q.data()[i] = noise(32, i); }
  // Needles: keys along the sum of the group's queries, some in the sink / window.
  std::vector<std::vector<index_t>> const needles{{0, 17, 58, 123, 199}, {3, 99, 150, 151, 197}};
  for (index_t g = 0; g < kv_heads; ++g) {
    for (index_t t : needles[static_cast<std::size_t>(g)]) {
      for (index_t d = 0; d < dim; ++d) { keys.view()(g, t, d) = 2.f * (q.view()(g * r, d) + q.view()(g * r + 1, d)); }
    }
  }
  pqkv::selection_params const params{.k = 4, .sink = 2, .window = 4};
  pqkv::cpu::exact_scorer scorer{kv_heads * r, keys.const_view(), n, params, pqkv::gqa::sum{}};
  static_assert(pqkv::KeyScorer<decltype(scorer)>);
  pqkv::host_tensor<std::int32_t, 2> sel(kv_heads, 4);
  scorer.select(q.const_view(), sel.view());
  auto row = [&](index_t g) {
    return std::vector<std::int32_t>(sel.storage().begin() + g * 4, sel.storage().begin() + g * 4 + 4);
  };
  // KV head 0: needles 17, 58, 123 are candidates (0 is a sink, 199 in the window), plus one other token.
  auto const r0 = row(0);
  for (std::int32_t t : {17, 58, 123}) { CHECK(std::count(r0.begin(), r0.end(), t) == 1); }
  CHECK(std::count(r0.begin(), r0.end(), 0) == 0);
  CHECK(std::count(r0.begin(), r0.end(), 199) == 0);
  CHECK(row(1) == std::vector<std::int32_t>{3, 99, 150, 151});  // 197 is in the window

  // Scores: scale * fma chain over dim, summed over the group's heads in order.
  result res(kv_heads, 4, n);
  pqkv::cpu::exact_topk<pqkv::gqa::sum> const op{kv_heads * r, kv_heads, dim, params};
  op(q.const_view(), keys.const_view(), n, res.sel.view(), res.valid, res.scores.view());
  for (index_t g = 0; g < kv_heads; ++g) {
    std::vector<float> logit(static_cast<std::size_t>(r * n));
    for (index_t hl = 0; hl < r; ++hl) {
      for (index_t t = 0; t < n; ++t) {
        float dot = 0.f;
        for (index_t d = 0; d < dim; ++d) { dot = std::fma(q.view()(g * r + hl, d), keys.view()(g, t, d), dot); }
        logit[static_cast<std::size_t>(hl * n + t)] = 0.25f * dot;
      }
    }
    for (index_t t = 2; t < n - 4; ++t) {
      float acc = 0.f;
      for (index_t hl = 0; hl < r; ++hl) { acc = acc + logit[static_cast<std::size_t>(hl * n + t)]; }
      CHECK(res.scores.view()(g, t) == acc);
    }
    CHECK(res.scores.view()(g, 1) == ninf);
    CHECK(res.scores.view()(g, n - 1) == ninf);
  }
}

TEST_CASE("exact_topk: half and bf16 keys select as their float values; PQ with exact codes agrees")
{
  index_t const kv_heads = 2, dim = 8, n = 64;
  problem const p({.q_heads = 4, .kv_heads = kv_heads, .dim = dim, .m = 4, .nbits = 4}, n, 12);
  pqkv::host_tensor<float, 3> keys(kv_heads, n, dim);
  pqkv::cpu::reconstruct(p.codes.const_view(), p.centroids.const_view(), keys.view());
  pqkv::host_tensor<__half, 3> kh(kv_heads, n, dim);
  pqkv::host_tensor<float, 3> kf(kv_heads, n, dim);
  for (std::size_t i = 0; i < keys.size(); ++i) {
    kh.data()[i] = pqkv::from_float<__half>(keys.data()[i]);
    kf.data()[i] = pqkv::to_float(kh.data()[i]);
  }
  pqkv::selection_params const params{.k = 12, .sink = 1, .window = 3};
  pqkv::cpu::exact_topk<pqkv::gqa::max> const op{4, kv_heads, dim, params};
  result a(kv_heads, 12, n), b(kv_heads, 12, n);
  op(p.q.const_view(), kh.const_view(), n, a.sel.view(), a.valid, a.scores.view());
  op(p.q.const_view(), kf.const_view(), n, b.sel.view(), b.valid, b.scores.view());
  CHECK(a.sel.storage() == b.sel.storage());
  CHECK(a.scores.storage() == b.scores.storage());

  // The keys are their PQ reconstruction, so ADC and exact logits agree to
  // rounding: the selections overlap almost entirely.
  result c(kv_heads, 12, n);
  op(p.q.const_view(), keys.const_view(), n, c.sel.view(), c.valid, c.scores.view());
  auto const adc = run_adc<pqkv::gqa::max>(p, params, 12);
  for (index_t g = 0; g < kv_heads; ++g) {
    for (index_t t = 1; t < n - 3; ++t) {
      CHECK(adc.scores.view()(g, t) == doctest::Approx(c.scores.view()(g, t)).epsilon(1e-5).scale(1.0));
    }
  }
}

TEST_CASE("adc_topk: each bad input throws naming it")
{
  problem p({.q_heads = 4, .kv_heads = 2, .dim = 8, .m = 2, .nbits = 3}, 10, 2);
  pqkv::selection_params const params{.k = 3};
  pqkv::cpu::adc_topk<pqkv::gqa::sum> const op{p.shape, params};
  pqkv::host_tensor<std::int32_t, 2> sel(2, 3);
  std::vector<std::int32_t> valid(2);
  auto call = [&](index_t n, pqkv::selection_view<std::int32_t> out, std::span<std::int32_t> vc,
                  pqkv::view<float, 2> scores = {}) {
    op(p.q.const_view(), p.codes.const_view(), p.centroids.const_view(), n, out, vc, scores);
  };
  using doctest::Contains;
  CHECK_THROWS_WITH_AS((pqkv::cpu::adc_topk<pqkv::gqa::sum>{p.shape, {.k = -1}}), Contains("params.k=-1"),
                       pqkv::error);
  CHECK_THROWS_WITH_AS((pqkv::cpu::adc_topk<pqkv::gqa::sum>{p.shape, {.sink = -2}}), Contains("params.sink=-2"),
                       pqkv::error);
  CHECK_THROWS_WITH_AS((pqkv::cpu::adc_topk<pqkv::gqa::sum>{p.shape, {.window = -3}}),
                       Contains("params.window=-3"), pqkv::error);
  CHECK_THROWS_WITH_AS((pqkv::cpu::adc_topk<pqkv::gqa::sum>{p.shape, {.scale = -1.f}}), Contains("params.scale="),
                       pqkv::error);
  CHECK_THROWS_WITH_AS(
    (pqkv::cpu::adc_topk<pqkv::gqa::sum>{{.q_heads = 6, .kv_heads = 4, .dim = 8, .m = 2, .nbits = 3}, params}),
    Contains("q_heads=6"), pqkv::error);
  CHECK_THROWS_WITH_AS(
    (pqkv::cpu::adc_topk<pqkv::gqa::sum>{{.q_heads = 4, .kv_heads = 2, .dim = 8, .m = 3, .nbits = 3}, params}),
    Contains("m=3"), pqkv::error);
  CHECK_THROWS_WITH_AS(
    (pqkv::cpu::adc_topk<pqkv::gqa::sum>{pqkv::pq_config{.dim = 8, .m = 2, .nbits = 9}, 4, 2, params}),
    Contains("nbits=9"), pqkv::error);

  pqkv::host_tensor<std::int32_t, 2> narrow(2, 2), few_rows(1, 3);
  CHECK_THROWS_WITH_AS(call(10, narrow.view(), valid), Contains("out.extent(1)=2"), pqkv::error);
  CHECK_THROWS_WITH_AS(call(10, few_rows.view(), valid), Contains("out.extent(0)=1"), pqkv::error);
  CHECK_THROWS_WITH_AS(call(11, sel.view(), valid), Contains("n_tokens=11"), pqkv::error);
  CHECK_THROWS_WITH_AS(call(-1, sel.view(), valid), Contains("n_tokens=-1"), pqkv::error);
  std::vector<std::int32_t> short_valid(1);
  CHECK_THROWS_WITH_AS(call(10, sel.view(), short_valid), Contains("valid_counts.size()=1"), pqkv::error);
  pqkv::host_tensor<float, 2> short_scores(2, 9);
  CHECK_THROWS_WITH_AS(call(10, sel.view(), valid, short_scores.view()), Contains("scores.extent(1)=9"),
                       pqkv::error);

  pqkv::host_tensor<std::uint8_t, 3> wrong_m(2, 10, 4), wrong_heads(3, 10, 2);
  CHECK_THROWS_WITH_AS(op(p.q.const_view(), wrong_m.const_view(), p.centroids.const_view(), 10, sel.view(), valid),
                       Contains("codes.extent(2)=4"), pqkv::error);
  CHECK_THROWS_WITH_AS(
    op(p.q.const_view(), wrong_heads.const_view(), p.centroids.const_view(), 10, sel.view(), valid),
    Contains("codes.extent(0)=3"), pqkv::error);
  pqkv::host_tensor<float, 4> wrong_ksub(2, 2, 16, 4), wrong_dsub(2, 2, 8, 2);
  CHECK_THROWS_WITH_AS(op(p.q.const_view(), p.codes.const_view(), wrong_ksub.const_view(), 10, sel.view(), valid),
                       Contains("centroids.extent(2)=16"), pqkv::error);
  CHECK_THROWS_WITH_AS(op(p.q.const_view(), p.codes.const_view(), wrong_dsub.const_view(), 10, sel.view(), valid),
                       Contains("centroids.extent(3)=2"), pqkv::error);
  pqkv::host_tensor<float, 2> wrong_q(2, 8);
  CHECK_THROWS_WITH_AS(op(wrong_q.const_view(), p.codes.const_view(), p.centroids.const_view(), 10, sel.view(), valid),
                       Contains("q.extent(0)=2"), pqkv::error);

  std::fill(sel.storage().begin(), sel.storage().end(), 77);
  std::fill(valid.begin(), valid.end(), 77);
  p.q.view()(3, 5) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH_AS(call(10, sel.view(), valid), Contains("q(3, 5)=nan"), pqkv::error);
  p.q.view()(3, 5) = -std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH_AS(call(10, sel.view(), valid), Contains("q(3, 5)=-inf"), pqkv::error);
  p.q.view()(3, 5) = 0.f;
  p.centroids.view()(1, 0, 7, 2) = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH_AS(call(10, sel.view(), valid), Contains("centroids(1, 0, 7, 2)=inf"), pqkv::error);
  p.centroids.view()(1, 0, 7, 2) = 0.f;
  p.codes.view()(1, 6, 1) = 8;  // ksub = 8
  CHECK_THROWS_WITH_AS(call(10, sel.view(), valid), Contains("codes(1, 6, 1)=8"), pqkv::error);
  // Nothing was written by the calls that threw.
  CHECK(std::all_of(sel.storage().begin(), sel.storage().end(), [](std::int32_t x) { return x == 77; }));
  CHECK(std::all_of(valid.begin(), valid.end(), [](std::int32_t x) { return x == 77; }));
  CHECK_NOTHROW(call(6, sel.view(), valid));  // the bad code is past n_tokens
}

TEST_CASE("exact_topk and pq_scorer: bad inputs throw naming them")
{
  using doctest::Contains;
  pqkv::host_tensor<float, 3> keys(2, 10, 8);
  pqkv::host_tensor<float, 2> q(4, 8);
  pqkv::host_tensor<std::int32_t, 2> sel(2, 3);
  std::vector<std::int32_t> valid(2);
  pqkv::cpu::exact_topk<> const op{4, 2, 8, {.k = 3}};
  CHECK_THROWS_WITH_AS((pqkv::cpu::exact_topk<>{5, 2, 8, {.k = 3}}), Contains("q_heads=5"), pqkv::error);
  CHECK_THROWS_WITH_AS(op(q.const_view(), keys.const_view(), 11, sel.view(), valid), Contains("n_tokens=11"),
                       pqkv::error);
  pqkv::host_tensor<float, 3> wide(2, 10, 16);
  CHECK_THROWS_WITH_AS(op(q.const_view(), wide.const_view(), 10, sel.view(), valid), Contains("keys.extent(2)=16"),
                       pqkv::error);
  keys.view()(1, 4, 3) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH_AS(op(q.const_view(), keys.const_view(), 10, sel.view(), valid), Contains("keys(1, 4, 3)=nan"),
                       pqkv::error);
  q.view()(0, 0) = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH_AS(op(q.const_view(), keys.const_view(), 10, sel.view(), valid), Contains("q(0, 0)=inf"),
                       pqkv::error);

  pqkv::adc_shape const shape{.q_heads = 4, .kv_heads = 2, .dim = 8, .m = 2, .nbits = 3};
  pqkv::host_tensor<std::uint8_t, 3> codes(2, 10, 2), wrong_m(2, 10, 4);
  pqkv::host_tensor<float, 4> cents(2, 2, 8, 4), wrong_cents(2, 4, 8, 2);
  CHECK_THROWS_WITH_AS((pqkv::cpu::pq_scorer<>{shape, {.k = 3}, codes.const_view(), cents.const_view(), 11}),
                       Contains("n_tokens=11"), pqkv::error);
  CHECK_THROWS_WITH_AS((pqkv::cpu::pq_scorer<>{shape, {.k = 3}, wrong_m.const_view(), cents.const_view(), 10}),
                       Contains("codes.extent(2)=4"), pqkv::error);
  CHECK_THROWS_WITH_AS((pqkv::cpu::pq_scorer<>{shape, {.k = 3}, codes.const_view(), wrong_cents.const_view(), 10}),
                       Contains("centroids.extent(1)=4"), pqkv::error);
}

TEST_CASE("docs/score.md example")
{
  problem const p({.q_heads = 32, .kv_heads = 8, .dim = 128, .m = 16, .nbits = 8}, 301, 6);
  auto const codes = p.codes.const_view();
  auto const centroids = p.centroids.const_view();
  auto const q = p.q.const_view();
  index_t const n_tokens = 300;
  // example-begin (docs/score.md)
  pqkv::adc_shape const shape{.q_heads = 32, .kv_heads = 8, .dim = 128, .m = 16, .nbits = 8};
  pqkv::selection_params const params{.k = 2048, .sink = 4, .window = 64};
  pqkv::cpu::pq_scorer<pqkv::gqa::softmax_sum> scorer{shape, params, codes, centroids, n_tokens};
  pqkv::host_tensor<std::int32_t, 2> selection(shape.kv_heads, params.k);  // [kv_heads, k]
  scorer.select(q, selection.view());               // one decode step
  // ... append the step's token to codes, then
  scorer.set_tokens(n_tokens + 1);
  // example-end
  for (index_t g = 0; g < 8; ++g) {
    CHECK(selection.view()(g, 0) == 4);
    CHECK(selection.view()(g, 231) == 235);  // all 232 candidates [4, 236), then padding
    CHECK(selection.view()(g, 232) == -1);
    CHECK(scorer.valid_counts()[static_cast<std::size_t>(g)] == 232);
  }
  scorer.select(q, selection.view());
  CHECK(selection.view()(0, 232) == 236);
}

#if __has_include("common/keygen.hpp")
#  include "common/keygen.hpp"
#  include <pqkv/attend/dense.hpp>
#  include <pqkv/attend/metrics.hpp>
#  include <pqkv/encode/encode.hpp>

TEST_CASE("pq_scorer: on synthetic keys, PQ (m=16, 8 bits) keeps far more attention than chance")
{
  // Centroids are random key sub-vectors (no k-means), so this checks the
  // scoring path on realistic keys, not the trainer.
  pqkv::test::keygen_config const cfg{.kv_heads = 2, .q_per_kv = 4, .dim = 128, .tokens = 2048, .seed = 3};
  auto const kv = pqkv::test::make_kv(cfg);
  pqkv::pq_config const pq{.dim = 128, .m = 16, .nbits = 8};
  pqkv::host_tensor<float, 4> cents(cfg.kv_heads, pq.m, pq.ksub(), pq.dsub());
  for (index_t h = 0; h < cfg.kv_heads; ++h) {
    for (index_t j = 0; j < pq.m; ++j) {
      for (index_t c = 0; c < pq.ksub(); ++c) {
        auto const t = static_cast<index_t>(pqkv::detail::random_below(9, static_cast<std::uint64_t>(h * pq.m + j),
                                                                       static_cast<std::uint64_t>(c), cfg.tokens));
        for (index_t i = 0; i < pq.dsub(); ++i) { cents.view()(h, j, c, i) = kv.keys.view()(h, t, j * pq.dsub() + i); }
      }
    }
  }
  pqkv::host_tensor<std::uint8_t, 3> codes(cfg.kv_heads, cfg.tokens, pq.m);
  pqkv::cpu::pq_encoder{pq}.encode(kv.keys.const_view(), cents.const_view(), codes.view());

  pqkv::selection_params const params{.k = 128, .sink = 4, .window = 32};
  pqkv::cpu::pq_scorer<> pq_sel{pqkv::adc_shape::from(pq, cfg.q_heads(), cfg.kv_heads), params, codes.const_view(),
                                cents.const_view(), cfg.tokens};
  pqkv::cpu::exact_scorer exact_sel{cfg.q_heads(), kv.keys.const_view(), cfg.tokens, params};
  pqkv::selection_params strong_params = params;
  strong_params.k = 16;
  pqkv::cpu::exact_scorer exact_top16{cfg.q_heads(), kv.keys.const_view(), cfg.tokens, strong_params};
  pqkv::host_tensor<std::int32_t, 2> top16(cfg.kv_heads, 16);
  pqkv::host_tensor<float, 2> q(cfg.q_heads(), cfg.dim), dense(cfg.q_heads(), cfg.dim), sparse(cfg.q_heads(), cfg.dim);
  pqkv::host_tensor<std::int32_t, 2> sel(cfg.kv_heads, params.k), ex(cfg.kv_heads, params.k),
    rnd(cfg.kv_heads, params.k);
  index_t const candidates = cfg.tokens - params.sink - params.window;
  for (index_t g = 0; g < cfg.kv_heads; ++g) {  // a chance baseline: every (candidates / k)-th token
    for (index_t i = 0; i < params.k; ++i) {
      rnd.view()(g, i) = static_cast<std::int32_t>(params.sink + i * candidates / params.k);
    }
  }
  double recall = 0, mass_pq = 0, mass_exact = 0, mass_rnd = 0, err_pq = 0, recall_rnd = 0;
  int needle_steps = 0, needles_found_pq = 0, needles_found_exact = 0, strong = 0, strong_found_pq = 0;
  index_t const steps = 8;
  for (index_t step = 0; step < steps; ++step) {
    pqkv::test::make_queries(cfg, step, cfg.tokens, q.view());
    pq_sel.select(q.const_view(), sel.view());
    exact_sel.select(q.const_view(), ex.view());
    exact_top16.select(q.const_view(), top16.view());
    recall += pqkv::cpu::recall_at_k(sel.const_view(), ex.const_view()).mean;
    recall_rnd += pqkv::cpu::recall_at_k(rnd.const_view(), ex.const_view()).mean;
    auto mass = [&](pqkv::host_tensor<std::int32_t, 2> const& s) {
      return pqkv::cpu::attention_mass_kept(q.const_view(), kv.keys.const_view(), s.const_view(), params.sink,
                                            params.window)
        .mean;
    };
    mass_pq += mass(sel);
    mass_exact += mass(ex);
    mass_rnd += mass(rnd);
    pqkv::cpu::attention_dense(q.const_view(), kv.keys.const_view(), kv.values.const_view(), dense.view());
    pqkv::cpu::attention_sparse(q.const_view(), kv.keys.const_view(), kv.values.const_view(), sel.const_view(),
                                params.sink, params.window, sparse.view());
    err_pq += pqkv::cpu::relative_output_error(sparse.const_view(), dense.const_view()).overall;
    for (index_t g = 0; g < cfg.kv_heads; ++g) {
      index_t const target = pqkv::test::query_target(cfg, step, cfg.tokens, g);
      if (target < params.sink || target >= cfg.tokens - params.window) { continue; }
      ++needle_steps;
      auto has = [&](pqkv::host_tensor<std::int32_t, 2> const& s) {
        for (index_t i = 0; i < s.extent(1); ++i) {
          if (s.view()(g, i) == target) { return 1; }
        }
        return 0;
      };
      needles_found_pq += has(sel);
      needles_found_exact += has(ex);
      if (has(top16) != 0) {  // a needle the exact scores rank among the top 16
        ++strong;
        strong_found_pq += has(sel);
      }
    }
  }
  recall /= steps, recall_rnd /= steps, mass_pq /= steps, mass_exact /= steps, mass_rnd /= steps, err_pq /= steps;
  MESSAGE("recall ", recall, " (chance ", recall_rnd, "), mass kept: pq ", mass_pq, ", exact ", mass_exact,
          ", chance ", mass_rnd, "; pq output error ", err_pq, "; needles found pq ", needles_found_pq, "/",
          needle_steps, ", exact ", needles_found_exact, "/", needle_steps, "; strong needles found by pq ",
          strong_found_pq, "/", strong);
  // Some planted needles are weak (their logit boost fades with distance);
  // most of those exact scoring ranks in its top 16 must survive PQ's top 128
  // even with these crude centroids.
  CHECK(strong >= 2);
  CHECK(4 * strong_found_pq >= 3 * strong);
  CHECK(needles_found_exact >= needles_found_pq);
  CHECK(mass_exact >= mass_pq - 0.01);
  CHECK(recall > recall_rnd + 0.2);
  CHECK(mass_pq - mass_rnd > 0.5 * (mass_exact - mass_rnd));
}
#endif

// SPDX-License-Identifier: Apache-2.0
#include <pqkv/core/random.hpp>
#include <pqkv/score/topk.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

namespace {

constexpr float nan_v = std::numeric_limits<float>::quiet_NaN();
constexpr float inf_v = std::numeric_limits<float>::infinity();

/// The contract written as a full sort: NaN lowest, larger score first, equal
/// scores (-0 == +0) by lower index; the best k, ascending, then -1 padding.
std::vector<std::int32_t> sort_oracle(std::vector<float> const& scores, pqkv::index_t k, std::size_t out_len,
                                      std::int32_t first)
{
  std::vector<std::int32_t> idx(scores.size());
  for (std::size_t i = 0; i < idx.size(); ++i) { idx[i] = first + static_cast<std::int32_t>(i); }
  auto score = [&](std::int32_t t) { return scores[static_cast<std::size_t>(t - first)]; };
  std::sort(idx.begin(), idx.end(), [&](std::int32_t a, std::int32_t b) {
    float const sa = score(a), sb = score(b);
    bool const na = std::isnan(sa), nb = std::isnan(sb);
    if (na != nb) { return nb; }
    if (!na && sa != sb) { return sa > sb; }
    return a < b;
  });
  idx.resize(std::min<std::size_t>(idx.size(), static_cast<std::size_t>(k)));
  std::sort(idx.begin(), idx.end());
  idx.resize(out_len, -1);
  return idx;
}

/// Scores drawn from a tiny pool, so most of them tie.
std::vector<float> tied_scores(std::uint64_t seed, std::size_t n)
{
  float const pool[] = {0.f, -0.f, 1.f, 1.f, 2.f, -1.f, -3.5f, inf_v, -inf_v, nan_v, 1e30f, -1e-30f};
  std::vector<float> s(n);
  for (std::size_t i = 0; i < n; ++i) { s[i] = pool[pqkv::detail::random_below(seed, 3, i, std::size(pool))]; }
  return s;
}

}  // namespace

TEST_CASE("topk: equals a sort-based oracle on random scores with many ties")
{
  for (std::uint64_t seed = 0; seed < 60; ++seed) {
    auto const n = static_cast<std::size_t>(pqkv::detail::random_below(seed, 1, 0, 200));
    auto const k = static_cast<pqkv::index_t>(pqkv::detail::random_below(seed, 1, 1, n + 10));
    auto const out_len = static_cast<std::size_t>(k) + pqkv::detail::random_below(seed, 1, 2, 4);
    auto const first = static_cast<std::int32_t>(pqkv::detail::random_below(seed, 1, 3, 1000));
    auto const scores = tied_scores(seed, n);
    std::vector<std::int32_t> out(out_len, 12345);
    auto const valid = pqkv::cpu::topk_select(scores, k, out, first);
    CAPTURE(seed);
    CHECK(valid == std::min<pqkv::index_t>(k, static_cast<pqkv::index_t>(n)));
    CHECK(out == sort_oracle(scores, k, out_len, first));
  }
}

TEST_CASE("topk: ties go to the lower index; -0 equals +0; NaN ranks below -inf")
{
  std::vector<std::int32_t> out(3);
  std::vector<float> const ties{5.f, 7.f, 7.f, 7.f, 7.f};
  CHECK(pqkv::cpu::topk_select(ties, 3, out) == 3);
  CHECK(out == std::vector<std::int32_t>{1, 2, 3});

  std::vector<float> const zeros{-0.f, 0.f, -0.f, -1.f};
  std::vector<std::int32_t> two(2);
  pqkv::cpu::topk_select(zeros, 2, two);
  CHECK(two == std::vector<std::int32_t>{0, 1});

  std::vector<float> const with_nan{nan_v, -inf_v, nan_v, -inf_v};
  pqkv::cpu::topk_select(with_nan, 3, out);
  CHECK(out == std::vector<std::int32_t>{0, 1, 3});  // both -inf, then the lower NaN
}

TEST_CASE("topk: k is clamped to the candidates and the row is padded with -1")
{
  std::vector<float> const s{0.5f, 0.1f, 0.9f};
  std::vector<std::int32_t> out(6, 99);
  CHECK(pqkv::cpu::topk_select(s, 5, out, 10) == 3);
  CHECK(out == std::vector<std::int32_t>{10, 11, 12, -1, -1, -1});
  CHECK(pqkv::cpu::topk_select(s, 2, out) == 2);
  CHECK(out == std::vector<std::int32_t>{0, 2, -1, -1, -1, -1});
  CHECK(pqkv::cpu::topk_select(s, 0, out) == 0);
  CHECK(std::all_of(out.begin(), out.end(), [](std::int32_t x) { return x == -1; }));
  CHECK(pqkv::cpu::topk_select(std::span<float const>{}, 4, out) == 0);
  CHECK(std::all_of(out.begin(), out.end(), [](std::int32_t x) { return x == -1; }));
}

TEST_CASE("topk: the rank key orders floats as < does, NaN lowest")
{
  std::vector<float> const ascending{-inf_v, -1e30f, -1.f, -1e-40f, 0.f, 1e-40f, 1.f, 3.f, 1e30f, inf_v};
  CHECK(pqkv::score_rank_key(nan_v) < pqkv::score_rank_key(-inf_v));
  CHECK(pqkv::score_rank_key(-nan_v) == 0u);
  for (std::size_t i = 1; i < ascending.size(); ++i) {
    CHECK(pqkv::score_rank_key(ascending[i - 1]) < pqkv::score_rank_key(ascending[i]));
  }
  CHECK(pqkv::score_rank_key(-0.f) == pqkv::score_rank_key(0.f));
  CHECK(pqkv::topk_key(1.f, 3) > pqkv::topk_key(1.f, 4));
  CHECK(pqkv::topk_key_index(pqkv::topk_key(-2.f, 123456)) == 123456);
}

TEST_CASE("topk: bad arguments throw naming them")
{
  std::vector<float> const s{1.f, 2.f};
  std::vector<std::int32_t> out(2);
  CHECK_THROWS_WITH_AS(pqkv::cpu::topk_select(s, -1, out), doctest::Contains("k=-1"), pqkv::error);
  CHECK_THROWS_WITH_AS(pqkv::cpu::topk_select(s, 3, out), doctest::Contains("out.size()=2"), pqkv::error);
  CHECK_THROWS_WITH_AS(pqkv::cpu::topk_select(s, 1, out, -4), doctest::Contains("first_index=-4"), pqkv::error);
  CHECK_THROWS_WITH_AS(pqkv::cpu::topk_select(s, 1, out, std::numeric_limits<std::int32_t>::max()),
                       doctest::Contains("int32"), pqkv::error);
}

// SPDX-License-Identifier: Apache-2.0
#include <pqkv/core/host_tensor.hpp>
#include <pqkv/core/parallel.hpp>
#include <pqkv/core/random.hpp>
#include <pqkv/decode/reconstruct.hpp>
#include <pqkv/encode/encode.hpp>

#include "common/test_util.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

using pqkv::test::noise;

using pqkv::index_t;

pqkv::host_tensor<float, 3> random_keys(index_t heads, index_t tokens, index_t dim, std::uint64_t seed)
{
  pqkv::host_tensor<float, 3> k(heads, tokens, dim);
  for (std::size_t i = 0; i < k.size(); ++i) { k.data()[i] = noise(seed, i); }
  return k;
}

pqkv::host_tensor<float, 4> random_centroids(pqkv::pq_config const& cfg, index_t heads, std::uint64_t seed)
{
  pqkv::host_tensor<float, 4> c(heads, cfg.m, cfg.ksub(), cfg.dsub());
  for (std::size_t i = 0; i < c.size(); ++i) { c.data()[i] = noise(seed + 1000, i); }
  return c;
}

/// The encoder's contract, written out plainly: float fma chain per centroid,
/// strict < from c = 0.
std::uint8_t contract_code(pqkv::host_tensor<float, 3> const& keys, pqkv::host_tensor<float, 4> const& c, index_t h,
                           index_t t, index_t j)
{
  auto const k = keys.const_view();
  auto const cv = c.const_view();
  index_t const ksub = cv.extent(2), dsub = cv.extent(3);
  float best = std::numeric_limits<float>::infinity();
  int best_c = -1;
  for (index_t ci = 0; ci < ksub; ++ci) {
    float d = 0.f;
    for (index_t i = 0; i < dsub; ++i) {
      float const diff = k(h, t, j * dsub + i) - cv(h, j, ci, i);
      d = std::fma(diff, diff, d);
    }
    if (best_c < 0 || d < best) {
      best = d;
      best_c = static_cast<int>(ci);
    }
  }
  return static_cast<std::uint8_t>(best_c);
}

double dist2(pqkv::host_tensor<float, 3> const& keys, pqkv::host_tensor<float, 4> const& c, index_t h, index_t t,
             index_t j, index_t ci)
{
  auto const k = keys.const_view();
  auto const cv = c.const_view();
  double d = 0;
  for (index_t i = 0; i < cv.extent(3); ++i) {
    double const e = static_cast<double>(k(h, t, j * cv.extent(3) + i)) - cv(h, j, ci, i);
    d += e * e;
  }
  return d;
}

}  // namespace

static_assert(pqkv::Encoder<pqkv::cpu::pq_encoder, float>);
static_assert(pqkv::Encoder<pqkv::cpu::pq_encoder, __half>);
static_assert(pqkv::Encoder<pqkv::cpu::pq_encoder, __nv_bfloat16>);

TEST_CASE("encode: every code is the true nearest centroid (brute force)")
{
  for (auto const& shape : {std::pair{4, 4}, std::pair{2, 8}, std::pair{16, 3}, std::pair{1, 1}}) {
    int const m = shape.first;
    pqkv::pq_config const cfg{.dim = 32, .m = m, .nbits = shape.second};
    index_t const heads = 3, tokens = 70;  // >= 64 tokens and ksub >= 16 take the blocked path
    auto const keys = random_keys(heads, tokens, cfg.dim, 7);
    auto const cents = random_centroids(cfg, heads, 7);
    pqkv::host_tensor<std::uint8_t, 3> codes(heads, tokens, cfg.m);
    pqkv::cpu::pq_encoder{cfg}.encode(keys.const_view(), cents.const_view(), codes.view());
    auto const cv = codes.const_view();
    for (index_t h = 0; h < heads; ++h) {
      for (index_t t = 0; t < tokens; ++t) {
        for (index_t j = 0; j < cfg.m; ++j) {
          CAPTURE(m);
          CAPTURE(h);
          CAPTURE(t);
          CAPTURE(j);
          REQUIRE(cv(h, t, j) == contract_code(keys, cents, h, t, j));
          // Also the nearest in exact arithmetic, up to float rounding of near-ties.
          double best = std::numeric_limits<double>::infinity();
          for (index_t c = 0; c < cfg.ksub(); ++c) { best = std::min(best, dist2(keys, cents, h, t, j, c)); }
          CHECK(dist2(keys, cents, h, t, j, cv(h, t, j)) <= best * (1 + 1e-5) + 1e-6);
        }
      }
    }
  }
}

TEST_CASE("encode: equidistant and duplicate centroids tie to the lower index")
{
  pqkv::pq_config const cfg{.dim = 2, .m = 1, .nbits = 2};
  pqkv::host_tensor<float, 4> c(1, 1, 4, 2);
  float const cvals[] = {3, 3, 1, 0, -1, 0, 1, 0};  // centroid 3 duplicates centroid 1
  std::copy(std::begin(cvals), std::end(cvals), c.data());
  pqkv::host_tensor<float, 3> k(1, 3, 2);
  float const kvals[] = {0, 0, 0.9f, 0, 2, 2};  // equidistant from 1 and 2; nearest 1 (= 3); nearest 0
  std::copy(std::begin(kvals), std::end(kvals), k.data());
  pqkv::host_tensor<std::uint8_t, 3> codes(1, 3, 1);
  pqkv::cpu::pq_encoder{cfg}.encode(k.const_view(), c.const_view(), codes.view());
  CHECK(int{codes.view()(0, 0, 0)} == 1);
  CHECK(int{codes.view()(0, 1, 0)} == 1);
  CHECK(int{codes.view()(0, 2, 0)} == 0);
}

TEST_CASE("encode: duplicate centroids tie to the lower index across lanes and blocks")
{
  // 64 centroids: 32..63 repeat 0..31, and 5 repeats 2; keys are centroids
  // (distance 0 to the original and its copies) or points between two of them.
  pqkv::pq_config const cfg{.dim = 8, .m = 2, .nbits = 6};
  auto cents = random_centroids(cfg, 1, 4);
  auto cv = cents.view();
  for (index_t j = 0; j < 2; ++j) {
    for (index_t i = 0; i < 4; ++i) {
      cv(0, j, 5, i) = cv(0, j, 2, i);
      for (index_t c = 32; c < 64; ++c) { cv(0, j, c, i) = cv(0, j, c - 32, i); }
    }
  }
  index_t const tokens = 128;
  pqkv::host_tensor<float, 3> keys(1, tokens, 8);
  for (index_t t = 0; t < tokens; ++t) {
    for (index_t j = 0; j < 2; ++j) {
      for (index_t i = 0; i < 4; ++i) { keys.view()(0, t, j * 4 + i) = cv(0, j, (t * 7 + j) % 64, i); }
    }
  }
  pqkv::host_tensor<std::uint8_t, 3> codes(1, tokens, 2);
  pqkv::cpu::pq_encoder{cfg}.encode(keys.const_view(), cents.const_view(), codes.view());
  for (index_t t = 0; t < tokens; ++t) {
    for (index_t j = 0; j < 2; ++j) {
      index_t want = (t * 7 + j) % 64 % 32;
      if (want == 5) { want = 2; }
      CHECK(codes.view()(0, t, j) == want);
    }
  }
}

TEST_CASE("encode: append token by token, or encode into a longer buffer, equals one encode; other rows untouched")
{
  pqkv::pq_config const cfg{.dim = 16, .m = 4, .nbits = 5};
  index_t const heads = 2, tokens = 150;
  auto const keys = random_keys(heads, tokens, cfg.dim, 3);
  auto const cents = random_centroids(cfg, heads, 3);
  pqkv::cpu::pq_encoder const enc{cfg};
  pqkv::host_tensor<std::uint8_t, 3> full(heads, tokens, cfg.m);
  enc.encode(keys.const_view(), cents.const_view(), full.view());

  index_t const capacity = tokens + 5;
  pqkv::host_tensor<std::uint8_t, 3> grown(heads, capacity, cfg.m);
  std::fill(grown.storage().begin(), grown.storage().end(), std::uint8_t{0xEE});
  auto const kv = keys.const_view();
  auto range = [&](index_t first, index_t count) {
    return pqkv::make_strided_view<float const, 3>(&kv(0, first, 0), {heads, count, cfg.dim},
                                                   {tokens * cfg.dim, cfg.dim, 1});
  };
  enc.append(range(0, 100), cents.const_view(), grown.view(), 0);  // the prefill
  for (index_t t = 100; t < 120; ++t) { enc.append(range(t, 1), cents.const_view(), grown.view(), t); }
  enc.append(range(120, 30), cents.const_view(), grown.view(), 120);
  pqkv::host_tensor<std::uint8_t, 3> roomy(heads, capacity, cfg.m);
  std::fill(roomy.storage().begin(), roomy.storage().end(), std::uint8_t{0xEE});
  enc.encode(keys.const_view(), cents.const_view(), roomy.view());
  for (index_t h = 0; h < heads; ++h) {
    for (index_t t = 0; t < capacity; ++t) {
      for (index_t j = 0; j < cfg.m; ++j) {
        auto const want = t < tokens ? full.view()(h, t, j) : std::uint8_t{0xEE};
        REQUIRE(grown.view()(h, t, j) == want);
        REQUIRE(roomy.view()(h, t, j) == want);
      }
    }
  }
}

TEST_CASE("encode: half, bf16 and strided (NHD) keys encode like their float values")
{
  pqkv::pq_config const cfg{.dim = 16, .m = 8, .nbits = 4};
  index_t const heads = 2, tokens = 9;
  auto keys = random_keys(heads, tokens, cfg.dim, 11);
  auto const cents = random_centroids(cfg, heads, 11);
  pqkv::host_tensor<__half, 3> kh(heads, tokens, cfg.dim);
  pqkv::host_tensor<__nv_bfloat16, 3> kb(heads, tokens, cfg.dim);
  pqkv::host_tensor<float, 3> from_half(heads, tokens, cfg.dim), from_bf16(heads, tokens, cfg.dim);
  for (std::size_t i = 0; i < keys.size(); ++i) {
    kh.data()[i] = pqkv::from_float<__half>(keys.data()[i]);
    kb.data()[i] = pqkv::from_float<__nv_bfloat16>(keys.data()[i]);
    from_half.data()[i] = pqkv::to_float(kh.data()[i]);
    from_bf16.data()[i] = pqkv::to_float(kb.data()[i]);
  }
  pqkv::cpu::pq_encoder const enc{cfg};
  pqkv::host_tensor<std::uint8_t, 3> a(heads, tokens, cfg.m), b(heads, tokens, cfg.m);
  enc.encode(kh.const_view(), cents.const_view(), a.view());
  enc.encode(from_half.const_view(), cents.const_view(), b.view());
  CHECK(a.storage() == b.storage());
  enc.encode(kb.const_view(), cents.const_view(), a.view());
  enc.encode(from_bf16.const_view(), cents.const_view(), b.view());
  CHECK(a.storage() == b.storage());

  // The same keys stored token-major [tokens, heads, dim] and seen as [heads, tokens, dim].
  std::vector<float> nhd(keys.size());
  for (index_t h = 0; h < heads; ++h) {
    for (index_t t = 0; t < tokens; ++t) {
      for (index_t d = 0; d < cfg.dim; ++d) {
        nhd[static_cast<std::size_t>((t * heads + h) * cfg.dim + d)] = keys.view()(h, t, d);
      }
    }
  }
  auto const strided = pqkv::make_strided_view<float const, 3>(nhd.data(), {heads, tokens, cfg.dim},
                                                               {cfg.dim, heads * cfg.dim, 1});
  enc.encode(strided, cents.const_view(), a.view());
  enc.encode(keys.const_view(), cents.const_view(), b.view());
  CHECK(a.storage() == b.storage());
}

TEST_CASE("encode: codes do not depend on the thread count; reconstruct re-encodes to the same codes")
{
  pqkv::pq_config const cfg{.dim = 32, .m = 8, .nbits = 6};
  index_t const heads = 3, tokens = 300;
  auto const keys = random_keys(heads, tokens, cfg.dim, 5);
  auto const cents = random_centroids(cfg, heads, 5);
  pqkv::cpu::pq_encoder const enc{cfg};
  pqkv::host_tensor<std::uint8_t, 3> one(heads, tokens, cfg.m), many(heads, tokens, cfg.m);
  pqkv::cpu::set_num_threads(1);
  enc.encode(keys.const_view(), cents.const_view(), one.view());
  pqkv::cpu::set_num_threads(5);
  enc.encode(keys.const_view(), cents.const_view(), many.view());
  pqkv::cpu::set_num_threads(0);
  CHECK(one.storage() == many.storage());

  pqkv::host_tensor<float, 3> recon(heads, tokens, cfg.dim);
  pqkv::cpu::reconstruct(one.const_view(), cents.const_view(), recon.view());
  CHECK(recon.view()(1, 7, 9) == cents.view()(1, 2, one.view()(1, 7, 2), 1));  // channel 9 = (j 2, i 1)
  enc.encode(recon.const_view(), cents.const_view(), many.view());
  CHECK(one.storage() == many.storage());
}

TEST_CASE("encode: empty inputs are a no-op")
{
  pqkv::pq_config const cfg{.dim = 8, .m = 2, .nbits = 2};
  auto const cents = random_centroids(cfg, 2, 1);
  pqkv::host_tensor<float, 3> keys(2, 0, 8);
  pqkv::host_tensor<std::uint8_t, 3> codes(2, 0, 2);
  CHECK_NOTHROW(pqkv::cpu::pq_encoder{cfg}.encode(keys.const_view(), cents.const_view(), codes.view()));
}

TEST_CASE("encode: each bad input throws naming it")
{
  pqkv::pq_config const cfg{.dim = 16, .m = 4, .nbits = 3};
  auto keys = random_keys(2, 5, 16, 1);
  auto cents = random_centroids(cfg, 2, 1);
  pqkv::host_tensor<std::uint8_t, 3> codes(2, 5, 4);
  pqkv::cpu::pq_encoder const enc{cfg};
  auto const c = cents.const_view();

  CHECK_THROWS_WITH_AS(pqkv::cpu::pq_encoder(pqkv::pq_config{.dim = 16, .m = 3}), doctest::Contains("m=3"),
                       pqkv::error);
  CHECK_THROWS_WITH_AS(pqkv::cpu::pq_encoder(pqkv::pq_config{.dim = 16, .m = 4, .nbits = 9}),
                       doctest::Contains("nbits=9"), pqkv::error);
  pqkv::host_tensor<float, 3> wide(2, 5, 32);
  CHECK_THROWS_WITH_AS(enc.encode(wide.const_view(), c, codes.view()), doctest::Contains("keys.extent(2)=32"),
                       pqkv::error);
  pqkv::host_tensor<std::uint8_t, 3> few_heads(1, 5, 4), wrong_m(2, 5, 8), short_codes(2, 4, 4);
  CHECK_THROWS_WITH_AS(enc.encode(keys.const_view(), c, few_heads.view()), doctest::Contains("codes.extent(0)=1"),
                       pqkv::error);
  CHECK_THROWS_WITH_AS(enc.encode(keys.const_view(), c, wrong_m.view()), doctest::Contains("codes.extent(2)=8"),
                       pqkv::error);
  CHECK_THROWS_WITH_AS(enc.encode(keys.const_view(), c, short_codes.view()),
                       doctest::Contains("codes.extent(1)=4 < keys.extent(1)=5"), pqkv::error);
  pqkv::host_tensor<float, 4> bad_ksub(2, 4, 16, 4);
  CHECK_THROWS_WITH_AS(enc.encode(keys.const_view(), bad_ksub.const_view(), codes.view()),
                       doctest::Contains("centroids.extent(2)=16"), pqkv::error);
  CHECK_THROWS_WITH_AS(enc.append(keys.const_view(), c, codes.view(), -1), doctest::Contains("position=-1"),
                       pqkv::error);
  CHECK_THROWS_WITH_AS(enc.append(keys.const_view(), c, codes.view(), 1), doctest::Contains("position=1"),
                       pqkv::error);

  keys.view()(1, 3, 2) = std::numeric_limits<float>::quiet_NaN();
  std::fill(codes.storage().begin(), codes.storage().end(), std::uint8_t{9});
  CHECK_THROWS_WITH_AS(enc.encode(keys.const_view(), c, codes.view()), doctest::Contains("keys(1, 3, 2)"),
                       pqkv::error);
  CHECK(std::all_of(codes.storage().begin(), codes.storage().end(), [](std::uint8_t x) { return x == 9; }));
  keys.view()(1, 3, 2) = 0.f;
  cents.view()(0, 1, 2, 3) = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH_AS(enc.encode(keys.const_view(), cents.const_view(), codes.view()),
                       doctest::Contains("centroids"), pqkv::error);
}

TEST_CASE("reconstruct: bad codes and shapes throw naming them")
{
  pqkv::pq_config const cfg{.dim = 8, .m = 2, .nbits = 2};
  auto const cents = random_centroids(cfg, 1, 2);
  pqkv::host_tensor<std::uint8_t, 3> codes(1, 3, 2);
  pqkv::host_tensor<float, 3> out(1, 3, 8);
  codes.view()(0, 2, 1) = 4;  // ksub = 4
  CHECK_THROWS_WITH_AS(pqkv::cpu::reconstruct(codes.const_view(), cents.const_view(), out.view()),
                       doctest::Contains("codes(0, 2, 1)=4"), pqkv::error);
  pqkv::host_tensor<float, 3> narrow(1, 3, 4);
  CHECK_THROWS_WITH_AS(pqkv::cpu::reconstruct(codes.const_view(), cents.const_view(), narrow.view()),
                       doctest::Contains("out.extent(2)=4"), pqkv::error);
}

TEST_CASE("docs/encode.md example")
{
  index_t const kv_heads = 2, capacity = 80, n = 70, dim = 128;
  auto const all_keys = random_keys(kv_heads, n + 1, dim, 9);
  auto const centroids_t = random_centroids(pqkv::pq_config{.dim = dim, .m = 16, .nbits = 8}, kv_heads, 9);
  auto const centroids = centroids_t.const_view();
  auto const kv = all_keys.const_view();
  auto const prefill_keys = pqkv::make_strided_view<float const, 3>(kv.data_handle(), {kv_heads, n, dim},
                                                                    {(n + 1) * dim, dim, 1});
  auto const new_key =
    pqkv::make_strided_view<float const, 3>(&kv(0, n, 0), {kv_heads, 1, dim}, {(n + 1) * dim, dim, 1});
  // example-begin (docs/encode.md)
  pqkv::pq_config const pq{.dim = 128, .m = 16, .nbits = 8};
  pqkv::cpu::pq_encoder const encoder{pq};
  pqkv::host_tensor<std::uint8_t, 3> codes(kv_heads, capacity, pq.m);       // [kv_heads, capacity, m]
  encoder.append(prefill_keys, centroids, codes.view(), 0);                  // prefill: tokens [0, n)
  // each decode step: the new token's key [kv_heads, 1, dim] goes to row n
  encoder.append(new_key, centroids, codes.view(), n);
  // example-end
  pqkv::host_tensor<std::uint8_t, 3> whole(kv_heads, n + 1, pq.m);
  encoder.encode(kv, centroids, whole.view());
  for (index_t h = 0; h < kv_heads; ++h) {
    for (index_t t = 0; t <= n; ++t) {
      for (index_t j = 0; j < pq.m; ++j) { REQUIRE(codes.view()(h, t, j) == whole.view()(h, t, j)); }
    }
  }
}

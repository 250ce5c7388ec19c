// SPDX-License-Identifier: Apache-2.0
#include <pqkv/pqkv.hpp>
#include <pqkv/core/random.hpp>

#include "common/test_util.hpp"

#include <doctest/doctest.h>

#include <numeric>
#include <set>
#include <string>
#include <vector>

namespace {

using pqkv::test::error_message;
}  // namespace

TEST_CASE("pq_config: accepts the documented ranges")
{
  for (int nbits = 1; nbits <= 8; ++nbits) {
    for (pqkv::index_t m : {1, 2, 4, 8, 16, 32, 64, 128}) {
      pqkv::pq_config cfg{.dim = 128, .m = m, .nbits = nbits};
      CHECK_NOTHROW(cfg.validate());
      CHECK(cfg.dsub() * cfg.m == 128);
      CHECK(cfg.ksub() == (pqkv::index_t{1} << nbits));
    }
  }
}

TEST_CASE("pq_config: each bad field gives a message naming it and its value")
{
  auto msg = [](pqkv::pq_config c) { return error_message([&] { c.validate("trainer"); }); };
  CHECK(msg({.dim = 128, .m = 3}).find("m=3 does not divide dim=128") != std::string::npos);
  CHECK(msg({.dim = 128, .m = 8, .nbits = 0}).find("nbits=0") != std::string::npos);
  CHECK(msg({.dim = 128, .m = 8, .nbits = 9}).find("nbits=9") != std::string::npos);
  CHECK(msg({.dim = 0}).find("dim=0") != std::string::npos);
  CHECK(msg({.dim = 128, .m = 0}).find("m=0") != std::string::npos);
  CHECK(msg({.dim = 128, .m = 8, .nbits = 8, .max_iter = -1}).find("max_iter=-1") != std::string::npos);
  pqkv::pq_config nan_tol{};
  nan_tol.tol = std::numeric_limits<double>::quiet_NaN();
  CHECK(msg(nan_tol).find("tol=") != std::string::npos);
  std::string const full = msg({.dim = 128, .m = 3});
  CHECK(full.rfind("pqkv::error: trainer: ", 0) == 0);
  CHECK(full.find("(core/config.hpp:") != std::string::npos);
}

TEST_CASE("views: strided view of NHD keys reads the same elements as HND")
{
  constexpr pqkv::index_t heads = 3, tokens = 5, dim = 4;
  std::vector<float> nhd(static_cast<std::size_t>(heads * tokens * dim));
  std::iota(nhd.begin(), nhd.end(), 0.f);
  // [tokens, heads, dim] memory seen as [heads, tokens, dim]
  auto keys = pqkv::make_strided_view<float const, 3>(nhd.data(), {heads, tokens, dim}, {dim, heads * dim, 1});
  for (pqkv::index_t h = 0; h < heads; ++h) {
    for (pqkv::index_t t = 0; t < tokens; ++t) {
      for (pqkv::index_t d = 0; d < dim; ++d) {
        CHECK(keys(h, t, d) == nhd[static_cast<std::size_t>((t * heads + h) * dim + d)]);
      }
    }
  }
  pqkv::host_tensor<float, 3> row_major(heads, tokens, dim);
  pqkv::kv_view<float const> as_strided = row_major.const_view();  // implicit conversion
  CHECK(as_strided.stride(0) == tokens * dim);
  CHECK(pqkv::element_count(as_strided) == heads * tokens * dim);
}

TEST_CASE("dtype: half and bfloat16 round trips are exact on representable values")
{
  for (float x : {0.f, 1.f, -2.5f, 0.125f, 1024.f}) {
    CHECK(pqkv::to_float(pqkv::from_float<__half>(x)) == x);
    CHECK(pqkv::to_float(pqkv::from_float<__nv_bfloat16>(x)) == x);
  }
  CHECK(pqkv::to_float(pqkv::from_float<__nv_bfloat16>(1.00390625f)) == 1.f);  // rounds to 8 bits
  static_assert(pqkv::KvElement<float> && pqkv::KvElement<__half> && pqkv::KvElement<__nv_bfloat16>);
}

TEST_CASE("random: counter-based draws are reproducible and spread")
{
  using pqkv::detail::random_below;
  std::set<std::uint64_t> seen;
  for (std::uint64_t i = 0; i < 1000; ++i) {
    auto const r = random_below(42, 7, i, 100);
    CHECK(r < 100);
    CHECK(r == random_below(42, 7, i, 100));
    seen.insert(r);
  }
  CHECK(seen.size() > 90);
  CHECK(random_below(42, 7, 0, 1u << 30) != random_below(43, 7, 0, 1u << 30));
}

TEST_CASE("parallel_for: chunked reduction is identical for any thread count")
{
  std::vector<float> x(100000);
  for (std::size_t i = 0; i < x.size(); ++i) { x[i] = 1.f / static_cast<float>(i + 1); }
  auto reduce = [&](int threads) {
    pqkv::cpu::set_num_threads(threads);
    constexpr pqkv::index_t chunk = 1000;
    std::vector<float> partial(static_cast<std::size_t>(pqkv::cpu::chunk_count(100000, chunk)));
    pqkv::cpu::parallel_for(static_cast<pqkv::index_t>(partial.size()), [&](pqkv::index_t c) {
      float s = 0;
      for (pqkv::index_t i = c * chunk; i < std::min<pqkv::index_t>(100000, (c + 1) * chunk); ++i) {
        s += x[static_cast<std::size_t>(i)];
      }
      partial[static_cast<std::size_t>(c)] = s;
    });
    return std::accumulate(partial.begin(), partial.end(), 0.f);
  };
  float const one = reduce(1);
  CHECK(reduce(2) == one);
  CHECK(reduce(7) == one);
  pqkv::cpu::set_num_threads(0);
}

TEST_CASE("parallel_for: an exception in a chunk reaches the caller")
{
  pqkv::cpu::set_num_threads(4);
  CHECK_THROWS_AS(pqkv::cpu::parallel_for(64, [](pqkv::index_t c) {
                    if (c == 17) { throw pqkv::error("chunk 17"); }
                  }),
                  pqkv::error);
  pqkv::cpu::set_num_threads(0);
}

TEST_CASE("codebook: owns centroids of the configured shape; bad heads throw")
{
  pqkv::codebook book{pqkv::pq_config{.dim = 64, .m = 4, .nbits = 6}, 2};
  CHECK(book.centroids().extent(0) == 2);
  CHECK(book.centroids().extent(1) == 4);
  CHECK(book.centroids().extent(2) == 64);
  CHECK(book.centroids().extent(3) == 16);
  CHECK_THROWS_WITH_AS(pqkv::codebook(pqkv::pq_config{.dim = 64, .m = 4, .nbits = 6}, 0),
                       doctest::Contains("heads=0"), pqkv::error);
}

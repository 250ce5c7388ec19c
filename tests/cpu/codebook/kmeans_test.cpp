// SPDX-License-Identifier: Apache-2.0
#include <pqkv/codebook/kmeans.hpp>
#include <pqkv/core/host_tensor.hpp>
#include <pqkv/core/parallel.hpp>
#include <pqkv/core/random.hpp>

#include "common/test_util.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

namespace {

using pqkv::test::contains;
using pqkv::test::error_message;

using pqkv::index_t;

/// Keys [heads, tokens, dim]: a few Gaussian-ish blobs plus uniform noise, so
/// k-means has structure to find but nothing is degenerate.
pqkv::host_tensor<float, 3> make_keys(index_t heads, index_t tokens, index_t dim, std::uint64_t seed)
{
  pqkv::host_tensor<float, 3> keys(heads, tokens, dim);
  for (index_t h = 0; h < heads; ++h) {
    for (index_t t = 0; t < tokens; ++t) {
      auto const blob = static_cast<std::uint64_t>(pqkv::detail::random_below(seed, 100 + h, t, 7));
      for (index_t d = 0; d < dim; ++d) {
        double const center = 3.0 * (pqkv::detail::random_unit(seed, 200 + blob, d) - 0.5);
        double const noise = pqkv::detail::random_unit(seed, 300 + h, t * dim + d) - 0.5;
        keys.view()(h, t, d) = static_cast<float>(center + noise);
      }
    }
  }
  return keys;
}

/// Exact squared distance (double) of key sub-vector (h, t, s) to centroid k.
template <class Keys>
double sq_dist(Keys const& keys, pqkv::centroids_view<float const> c, index_t h, index_t t, index_t s, index_t k)
{
  index_t const dsub = c.extent(3);
  double d = 0;
  for (index_t j = 0; j < dsub; ++j) {
    double const diff = static_cast<double>(keys(h, t, s * dsub + j)) - c(h, s, k, j);
    d += diff * diff;
  }
  return d;
}

/// Brute-force MSE of `c` on all tokens: mean over heads and tokens of the sum
/// over subspaces of the distance to the nearest centroid.
template <class Keys>
double brute_mse(Keys const& keys, pqkv::centroids_view<float const> c)
{
  double total = 0;
  for (index_t h = 0; h < c.extent(0); ++h) {
    for (index_t t = 0; t < keys.extent(1); ++t) {
      for (index_t s = 0; s < c.extent(1); ++s) {
        double best = std::numeric_limits<double>::infinity();
        for (index_t k = 0; k < c.extent(2); ++k) { best = std::min(best, sq_dist(keys, c, h, t, s, k)); }
        total += best;
      }
    }
  }
  return total / static_cast<double>(c.extent(0) * keys.extent(1));
}

pqkv::host_tensor<float, 4> centroids_for(pqkv::pq_config const& cfg, index_t heads)
{
  return pqkv::host_tensor<float, 4>(heads, cfg.m, cfg.ksub(), cfg.dsub());
}

/// Calls a trainer through the concept only, as generic user code would.
template <class T, class Key>
  requires pqkv::Trainer<T, Key>
void train_generic(T& trainer, pqkv::kv_view<Key const> keys, pqkv::centroids_view<float> out)
{
  CHECK(trainer.config().m == out.extent(1));
  trainer.train(keys, out);
}

}  // namespace

TEST_CASE("kmeans: objective never rises across iterations")
{
  auto const keys = make_keys(2, 700, 16, 11);
  for (auto init : {pqkv::init_method::random_sample, pqkv::init_method::kmeans_plus_plus}) {
    CAPTURE(static_cast<int>(init));
    pqkv::pq_config cfg{.dim = 16, .m = 4, .nbits = 4, .max_iter = 12, .tol = 0, .seed = 5, .init = init};
    auto c = centroids_for(cfg, 2);
    auto const rep = pqkv::cpu::kmeans_trainer{cfg}.train(keys.const_view(), c.view());
    REQUIRE(rep.objective.size() == 13);
    CHECK(rep.iterations == 12);
    CHECK_FALSE(rep.converged);
    CHECK(rep.mse == rep.objective.back());
    for (std::size_t i = 1; i < rep.objective.size(); ++i) {
      CAPTURE(i);
      CHECK(rep.objective[i] <= rep.objective[i - 1] * (1 + 1e-6));
    }
    CHECK(rep.objective.back() < 0.9 * rep.objective.front());  // it did learn something
  }
}

TEST_CASE("kmeans: final codes are the true argmin of the final centroids and mse matches")
{
  index_t const heads = 2, tokens = 500, dim = 24;
  auto const keys = make_keys(heads, tokens, dim, 3);
  pqkv::pq_config cfg{.dim = dim, .m = 3, .nbits = 4, .max_iter = 8, .tol = 0, .seed = 9};
  auto c = centroids_for(cfg, heads);
  pqkv::host_tensor<std::uint8_t, 3> codes(heads, tokens, cfg.m);
  auto const rep = pqkv::cpu::kmeans_trainer{cfg}.train(keys.const_view(), c.view(), codes.view());
  auto const kv = keys.const_view();
  auto const cv = c.const_view();
  double mse = 0;
  for (index_t h = 0; h < heads; ++h) {
    for (index_t t = 0; t < tokens; ++t) {
      for (index_t s = 0; s < cfg.m; ++s) {
        double best = std::numeric_limits<double>::infinity();
        for (index_t k = 0; k < cfg.ksub(); ++k) { best = std::min(best, sq_dist(kv, cv, h, t, s, k)); }
        double const mine = sq_dist(kv, cv, h, t, s, codes.view()(h, t, s));
        // GEMM-form float distances may swap only near-ties.
        CHECK(mine <= best + 1e-4 * (1 + best));
        mse += mine;
      }
    }
  }
  mse /= static_cast<double>(heads * tokens);
  CHECK(rep.mse == doctest::Approx(mse).epsilon(1e-5));
  CHECK(rep.mse == doctest::Approx(brute_mse(kv, cv)).epsilon(1e-5));
}

TEST_CASE("kmeans: recovers well-separated planted clusters")
{
  index_t const tokens = 800, dim = 8, ksub = 8;
  pqkv::host_tensor<float, 3> keys(1, tokens, dim);
  // Centers are the corners (+-5, +-5, +-5) of a cube in each half (subspace).
  auto corner = [](index_t k, index_t j) { return ((k >> (j % 3)) & 1) != 0 ? 5.f : -5.f; };
  for (index_t t = 0; t < tokens; ++t) {
    for (index_t s = 0; s < 2; ++s) {
      auto const k = static_cast<index_t>(pqkv::detail::random_below(7, s, t, ksub));
      for (index_t j = 0; j < 4; ++j) {
        float const noise = 0.02f * static_cast<float>(pqkv::detail::random_unit(8, s, t * 4 + j) - 0.5);
        keys.view()(0, t, s * 4 + j) = (j == 3 ? 0.f : corner(k, j)) + noise;
      }
    }
  }
  for (std::uint64_t seed : {1, 2, 3}) {
    CAPTURE(seed);
    pqkv::pq_config cfg{.dim = dim, .m = 2, .nbits = 3, .max_iter = 20, .seed = seed};
    auto c = centroids_for(cfg, 1);
    auto const rep = pqkv::cpu::kmeans_trainer{cfg}.train(keys.const_view(), c.view());
    CHECK(rep.mse < 2 * 4 * 0.02 * 0.02 / 12 * 1.5);  // noise variance per subspace: 4 channels of U(-.01, .01)
    CHECK(rep.converged);
    for (index_t s = 0; s < 2; ++s) {
      for (index_t k = 0; k < ksub; ++k) {  // every planted center has a centroid next to it
        double best = 1e9;
        for (index_t q = 0; q < ksub; ++q) {
          double d = 0;
          for (index_t j = 0; j < 4; ++j) {
            double const diff = c.view()(0, s, q, j) - (j == 3 ? 0.f : corner(k, j));
            d += diff * diff;
          }
          best = std::min(best, d);
        }
        CHECK(best < 1e-3);
      }
    }
  }
}

TEST_CASE("kmeans: same seed gives bit-identical centroids with 1, 2 and 3 threads; another seed differs")
{
  // 2600 tokens: three work chunks per subspace, so the chunked sums are exercised.
  auto const keys = make_keys(2, 2600, 16, 21);
  for (auto init : {pqkv::init_method::random_sample, pqkv::init_method::kmeans_plus_plus}) {
    CAPTURE(static_cast<int>(init));
    pqkv::pq_config cfg{.dim = 16, .m = 2, .nbits = 5, .max_iter = 6, .tol = 0, .seed = 77, .init = init};
    std::vector<std::vector<float>> runs;
    std::vector<double> mses;
    for (int threads : {1, 2, 3}) {
      pqkv::cpu::set_num_threads(threads);
      auto c = centroids_for(cfg, 2);
      mses.push_back(pqkv::cpu::kmeans_trainer{cfg}.train(keys.const_view(), c.view()).mse);
      runs.push_back(c.storage());
    }
    pqkv::cpu::set_num_threads(0);
    CHECK(runs[0] == runs[1]);
    CHECK(runs[0] == runs[2]);
    CHECK(mses[0] == mses[1]);
    CHECK(mses[0] == mses[2]);
    cfg.seed = 78;
    auto other = centroids_for(cfg, 2);
    pqkv::cpu::kmeans_trainer{cfg}.train(keys.const_view(), other.view());
    CHECK(other.storage() != runs[0]);
  }
}

TEST_CASE("kmeans: random_sample and kmeans++ init draw training rows as documented")
{
  index_t const tokens = 300, dim = 8;
  auto const keys = make_keys(2, tokens, dim, 4);
  pqkv::pq_config cfg{.dim = dim, .m = 2, .nbits = 4, .max_iter = 0, .seed = 31,
                      .init = pqkv::init_method::random_sample};
  auto c = centroids_for(cfg, 2);
  auto const rep = pqkv::cpu::kmeans_trainer{cfg}.train(keys.const_view(), c.view());
  CHECK(rep.iterations == 0);
  CHECK_FALSE(rep.converged);
  REQUIRE(rep.objective.size() == 1);
  for (index_t h = 0; h < 2; ++h) {
    for (index_t s = 0; s < 2; ++s) {
      // The documented draw: partial Fisher-Yates with stream(random_sample, h, s).
      std::vector<index_t> perm(static_cast<std::size_t>(tokens));
      std::iota(perm.begin(), perm.end(), index_t{0});
      auto const stream = (std::uint64_t{2} << 48) ^ (static_cast<std::uint64_t>(h) << 16) ^ static_cast<std::uint64_t>(s);
      for (index_t k = 0; k < cfg.ksub(); ++k) {
        auto const j = k + static_cast<index_t>(pqkv::detail::random_below(cfg.seed, stream, static_cast<std::uint64_t>(k),
                                                                          static_cast<std::uint64_t>(tokens - k)));
        std::swap(perm[static_cast<std::size_t>(k)], perm[static_cast<std::size_t>(j)]);
        index_t const row = perm[static_cast<std::size_t>(k)];
        for (index_t j2 = 0; j2 < 4; ++j2) { CHECK(c.view()(h, s, k, j2) == keys.view()(h, row, s * 4 + j2)); }
      }
    }
  }
  // kmeans++ picks ksub distinct training rows (the keys have no duplicates).
  cfg.init = pqkv::init_method::kmeans_plus_plus;
  pqkv::cpu::kmeans_trainer{cfg}.train(keys.const_view(), c.view());
  for (index_t h = 0; h < 2; ++h) {
    for (index_t s = 0; s < 2; ++s) {
      std::vector<index_t> rows;
      for (index_t k = 0; k < cfg.ksub(); ++k) {
        for (index_t t = 0; t < tokens; ++t) {
          bool same = true;
          for (index_t j = 0; j < 4; ++j) { same = same && c.view()(h, s, k, j) == keys.view()(h, t, s * 4 + j); }
          if (same) {
            rows.push_back(t);
            break;
          }
        }
      }
      REQUIRE(rows.size() == static_cast<std::size_t>(cfg.ksub()));
      std::sort(rows.begin(), rows.end());
      CHECK(std::adjacent_find(rows.begin(), rows.end()) == rows.end());
    }
  }
}

TEST_CASE("kmeans: provided init is respected")
{
  index_t const tokens = 200, dim = 4;
  pqkv::host_tensor<float, 3> keys(1, tokens, dim);  // uniform in [-2, 2)^4
  for (std::size_t i = 0; i < keys.size(); ++i) {
    keys.data()[i] = static_cast<float>(4 * pqkv::detail::random_unit(6, 0, i) - 2);
  }
  pqkv::pq_config cfg{.dim = dim, .m = 1, .nbits = 2, .max_iter = 0, .tol = 0, .init = pqkv::init_method::provided};
  auto c = centroids_for(cfg, 1);
  for (index_t k = 0; k < 4; ++k) {
    for (index_t j = 0; j < dim; ++j) { c.view()(0, 0, k, j) = static_cast<float>(k) - 1.5f + 0.1f * static_cast<float>(j); }
  }
  auto const before = c.storage();
  auto rep = pqkv::cpu::kmeans_trainer{cfg}.train(keys.const_view(), c.view());
  CHECK(c.storage() == before);  // max_iter = 0: the init is the result
  CHECK(rep.mse == doctest::Approx(brute_mse(keys.const_view(), c.const_view())).epsilon(1e-5));

  // One iteration: every centroid moves to the mean of the rows nearest to it.
  cfg.max_iter = 1;
  pqkv::cpu::kmeans_trainer{cfg}.train(keys.const_view(), c.view());
  std::vector<double> sums(16, 0.0);
  std::vector<int> counts(4, 0);
  pqkv::host_tensor<float, 4> init(1, 1, 4, dim);
  init.storage() = before;
  for (index_t t = 0; t < tokens; ++t) {
    index_t best = 0;
    for (index_t k = 1; k < 4; ++k) {
      if (sq_dist(keys.view(), init.const_view(), 0, t, 0, k) < sq_dist(keys.view(), init.const_view(), 0, t, 0, best)) {
        best = k;
      }
    }
    ++counts[static_cast<std::size_t>(best)];
    for (index_t j = 0; j < dim; ++j) { sums[static_cast<std::size_t>(best * dim + j)] += keys.view()(0, t, j); }
  }
  for (index_t k = 0; k < 4; ++k) {
    REQUIRE(counts[static_cast<std::size_t>(k)] > 0);
    for (index_t j = 0; j < dim; ++j) {
      CHECK(c.view()(0, 0, k, j) ==
            doctest::Approx(sums[static_cast<std::size_t>(k * dim + j)] / counts[static_cast<std::size_t>(k)]).epsilon(1e-6));
    }
  }
}

TEST_CASE("kmeans: an empty cluster takes the row farthest from its centroid")
{
  index_t const tokens = 50, dim = 2;
  pqkv::host_tensor<float, 3> keys(1, tokens, dim);
  for (index_t t = 0; t < tokens; ++t) {
    keys.view()(0, t, 0) = 0.01f * static_cast<float>(t);
    keys.view()(0, t, 1) = t == 17 ? 3.f : 0.f;  // row 17 is the outlier
  }
  pqkv::pq_config cfg{.dim = dim, .m = 1, .nbits = 1, .max_iter = 1, .tol = 0, .init = pqkv::init_method::provided};
  auto c = centroids_for(cfg, 1);
  c.view()(0, 0, 0, 0) = 100.f;  // centroid 0 is nearest to nothing
  c.view()(0, 0, 0, 1) = 100.f;
  c.view()(0, 0, 1, 0) = 0.f;
  c.view()(0, 0, 1, 1) = 0.f;
  auto const rep = pqkv::cpu::kmeans_trainer{cfg}.train(keys.const_view(), c.view());
  CHECK(c.view()(0, 0, 0, 0) == keys.view()(0, 17, 0));
  CHECK(c.view()(0, 0, 0, 1) == keys.view()(0, 17, 1));
  CHECK(rep.objective[1] < rep.objective[0]);
}

TEST_CASE("kmeans: max_train_points trains on the documented subsample, codes cover every token")
{
  index_t const tokens = 1000, sample = 100, dim = 2;
  pqkv::host_tensor<float, 3> keys(1, tokens, dim);
  for (index_t t = 0; t < tokens; ++t) {
    keys.view()(0, t, 0) = static_cast<float>(t) / 100.f;
    keys.view()(0, t, 1) = 1.f;
  }
  pqkv::pq_config cfg{.dim = dim, .m = 1, .nbits = 1, .max_iter = 0, .seed = 3,
                      .init = pqkv::init_method::provided, .max_train_points = sample};
  auto c = centroids_for(cfg, 1);  // both centroids at the origin
  pqkv::host_tensor<std::uint8_t, 3> codes(1, tokens, 1);
  auto const rep = pqkv::cpu::kmeans_trainer{cfg}.train(keys.const_view(), c.view(), codes.view());
  // objective[0] = mean squared norm over exactly the documented sample rows.
  std::vector<index_t> perm(static_cast<std::size_t>(tokens));
  std::iota(perm.begin(), perm.end(), index_t{0});
  auto const stream = std::uint64_t{1} << 48;  // stream(subsample, head 0, 0)
  double expect = 0;
  for (index_t i = 0; i < sample; ++i) {
    auto const j = i + static_cast<index_t>(pqkv::detail::random_below(cfg.seed, stream, static_cast<std::uint64_t>(i),
                                                                      static_cast<std::uint64_t>(tokens - i)));
    std::swap(perm[static_cast<std::size_t>(i)], perm[static_cast<std::size_t>(j)]);
    double const x = static_cast<double>(perm[static_cast<std::size_t>(i)]) / 100.0;
    expect += x * x + 1.0;
  }
  CHECK(rep.mse == doctest::Approx(expect / sample).epsilon(1e-5));
  double all = 0;
  for (index_t t = 0; t < tokens; ++t) { all += std::pow(t / 100.0, 2) + 1.0; }
  CHECK(std::abs(rep.mse - all / tokens) > 0.01);  // not the full-data mean

  // Trained on a subsample, every token still gets its nearest centroid's code.
  cfg.init = pqkv::init_method::kmeans_plus_plus;
  cfg.max_iter = 5;
  pqkv::cpu::kmeans_trainer{cfg}.train(keys.const_view(), c.view(), codes.view());
  for (index_t t = 0; t < tokens; ++t) {
    auto const mine = codes.view()(0, t, 0);
    CHECK(sq_dist(keys.view(), c.const_view(), 0, t, 0, mine) <=
          sq_dist(keys.view(), c.const_view(), 0, t, 0, 1 - mine) + 1e-5);
  }

  // max_train_points >= tokens means all rows.
  auto cfg_all = cfg;
  cfg_all.max_train_points = tokens;
  cfg.max_train_points = 0;
  auto c_all = centroids_for(cfg, 1), c_zero = centroids_for(cfg, 1);
  pqkv::cpu::kmeans_trainer{cfg_all}.train(keys.const_view(), c_all.view());
  pqkv::cpu::kmeans_trainer{cfg}.train(keys.const_view(), c_zero.view());
  CHECK(c_all.storage() == c_zero.storage());
}

TEST_CASE("kmeans: half and bfloat16 keys train exactly like the float keys they round to")
{
  index_t const heads = 2, tokens = 400, dim = 16;
  auto const keys = make_keys(heads, tokens, dim, 12);
  pqkv::host_tensor<__half, 3> as_half(heads, tokens, dim);
  pqkv::host_tensor<__nv_bfloat16, 3> as_bf16(heads, tokens, dim);
  pqkv::host_tensor<float, 3> half_f(heads, tokens, dim), bf16_f(heads, tokens, dim);
  for (std::size_t i = 0; i < keys.size(); ++i) {
    as_half.data()[i] = pqkv::from_float<__half>(keys.data()[i]);
    as_bf16.data()[i] = pqkv::from_float<__nv_bfloat16>(keys.data()[i]);
    half_f.data()[i] = pqkv::to_float(as_half.data()[i]);
    bf16_f.data()[i] = pqkv::to_float(as_bf16.data()[i]);
  }
  pqkv::pq_config cfg{.dim = dim, .m = 4, .nbits = 4, .max_iter = 5, .seed = 2};
  pqkv::cpu::kmeans_trainer const trainer{cfg};
  auto a = centroids_for(cfg, heads), b = centroids_for(cfg, heads);
  auto const ra = trainer.train(as_half.const_view(), a.view());
  auto const rb = trainer.train(half_f.const_view(), b.view());
  CHECK(a.storage() == b.storage());
  CHECK(ra.objective == rb.objective);
  trainer.train(as_bf16.const_view(), a.view());
  trainer.train(bf16_f.const_view(), b.view());
  CHECK(a.storage() == b.storage());
  trainer.train(keys.const_view(), b.view());
  CHECK(a.storage() != b.storage());  // bf16 rounding does change the data
}

TEST_CASE("kmeans: strided NHD keys train exactly like row-major keys")
{
  index_t const heads = 3, tokens = 300, dim = 8;
  auto const keys = make_keys(heads, tokens, dim, 13);
  std::vector<float> nhd(keys.size());  // [tokens, heads, dim]
  for (index_t h = 0; h < heads; ++h) {
    for (index_t t = 0; t < tokens; ++t) {
      for (index_t d = 0; d < dim; ++d) { nhd[static_cast<std::size_t>((t * heads + h) * dim + d)] = keys.view()(h, t, d); }
    }
  }
  auto const strided =
    pqkv::make_strided_view<float const, 3>(nhd.data(), {heads, tokens, dim}, {dim, heads * dim, 1});
  pqkv::pq_config cfg{.dim = dim, .m = 2, .nbits = 3, .max_iter = 5, .seed = 8};
  pqkv::cpu::kmeans_trainer trainer{cfg};
  auto a = centroids_for(cfg, heads), b = centroids_for(cfg, heads);
  trainer.train(strided, a.view());
  train_generic<pqkv::cpu::kmeans_trainer, float>(trainer, keys.const_view(), b.view());
  CHECK(a.storage() == b.storage());
}

TEST_CASE("kmeans: fewer tokens than ksub makes every row a centroid")
{
  index_t const tokens = 5, dim = 4;
  auto const keys = make_keys(2, tokens, dim, 14);
  pqkv::pq_config cfg{.dim = dim, .m = 2, .nbits = 4, .max_iter = 10};
  auto c = centroids_for(cfg, 2);
  pqkv::host_tensor<std::uint8_t, 3> codes(2, tokens, cfg.m);
  pqkv::kmeans_report rep;
  REQUIRE_NOTHROW(rep = pqkv::cpu::kmeans_trainer{cfg}.train(keys.const_view(), c.view(), codes.view()));
  CHECK(rep.iterations == 0);
  CHECK(rep.converged);
  CHECK(rep.mse < 1e-5);
  for (index_t h = 0; h < 2; ++h) {
    for (index_t s = 0; s < 2; ++s) {
      for (index_t k = 0; k < cfg.ksub(); ++k) {
        for (index_t j = 0; j < 2; ++j) { CHECK(c.view()(h, s, k, j) == keys.view()(h, k % tokens, s * 2 + j)); }
      }
      for (index_t t = 0; t < tokens; ++t) { CHECK(sq_dist(keys.view(), c.const_view(), h, t, s, codes.view()(h, t, s)) < 1e-6); }
    }
  }
}

TEST_CASE("kmeans: tol stops each problem early and the history matches the iterations")
{
  auto const keys = make_keys(2, 600, 8, 15);
  pqkv::pq_config cfg{.dim = 8, .m = 2, .nbits = 3, .max_iter = 100, .tol = 1e-3, .seed = 1};
  auto c = centroids_for(cfg, 2);
  auto const rep = pqkv::cpu::kmeans_trainer{cfg}.train(keys.const_view(), c.view());
  CHECK(rep.converged);
  CHECK(rep.iterations < 100);
  CHECK(rep.objective.size() == static_cast<std::size_t>(rep.iterations) + 1);
  CHECK(rep.mse == rep.objective.back());
  // Problems stop independently: head 0 trained alone gives the same centroids
  // (head 1's data and stopping point do not affect it).
  auto one = centroids_for(cfg, 1);
  auto const head0 = pqkv::make_view(keys.data(), 1, 600, 8);
  pqkv::cpu::kmeans_trainer{cfg}.train(head0, one.view());
  CHECK(std::equal(one.storage().begin(), one.storage().end(), c.storage().begin()));
}

TEST_CASE("kmeans: the portable kernel gives the same bits as the vectorized one")
{
  using namespace pqkv::detail::kmeans;
  for (index_t dsub : {1, 3, 4, 8, 16, 32, 64}) {
    CAPTURE(dsub);
    index_t const blocks = 3, ksub = 12;
    std::vector<float> xt(static_cast<std::size_t>(blocks * dsub * lanes));
    for (std::size_t i = 0; i < xt.size(); ++i) { xt[i] = static_cast<float>(pqkv::detail::random_unit(1, 1, i) - 0.5); }
    codebook_state cb;
    cb.resize(ksub, dsub);
    for (std::size_t i = 0; i < cb.c.size(); ++i) { cb.c[i] = static_cast<float>(pqkv::detail::random_unit(1, 2, i) - 0.5); }
    std::copy_n(cb.c.begin(), dsub, cb.c.begin() + 5 * dsub);  // a duplicate centroid: ties go to the lower index
    cb.refresh(ksub, dsub);
    std::vector<std::int32_t> ia(static_cast<std::size_t>(blocks * lanes)), ib(ia.size());
    std::vector<float> ra(ia.size()), rb(ia.size());
    assign_blocks(xt.data(), 0, blocks, dsub, cb.ct.data(), cb.cn.data(), round_up(ksub, group), ia.data(), ra.data());
    assign_blocks_generic(xt.data(), 0, blocks, dsub, cb.ct.data(), cb.cn.data(), round_up(ksub, group), ib.data(),
                          rb.data());
    CHECK(ia == ib);
    CHECK(ra == rb);
    CHECK(std::find(ia.begin(), ia.end(), 5) == ia.end());

    // k-means++ distances: vectorized blocks (pairs) and the scalar tail agree
    // with the documented scalar evaluation, bit for bit.
    std::vector<float> d(static_cast<std::size_t>(blocks * lanes), std::numeric_limits<float>::infinity());
    std::vector<double> sums(static_cast<std::size_t>(blocks));
    double const total = min_distance_to(xt.data(), blocks, dsub, cb.c.data() + dsub, d.data(), sums.data());
    double expect_total = 0;
    for (index_t b = 0; b < blocks; ++b) {
      float ref[lanes];
      for (index_t l = 0; l < lanes; ++l) {
        float acc = 0.f;
        for (index_t j = 0; j < dsub; ++j) {
          float const diff = xt[static_cast<std::size_t>((b * dsub + j) * lanes + l)] - cb.c[static_cast<std::size_t>(dsub + j)];
          acc = std::fma(diff, diff, acc);
        }
        ref[l] = acc;
        CHECK(d[static_cast<std::size_t>(b * lanes + l)] == acc);
      }
      CHECK(sums[static_cast<std::size_t>(b)] == block_tree_sum(ref));
      expect_total += block_tree_sum(ref);
    }
    CHECK(total == expect_total);
  }
}

TEST_CASE("kmeans: bad input throws pqkv::error naming the argument, before writing output")
{
  index_t const heads = 2, tokens = 64, dim = 8;
  auto keys = make_keys(heads, tokens, dim, 16);
  pqkv::pq_config cfg{.dim = dim, .m = 2, .nbits = 3};
  pqkv::cpu::kmeans_trainer const trainer{cfg};
  auto c = centroids_for(cfg, heads);
  auto msg = [&](auto&& fn) { return error_message(fn); };

  CHECK(contains(msg([] { pqkv::cpu::kmeans_trainer{pqkv::pq_config{.dim = 8, .m = 3}}; }), "m=3 does not divide dim=8"));
  CHECK(contains(msg([] { pqkv::cpu::kmeans_trainer{pqkv::pq_config{.dim = 8, .m = 2, .nbits = 9}}; }), "nbits=9"));
  CHECK(contains(msg([] { pqkv::cpu::kmeans_trainer{pqkv::pq_config{.dim = 8, .m = 2, .nbits = 4, .max_train_points = 10}}; }),
                 "config.max_train_points=10 must be 0 or >= config.ksub()=16"));

  pqkv::host_tensor<float, 3> wrong_dim(heads, tokens, 6);
  CHECK(contains(msg([&] { trainer.train(wrong_dim.const_view(), c.view()); }), "keys.extent(2)=6, config.dim=8"));
  pqkv::host_tensor<float, 3> no_tokens(heads, 0, dim);
  CHECK(contains(msg([&] { trainer.train(no_tokens.const_view(), c.view()); }), "keys.extent(1)=0"));
  pqkv::host_tensor<float, 3> no_heads(0, tokens, dim);
  auto c0 = centroids_for(cfg, 0);
  CHECK(contains(msg([&] { trainer.train(no_heads.const_view(), c0.view()); }), "keys.extent(0)=0"));
  auto const null_keys = pqkv::make_view(static_cast<float const*>(nullptr), heads, tokens, dim);
  CHECK(contains(msg([&] { trainer.train(null_keys, c.view()); }), "keys.data_handle() is null"));

  pqkv::host_tensor<float, 4> bad_heads(3, 2, 8, 4), bad_m(heads, 4, 8, 2), bad_ksub(heads, 2, 16, 4), bad_dsub(heads, 2, 8, 2);
  CHECK(contains(msg([&] { trainer.train(keys.const_view(), bad_heads.view()); }), "centroids.extent(0)=3, heads=2"));
  CHECK(contains(msg([&] { trainer.train(keys.const_view(), bad_m.view()); }), "centroids.extent(1)=4, config.m=2"));
  CHECK(contains(msg([&] { trainer.train(keys.const_view(), bad_ksub.view()); }), "centroids.extent(2)=16, config.ksub()=8"));
  CHECK(contains(msg([&] { trainer.train(keys.const_view(), bad_dsub.view()); }), "centroids.extent(3)=2, config.dsub()=4"));
  auto const null_c = pqkv::make_view(static_cast<float*>(nullptr), heads, 2, 8, 4);
  CHECK(contains(msg([&] { trainer.train(keys.const_view(), null_c); }), "centroids.data_handle() is null"));
  pqkv::host_tensor<std::uint8_t, 3> bad_codes(heads, tokens, 3);
  CHECK(contains(msg([&] { trainer.train(keys.const_view(), c.view(), bad_codes.view()); }), "codes.extent(2)=3, config.m=2"));

  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    for (auto& v : c.storage()) { v = 42.f; }
    auto k2 = keys;
    k2.view()(1, 7, 3) = bad;
    k2.view()(1, 9, 0) = bad;  // only the first in (head, token, channel) order is named
    std::string const m = msg([&] { trainer.train(k2.const_view(), c.view()); });
    CHECK(contains(m, "pqkv::error: kmeans_trainer.train: keys(1, 7, 3)="));
    CHECK(contains(m, "is not finite"));
    CHECK(std::all_of(c.storage().begin(), c.storage().end(), [](float v) { return v == 42.f; }));
  }
  auto huge = keys;
  huge.view()(0, 5, 6) = 1e19f;
  huge.view()(0, 5, 7) = 1e19f;
  CHECK(contains(msg([&] { trainer.train(huge.const_view(), c.view()); }), "keys(0, 5, subspace 1) has squared norm"));

  pqkv::pq_config provided = cfg;
  provided.init = pqkv::init_method::provided;
  auto pc = centroids_for(provided, heads);
  pc.view()(1, 0, 2, 3) = std::numeric_limits<float>::quiet_NaN();
  CHECK(contains(msg([&] { pqkv::cpu::kmeans_trainer{provided}.train(keys.const_view(), pc.view()); }),
                 "init=provided but centroids(1, 0, 2, 3)=nan is not finite"));
}

TEST_CASE("kmeans: the docs/codebook.md example")
{
  index_t const heads = 2, tokens = 1500;
  auto const k = make_keys(heads, tokens, 128, 17);
  pqkv::kv_view<float const> keys = k.const_view();
  // example-begin
  pqkv::pq_config cfg{.dim = 128, .m = 16, .nbits = 6};  // 16 sub-vectors of 8 channels, 64 centroids each
  pqkv::cpu::kmeans_trainer trainer{cfg};                 // validates cfg

  pqkv::codebook book{cfg, keys.extent(0)};               // centroids [heads, m, ksub, dsub]
  pqkv::host_tensor<std::uint8_t, 3> codes(keys.extent(0), keys.extent(1), cfg.m);
  pqkv::kmeans_report rep = trainer.train(keys, book.centroids(), codes.view());
  // rep.mse: mean over heads and tokens of the squared error of the PQ reconstruction
  // example-end
  CHECK(rep.iterations > 0);
  CHECK(rep.mse == doctest::Approx(brute_mse(keys, book.centroids())).epsilon(1e-5));
}

// SPDX-License-Identifier: Apache-2.0
#include <pqkv/core/host_tensor.hpp>
#include <pqkv/sparse/block_sparse_attention.hpp>
#include <pqkv/sparse/calibrate.hpp>
#include <pqkv/sparse/sale_mask.hpp>

#include "common/test_util.hpp"
#include "sparse_test_util.hpp"

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace {

using pqkv::index_t;
using pqkv::test::error_message;

/// Largest |out - naive| over every row and head, the naive loop attending
/// the keys whose block bit is set.
double worst_vs_naive(pqkv::test::batch_data const& b, pqkv::sparse_config const& cfg,
                      pqkv::host_tensor<std::uint32_t, 4> const& bits, pqkv::host_tensor<float, 3> const& out)
{
  double worst = 0;
  for (std::size_t s = 0; s + 1 < b.cu.size(); ++s) {
    index_t const t0 = b.cu[s], n = b.cu[s + 1] - t0;
    for (index_t h = 0; h < b.q.extent(0); ++h) {
      for (index_t i = 0; i < n; ++i) {
        auto const want = pqkv::test::naive_row_attention(b.q, b.k, b.v, h, t0, i, [&](index_t j) {
          return pqkv::cpu::mask_bit(bits.const_view(), static_cast<index_t>(s), h, i / cfg.block_q, j / cfg.block_k);
        });
        for (index_t d = 0; d < b.v.extent(2); ++d) {
          worst = std::max(worst, std::abs(out.view()(h, t0 + i, d) - want[static_cast<std::size_t>(d)]));
        }
      }
    }
  }
  return worst;
}

}  // namespace

TEST_CASE("block_sparse_attention: dense and sparse masks match a double loop, GQA and ragged")
{
  auto const b = pqkv::test::make_batch(4, 1, 64, {0, 60, 61, 110}, 5);
  pqkv::sparse_config const cfg{.block_q = 16, .block_k = 16, .sink = 16, .local = 16};
  pqkv::cpu::sale_estimator const est{b.q.const_view(), b.k.const_view(), b.cu, cfg};
  auto const m = est.shape();
  pqkv::host_tensor<float, 3> out(4, 110, 64);
  for (float tau : {0.f, 0.01f, std::numeric_limits<float>::infinity()}) {
    CAPTURE(tau);
    pqkv::host_tensor<std::uint32_t, 4> bits(m.batch, m.q_heads, m.q_blocks, m.words);
    std::vector<float> const taus(4, tau);
    pqkv::cpu::build_mask(est, std::span<float const>{taus}, bits.view());
    pqkv::cpu::block_sparse_attention(b.q.const_view(), b.k.const_view(), b.v.const_view(), b.cu, cfg,
                                      bits.const_view(), out.view());
    CHECK(worst_vs_naive(b, cfg, bits, out) < 1e-5);  // float logits of up to ~15
  }
  // A hand-made mask that drops a row's every block: the row is 0.
  pqkv::host_tensor<std::uint32_t, 4> none(m.batch, m.q_heads, m.q_blocks, m.words);
  pqkv::cpu::block_sparse_attention(b.q.const_view(), b.k.const_view(), b.v.const_view(), b.cu, cfg,
                                    none.const_view(), out.view());
  for (std::size_t i = 0; i < out.size(); ++i) { CHECK(out.data()[i] == 0.f); }
}

TEST_CASE("block_sparse_attention: bad input throws naming the argument")
{
  auto const b = pqkv::test::make_batch(2, 1, 64, {0, 64}, 6);
  pqkv::sparse_config const cfg{};
  auto const m = pqkv::make_mask_shape(b.cu, 2, 1, cfg);
  pqkv::host_tensor<std::uint32_t, 4> bits(m.batch, m.q_heads, m.q_blocks, m.words);
  pqkv::host_tensor<float, 3> out(2, 64, 64);
  pqkv::host_tensor<std::uint32_t, 4> small(m.batch, 1, m.q_blocks, m.words);
  CHECK(error_message([&] {
          pqkv::cpu::block_sparse_attention(b.q.const_view(), b.k.const_view(), b.v.const_view(), b.cu, cfg,
                                            small.const_view(), out.view());
        }).find("bitmask extents (1, 1, 1, 1) differ") != std::string::npos);
  pqkv::host_tensor<float, 3> out_small(2, 63, 64);
  CHECK(error_message([&] {
          pqkv::cpu::block_sparse_attention(b.q.const_view(), b.k.const_view(), b.v.const_view(), b.cu, cfg,
                                            bits.const_view(), out_small.view());
        }).find("out extents") != std::string::npos);
  auto v = b.v;
  v.view()(0, 2, 1) = std::numeric_limits<float>::quiet_NaN();
  CHECK(error_message([&] {
          pqkv::cpu::block_sparse_attention(b.q.const_view(), b.k.const_view(), v.const_view(), b.cu, cfg,
                                            bits.const_view(), out.view());
        }).find("v(0, 2, 1)=nan") != std::string::npos);
  pqkv::sparse_config bad = cfg;
  bad.block_q = 8;
  CHECK(error_message([&] {
          pqkv::cpu::block_sparse_attention(b.q.const_view(), b.k.const_view(), b.v.const_view(), b.cu, bad,
                                            bits.const_view(), out.view());
        }).find("block_q=8") != std::string::npos);
}

TEST_CASE("calibrate_tau: follows the halving search, and tau falls as theta does")
{
  auto const b = pqkv::test::make_batch(2, 1, 64, {0, 80, 144}, 8);
  pqkv::sparse_config const cfg{.block_q = 16, .block_k = 16, .sink = 16, .local = 16};
  pqkv::cpu::sale_estimator const est{b.q.const_view(), b.k.const_view(), b.cu, cfg};
  auto const m = est.shape();
  // Errors along the halving sequence, the slow way: build_mask + attention per tau.
  pqkv::host_tensor<float, 3> ref(2, 144, 64), out(2, 144, 64);
  pqkv::host_tensor<std::uint32_t, 4> bits(m.batch, m.q_heads, m.q_blocks, m.words);
  std::vector<float> zero(2, 0.f);
  pqkv::cpu::build_mask(est, std::span<float const>{zero}, bits.view());
  pqkv::cpu::block_sparse_attention(b.q.const_view(), b.k.const_view(), b.v.const_view(), b.cu, cfg,
                                    bits.const_view(), ref.view());
  std::vector<float> ladder;
  std::vector<std::vector<double>> errors;  // [step][head]
  pqkv::calibration_options const opt{.tau_start = 0.05f, .tau_floor = 1e-3f};
  for (float tau = opt.tau_start; tau >= opt.tau_floor; tau /= 2.f) {
    std::vector<float> const taus(2, tau);
    pqkv::cpu::build_mask(est, std::span<float const>{taus}, bits.view());
    pqkv::cpu::block_sparse_attention(b.q.const_view(), b.k.const_view(), b.v.const_view(), b.cu, cfg,
                                      bits.const_view(), out.view());
    std::vector<double> e(2);
    pqkv::cpu::mean_row_l1(out.const_view(), ref.const_view(), e);
    ladder.push_back(tau);
    errors.push_back(e);
  }
  CHECK(ladder.size() == 6);  // 0.05 ... 0.0015625
  CHECK(errors.front()[0] > 0.0);
  std::vector<double> thetas{1e9, errors.front()[0] * 0.3, 0.0};
  std::vector<float> previous(2, std::numeric_limits<float>::infinity());
  for (double theta : thetas) {
    CAPTURE(theta);
    auto const r = pqkv::cpu::calibrate_tau(est, b.q.const_view(), b.k.const_view(), b.v.const_view(), theta, opt);
    for (std::size_t h = 0; h < 2; ++h) {
      float want = 0.f;
      double want_err = 0.0;
      for (std::size_t i = 0; i < ladder.size(); ++i) {
        if (errors[i][h] <= theta) {
          want = ladder[i];
          want_err = errors[i][h];
          break;
        }
      }
      CHECK(r.tau[h] == want);
      CHECK(r.error[h] == doctest::Approx(want_err).epsilon(1e-12));
      CHECK(r.error[h] <= theta);
      CHECK(r.tau[h] <= previous[h]);  // monotone in theta
      previous[h] = r.tau[h];
      if (r.tau[h] == 0.f) { CHECK(r.density[h] == 1.0); }
    }
    if (theta == 1e9) {
      for (float t : r.tau) { CHECK(t == 0.05f); }
    }
  }
  CHECK(error_message([&] {
          (void)pqkv::cpu::calibrate_tau(est, b.q.const_view(), b.k.const_view(), b.v.const_view(), -1.0);
        }).find("theta=-1") != std::string::npos);
  CHECK(error_message([&] {
          (void)pqkv::cpu::calibrate_tau(est, b.q.const_view(), b.k.const_view(), b.v.const_view(),
                                         std::numeric_limits<double>::quiet_NaN());
        }).find("theta=nan") != std::string::npos);
}

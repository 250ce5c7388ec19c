// SPDX-License-Identifier: Apache-2.0
#include <pqkv/core/host_tensor.hpp>
#include <pqkv/sparse/quantize.hpp>

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

struct quantized {
  pqkv::host_tensor<std::int8_t, 3> codes;
  pqkv::host_tensor<float, 2> scales;
  pqkv::host_tensor<float, 3> means;
};

quantized run(pqkv::host_tensor<float, 3> const& x, std::vector<std::int32_t> const& cu, pqkv::quant_config cfg)
{
  auto const batch = static_cast<index_t>(cu.size()) - 1;
  quantized r{pqkv::host_tensor<std::int8_t, 3>(x.extent(0), x.extent(1), x.extent(2)),
              pqkv::host_tensor<float, 2>(x.extent(0), pqkv::quant_group_count(cu, cfg.group)),
              pqkv::host_tensor<float, 3>(batch, x.extent(0), x.extent(2))};
  pqkv::cpu::center_quantize(x.const_view(), cu, cfg, r.codes.view(), r.scales.view(), r.means.view());
  return r;
}

}  // namespace

TEST_CASE("center_quantize: codes, scales and means equal a naive quantizer bit for bit")
{
  std::vector<std::int32_t> const cu{0, 37, 37, 100, 101};  // ragged, an empty and a one-token sequence
  auto x = pqkv::test::noise_tensor(3, 101, 64, 11, 2.f);
  pqkv::test::add_bias(x, 12, 3.f);
  for (auto grid : {pqkv::quant_grid::int4, pqkv::quant_grid::int8}) {
    for (index_t group : {1, 16, 32}) {
      CAPTURE(group);
      pqkv::quant_config const cfg{grid, group};
      auto const r = run(x, cu, cfg);
      index_t mismatches = 0;
      for (index_t h = 0; h < 3; ++h) {
        for (std::size_t s = 0; s + 1 < cu.size(); ++s) {
          auto const ref = pqkv::test::naive_quantize(x, h, cu[s], cu[s + 1], group, pqkv::quant_max(grid));
          for (index_t c = 0; c < 64; ++c) {
            mismatches += r.means.view()(static_cast<index_t>(s), h, c) != ref.mean[static_cast<std::size_t>(c)];
          }
          index_t const g0 = pqkv::quant_group_offset(cu, group, s);
          for (index_t t = cu[s]; t < cu[s + 1]; ++t) {
            auto const row = static_cast<std::size_t>(t - cu[s]);
            mismatches += r.scales.view()(h, g0 + (t - cu[s]) / group) != ref.scale[row];
            for (index_t c = 0; c < 64; ++c) {
              mismatches += r.codes.view()(h, t, c) != ref.codes[row][static_cast<std::size_t>(c)];
            }
          }
        }
      }
      CHECK(mismatches == 0);
    }
  }
}

TEST_CASE("center_quantize: rounds half away from zero and clamps to the grid")
{
  // Two tokens x and -x: the mean is 0, so x' = x; amax = 7 gives inv = 1 on the 4-bit grid.
  std::vector<float> const row{7.f, 2.5f, -2.5f, 0.5f, -0.5f, 1.5f, 3.49f, -6.5f};
  pqkv::host_tensor<float, 3> x(1, 2, 8);
  for (index_t c = 0; c < 8; ++c) {
    x.view()(0, 0, c) = row[static_cast<std::size_t>(c)];
    x.view()(0, 1, c) = -row[static_cast<std::size_t>(c)];
  }
  auto const r = run(x, {0, 2}, {pqkv::quant_grid::int4, 1});
  std::vector<int> const want{7, 3, -3, 1, -1, 2, 3, -7};
  for (index_t c = 0; c < 8; ++c) {
    CHECK(r.codes.view()(0, 0, c) == want[static_cast<std::size_t>(c)]);
    CHECK(r.codes.view()(0, 1, c) == -want[static_cast<std::size_t>(c)]);
  }
  CHECK(r.scales.view()(0, 0) == 1.f);
  // A constant sequence centres to zero: scale 0, codes 0.
  pqkv::host_tensor<float, 3> flat(1, 3, 4);
  for (std::size_t i = 0; i < flat.size(); ++i) { flat.data()[i] = 5.f; }
  auto const z = run(flat, {0, 3}, {pqkv::quant_grid::int8, 16});
  CHECK(z.scales.view()(0, 0) == 0.f);
  for (std::size_t i = 0; i < z.codes.size(); ++i) { CHECK(z.codes.data()[i] == 0); }
}

TEST_CASE("center_quantize: dequantized rows are within half a step; int_dot is exact")
{
  std::vector<std::int32_t> const cu{0, 64};
  auto x = pqkv::test::noise_tensor(2, 64, 128, 3);
  pqkv::test::add_bias(x, 4, 2.f);
  for (auto grid : {pqkv::quant_grid::int4, pqkv::quant_grid::int8}) {
    auto const r = run(x, cu, {grid, 16});
    double worst = 0;
    for (index_t h = 0; h < 2; ++h) {
      for (index_t t = 0; t < 64; ++t) {
        float const step = r.scales.view()(h, t / 16);
        for (index_t c = 0; c < 128; ++c) {
          double const xc = static_cast<double>(x.view()(h, t, c)) - r.means.view()(0, h, c);
          worst = std::max(worst, std::abs(xc - r.codes.view()(h, t, c) * static_cast<double>(step)) / step);
        }
      }
    }
    CHECK(worst <= 0.5 + 1e-5);
    // Largest products of the 8-bit grid at head_dim 256 still fit: sum of 127 * 127.
    std::vector<std::int8_t> a(256, 127), b(256, -127);
    CHECK(pqkv::cpu::int_dot(a.data(), b.data(), 256) == -127 * 127 * 256);
    double exact = 0;
    for (index_t c = 0; c < 128; ++c) { exact += r.codes.view()(0, 5, c) * r.codes.view()(1, 9, c); }
    CHECK(pqkv::cpu::int_dot(&r.codes.view()(0, 5, 0), &r.codes.view()(1, 9, 0), 128) == static_cast<std::int32_t>(exact));
  }
}

TEST_CASE("sale_corrections: 8-bit estimates recover the exact logits")
{
  std::vector<std::int32_t> const cu{0, 40, 96};
  auto q = pqkv::test::noise_tensor(4, 96, 64, 21);
  auto k = pqkv::test::noise_tensor(2, 96, 64, 22);
  pqkv::test::add_bias(q, 23, 1.5f);
  pqkv::test::add_bias(k, 24, 3.f);  // a large key mean: the correction terms carry it
  pqkv::quant_config const cfg{pqkv::quant_grid::int8, 1};
  auto const rq = run(q, cu, cfg), rk = run(k, cu, cfg);
  pqkv::host_tensor<float, 2> corr(4, 96), row(4, 96);
  pqkv::cpu::sale_corrections(q.const_view(), k.const_view(), cu, rq.means.const_view(), rk.means.const_view(),
                              corr.view(), row.view());
  float const scale = 0.125f;
  double worst = 0;
  for (index_t h = 0; h < 4; ++h) {
    for (std::size_t s = 0; s < 2; ++s) {
      for (index_t i = cu[s]; i < cu[s + 1]; ++i) {
        for (index_t j = cu[s]; j <= i; ++j) {
          std::int32_t const dot = pqkv::cpu::int_dot(&rq.codes.view()(h, i, 0), &rk.codes.view()(h / 2, j, 0), 64);
          float const z = pqkv::sale_logit(rq.scales.view()(h, i), rk.scales.view()(h / 2, j), dot, corr.view()(h, j),
                                           row.view()(h, i), scale);
          double exact = 0;
          for (index_t c = 0; c < 64; ++c) { exact += static_cast<double>(q.view()(h, i, c)) * k.view()(h / 2, j, c); }
          worst = std::max(worst, std::abs(z - scale * exact));
        }
      }
    }
  }
  CHECK(worst < 0.05);  // logits here span about +-20
  CHECK(worst > 0.0);   // and quantization does show
}

TEST_CASE("center_quantize: bad input throws naming the argument")
{
  auto x = pqkv::test::noise_tensor(1, 8, 64, 1);
  pqkv::host_tensor<std::int8_t, 3> codes(1, 8, 64);
  pqkv::host_tensor<float, 2> scales(1, 8);
  pqkv::host_tensor<float, 3> means(1, 1, 64);
  std::vector<std::int32_t> const cu{0, 8};
  auto call = [&](pqkv::quant_config cfg, std::vector<std::int32_t> const& c) {
    return error_message([&] {
      pqkv::cpu::center_quantize(x.const_view(), c, cfg, codes.view(), scales.view(), means.view());
    });
  };
  CHECK(call({pqkv::quant_grid::int4, 8}, cu).find("group=8") != std::string::npos);
  CHECK(call({static_cast<pqkv::quant_grid>(15), 1}, cu).find("grid=15") != std::string::npos);
  CHECK(call({}, {0, 4}).find("cu_seqlens.back()=4") != std::string::npos);
  CHECK(call({}, {0, 9, 8}).find("cu_seqlens[2]=8") != std::string::npos);
  CHECK(call({}, {8}).find("cu_seqlens.size()=1") != std::string::npos);
  pqkv::host_tensor<float, 2> small(1, 7);
  CHECK(error_message([&] {
          pqkv::cpu::center_quantize(x.const_view(), cu, {}, codes.view(), small.view(), means.view());
        }).find("scales extents") != std::string::npos);
  x.view()(0, 3, 5) = std::numeric_limits<float>::quiet_NaN();
  CHECK(call({}, cu).find("x(0, 3, 5)=nan is not finite") != std::string::npos);
}

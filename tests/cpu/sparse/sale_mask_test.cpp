// SPDX-License-Identifier: Apache-2.0
#include <pqkv/core/host_tensor.hpp>
#include <pqkv/sparse/sale_mask.hpp>

#include "common/keygen.hpp"
#include "common/test_util.hpp"
#include "sparse_test_util.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

namespace {

using pqkv::index_t;
using pqkv::test::error_message;

constexpr float inf = std::numeric_limits<float>::infinity();

using pqkv::test::batch_data;
using pqkv::test::make_batch;

pqkv::host_tensor<std::uint32_t, 4> mask_of(pqkv::MaskEstimator auto const& est, std::vector<float> const& tau,
                                            std::vector<double>* density = nullptr)
{
  auto const m = est.shape();
  pqkv::host_tensor<std::uint32_t, 4> bits(m.batch, m.q_heads, m.q_blocks, m.words);
  std::vector<double> d(static_cast<std::size_t>(m.q_heads));
  pqkv::cpu::build_mask(est, std::span<float const>{tau}, bits.view(), std::span<double>{d});
  if (density != nullptr) { *density = d; }
  return bits;
}

bool bit(pqkv::host_tensor<std::uint32_t, 4> const& b, index_t s, index_t h, index_t qb, index_t kb)
{
  return pqkv::cpu::mask_bit(b.const_view(), s, h, qb, kb);
}

/// Compares the library's mask with the double loop: decisions must agree
/// except where the double margin is within 1e-4 of the threshold; returns
/// (disagreements outside that band, blocks inside it, estimated blocks kept,
/// estimated blocks dropped).
struct agreement {
  index_t wrong = 0, near = 0, kept = 0, dropped = 0, bad_padding = 0;
};

agreement compare_with_naive(batch_data const& b, pqkv::sparse_config const& cfg, pqkv::quant_config const& qcfg,
                             std::vector<float> const& tau)
{
  pqkv::cpu::sale_estimator const est{b.q.const_view(), b.k.const_view(), b.cu, cfg, qcfg};
  auto const bits = mask_of(est, tau);
  auto ref = pqkv::test::naive_sale(b.q, b.k, b.cu, cfg.block_q, cfg.block_k, cfg.sink, cfg.local, qcfg.group,
                                    pqkv::quant_max(qcfg.grid), tau);
  auto const m = est.shape();
  agreement a;
  for (index_t s = 0; s < m.batch; ++s) {
    for (index_t h = 0; h < m.q_heads; ++h) {
      for (index_t qb = 0; qb < m.q_blocks; ++qb) {
        for (index_t kb = 0; kb < m.words * 32; ++kb) {
          bool const got = bit(bits, s, h, qb, kb);
          if (kb >= m.k_blocks) {
            a.bad_padding += got;
            continue;
          }
          double const margin = ref.at(s, h, qb, kb);
          if (std::isnan(margin)) {
            a.bad_padding += got;
            continue;
          }
          if (std::isinf(margin) && margin > 0) {
            a.wrong += !got;
            continue;
          }
          (margin >= 0 ? a.kept : a.dropped) += 1;
          if (std::abs(margin) < 1e-4) {
            ++a.near;
          } else {
            a.wrong += got != (margin >= 0);
          }
        }
      }
    }
  }
  return a;
}

}  // namespace

TEST_CASE("sale mask: a plain double loop recomputes estimate and rule and agrees")
{
  struct tc {
    index_t qh, kvh, bq, bk, sink, local, group;
    pqkv::quant_grid grid;
    std::vector<std::int32_t> cu;
  };
  std::vector<tc> const cases{
      {4, 1, 16, 16, 16, 16, 1, pqkv::quant_grid::int4, {0, 70, 120}},    // GQA 4:1, ragged, n % block != 0
      {8, 1, 32, 16, 16, 16, 16, pqkv::quant_grid::int4, {0, 100}},       // GQA 8:1
      {2, 2, 64, 32, 32, 32, 32, pqkv::quant_grid::int8, {0, 130, 131}},  // a one-token sequence
      {2, 1, 16, 48, 0, 48, 1, pqkv::quant_grid::int4, {0, 130}},         // no sink, Bk = 48
  };
  for (auto const& c : cases) {
    CAPTURE(c.bq);
    CAPTURE(c.bk);
    auto const b = make_batch(c.qh, c.kvh, 64, c.cu, 100 + static_cast<std::uint64_t>(c.bq + c.bk));
    std::vector<float> tau(static_cast<std::size_t>(c.qh));
    for (std::size_t h = 0; h < tau.size(); ++h) { tau[h] = std::ldexp(0.02f, -static_cast<int>(h % 5)); }
    pqkv::sparse_config const cfg{.block_q = c.bq, .block_k = c.bk, .sink = c.sink, .local = c.local};
    auto const a = compare_with_naive(b, cfg, {c.grid, c.group}, tau);
    CHECK(a.wrong == 0);
    CHECK(a.bad_padding == 0);
    MESSAGE("kept ", a.kept, " dropped ", a.dropped, " near the threshold ", a.near);
    CHECK(a.near <= (a.kept + a.dropped) / 100);
    CHECK(a.kept > 0);     // the rule is exercised both ways
    if (c.sink > 0) { CHECK(a.dropped > 0); }  // without a forced sink, the sink block scores high and the rest pass
  }
}

TEST_CASE("sale mask: tau = 0 is dense, huge tau keeps the sink and local blocks only")
{
  auto const b = make_batch(4, 2, 64, {0, 201, 260}, 7);
  pqkv::sparse_config const cfg{.block_q = 32, .block_k = 16, .sink = 32, .local = 64};
  pqkv::cpu::sale_estimator const est{b.q.const_view(), b.k.const_view(), b.cu, cfg};
  auto const m = est.shape();
  CHECK(m.q_blocks == 7);
  CHECK(m.k_blocks == 13);
  CHECK(m.words == 1);
  std::vector<double> dense_density, sparse_density, inf_density;
  auto const dense = mask_of(est, {0.f, 0.f, 0.f, 0.f}, &dense_density);
  auto const huge = mask_of(est, {1e30f, 1e30f, 1e30f, 1e30f});
  auto const infinite = mask_of(est, {inf, inf, inf, inf}, &inf_density);
  auto const mixed = mask_of(est, {0.f, 0.01f, inf, 0.001f}, &sparse_density);
  for (index_t s = 0; s < m.batch; ++s) {
    index_t const n = b.cu[static_cast<std::size_t>(s) + 1] - b.cu[static_cast<std::size_t>(s)];
    for (index_t h = 0; h < 4; ++h) {
      for (index_t qb = 0; qb < m.q_blocks; ++qb) {
        for (index_t kb = 0; kb < 32; ++kb) {
          bool const causal = qb * 32 < n && kb * 16 < std::min((qb + 1) * 32, n);
          bool const forced = pqkv::test::naive_forced(n, qb, kb, 32, 16, 32, 64);
          CHECK(bit(dense, s, h, qb, kb) == causal);
          CHECK(bit(huge, s, h, qb, kb) == forced);
          CHECK(bit(infinite, s, h, qb, kb) == forced);
          if (h == 0) { CHECK(bit(mixed, s, h, qb, kb) == causal); }
          if (h == 2) { CHECK(bit(mixed, s, h, qb, kb) == forced); }
        }
      }
    }
  }
  for (double d : dense_density) { CHECK(d == 1.0); }
  CHECK(inf_density[0] < 0.8);  // forced blocks only
  CHECK(sparse_density[0] == 1.0);
  CHECK(sparse_density[2] == inf_density[2]);
  CHECK(sparse_density[1] <= sparse_density[3]);  // a smaller tau keeps a superset
  CHECK(sparse_density[1] > sparse_density[2]);
}

TEST_CASE("sale mask: n < sink + local and one token are all forced")
{
  for (std::int32_t n : {1, 17, 150}) {
    auto const b = make_batch(2, 1, 128, {0, n}, 30);
    pqkv::cpu::sale_estimator const est{b.q.const_view(), b.k.const_view(), b.cu, pqkv::sparse_config{}};
    auto const m = est.shape();
    std::vector<double> d;
    auto const bits = mask_of(est, {inf, 1e6f}, &d);
    CHECK(d[0] == 1.0);
    CHECK(d[1] == 1.0);
    for (index_t qb = 0; qb < m.q_blocks; ++qb) {
      for (index_t kb = 0; kb < m.k_blocks; ++kb) { CHECK(bit(bits, 0, 0, qb, kb) == (kb * 32 < std::min((qb + 1) * 64, index_t{n}))); }
    }
    if (n == 1) {
      CHECK(m.q_blocks == 1);
      CHECK(m.k_blocks == 1);
      CHECK(bits.view()(0, 1, 0, 0) == 1u);
    }
  }
}

TEST_CASE("sale mask: the cap keeps the highest-scoring blocks")
{
  auto const b = make_batch(2, 1, 64, {0, 200}, 41);
  pqkv::sparse_config cfg{.block_q = 16, .block_k = 16, .sink = 16, .local = 16};
  pqkv::cpu::sale_estimator const free_est{b.q.const_view(), b.k.const_view(), b.cu, cfg};
  cfg.max_blocks = 2;
  pqkv::cpu::sale_estimator const capped_est{b.q.const_view(), b.k.const_view(), b.cu, cfg};
  std::vector<float> const tau{1e-6f, 1e-6f};
  auto const all = mask_of(free_est, tau);
  auto const capped = mask_of(capped_est, tau);
  auto const m = free_est.shape();
  std::vector<double> scores(static_cast<std::size_t>(m.k_blocks));
  index_t rows_at_cap = 0;
  for (index_t h = 0; h < 2; ++h) {
    for (index_t qb = 0; qb < m.q_blocks; ++qb) {
      free_est.block_scores(0, h, qb, scores);
      std::vector<std::pair<double, index_t>> cand;
      index_t forced = 0, kept = 0;
      for (index_t kb = 0; kb <= qb; ++kb) {
        bool const f = pqkv::forced_block(cfg, 200, qb, kb);
        forced += f;
        kept += bit(capped, 0, h, qb, kb);
        if (!f && bit(all, 0, h, qb, kb)) { cand.emplace_back(-scores[static_cast<std::size_t>(kb)], kb); }
        if (bit(capped, 0, h, qb, kb)) { CHECK(bit(all, 0, h, qb, kb)); }
      }
      std::sort(cand.begin(), cand.end());
      CHECK(kept == forced + std::min<index_t>(2, static_cast<index_t>(cand.size())));
      for (std::size_t i = 0; i < cand.size() && i < 2; ++i) { CHECK(bit(capped, 0, h, qb, cand[i].second)); }
      rows_at_cap += cand.size() > 2;
    }
  }
  CHECK(rows_at_cap > 0);
}

TEST_CASE("sale mask: planted needles are kept")
{
  pqkv::test::keygen_config kc;
  kc.kv_heads = 2;
  kc.q_per_kv = 4;
  kc.dim = 64;
  kc.tokens = 256;
  kc.topic_logit = 0.0;  // a quiet background, so the rule has blocks to drop
  kc.recency_logit = 0.5;
  kc.logit_std = 1.0;
  kc.needles = 6;
  kc.needle_logit_min = 20.0;  // strong enough that the exact relative score clears tau
  kc.needle_logit_max = 24.0;
  kc.needle_query_fraction = 1.0;
  auto const kv = pqkv::test::make_kv(kc);
  pqkv::host_tensor<float, 3> q(kc.q_heads(), kc.tokens, kc.dim);
  pqkv::host_tensor<float, 2> step(kc.q_heads(), kc.dim);
  for (index_t t = 0; t < kc.tokens; ++t) {
    pqkv::test::make_queries(kc, t, t, step.view());
    for (index_t h = 0; h < kc.q_heads(); ++h) {
      for (index_t c = 0; c < kc.dim; ++c) { q.view()(h, t, c) = step.view()(h, c); }
    }
  }
  std::vector<std::int32_t> const cu{0, static_cast<std::int32_t>(kc.tokens)};
  pqkv::sparse_config const cfg{.block_q = 32, .block_k = 16, .sink = 16, .local = 32};
  std::vector<float> const tau(static_cast<std::size_t>(kc.q_heads()), 0.01f);
  pqkv::cpu::sale_estimator const est{q.const_view(), kv.keys.const_view(), cu, cfg};
  std::vector<double> density;
  auto const bits = mask_of(est, tau, &density);
  index_t needles = 0, kept = 0;
  for (index_t t = 0; t < kc.tokens; ++t) {
    for (index_t g = 0; g < kc.kv_heads; ++g) {
      index_t const p = pqkv::test::query_target(kc, t, t, g);
      if (p < 0 || pqkv::forced_block(cfg, kc.tokens, t / 32, p / 16)) { continue; }
      for (index_t j = 0; j < kc.q_per_kv; ++j) {
        ++needles;
        kept += bit(bits, 0, g * kc.q_per_kv + j, t / 32, p / 16);
      }
    }
  }
  double const mean_density = std::accumulate(density.begin(), density.end(), 0.0) / static_cast<double>(density.size());
  MESSAGE("needle blocks kept ", kept, " of ", needles, ", mean density ", mean_density);
  CHECK(needles > 100);
  // 4-bit estimates of keys with outlier channels can sink a needle below tau
  // now and then; nearly all must stay.
  CHECK(static_cast<double>(kept) >= 0.99 * static_cast<double>(needles));
  CHECK(mean_density < 0.9);  // the rule does drop blocks
}

TEST_CASE("sale mask: BSR, BlockMask, bit mask and density agree")
{
  auto const b = make_batch(4, 2, 64, {0, 300, 300, 513}, 55);
  pqkv::sparse_config const cfg{.block_q = 32, .block_k = 16, .sink = 16, .local = 32};
  pqkv::cpu::sale_estimator const est{b.q.const_view(), b.k.const_view(), b.cu, cfg};
  std::vector<double> density;
  auto const bits = mask_of(est, {0.02f, 0.005f, 0.f, inf}, &density);
  auto const m = est.shape();
  std::vector<std::int32_t> indptr(static_cast<std::size_t>(pqkv::bsr_indptr_size(m)));
  std::vector<std::int32_t> indices(static_cast<std::size_t>(pqkv::bsr_indices_capacity(m, b.cu, cfg)));
  index_t const nnz = pqkv::cpu::bitmask_to_bsr(bits.const_view(), m, indptr, indices);
  CHECK(nnz == indptr.back());
  index_t pop = 0;
  for (std::size_t i = 0; i < bits.size(); ++i) { pop += std::popcount(bits.data()[i]); }
  CHECK(nnz == pop);
  CHECK(nnz < static_cast<index_t>(indices.size()));
  for (index_t s = 0; s < m.batch; ++s) {
    for (index_t h = 0; h < m.q_heads; ++h) {
      for (index_t qb = 0; qb < m.q_blocks; ++qb) {
        auto const r = static_cast<std::size_t>((s * m.q_heads + h) * m.q_blocks + qb);
        std::vector<std::int32_t> from_bits;
        for (index_t kb = 0; kb < m.k_blocks; ++kb) {
          if (bit(bits, s, h, qb, kb)) { from_bits.push_back(static_cast<std::int32_t>(kb)); }
        }
        CHECK(std::vector<std::int32_t>(indices.begin() + indptr[r], indices.begin() + indptr[r + 1]) == from_bits);
      }
    }
  }
  // Density from the bits.
  for (index_t h = 0; h < m.q_heads; ++h) {
    double kept = 0, causal = 0;
    for (index_t s = 0; s < m.batch; ++s) {
      index_t const n = b.cu[static_cast<std::size_t>(s) + 1] - b.cu[static_cast<std::size_t>(s)];
      for (index_t qb = 0; qb < m.q_blocks; ++qb) {
        for (index_t kb = 0; kb < m.k_blocks; ++kb) {
          causal += qb * 32 < n && kb * 16 < std::min((qb + 1) * 32, n);
          kept += bit(bits, s, h, qb, kb);
        }
      }
    }
    CHECK(density[static_cast<std::size_t>(h)] == doctest::Approx(kept / causal).epsilon(1e-12));
  }
  // BlockMask at 128 x 128: the OR of the fine blocks each consumer block covers.
  auto const bm = pqkv::make_block_mask_shape(m, cfg, 128, 128);
  CHECK(bm.q_blocks == 3);  // max_len 300
  CHECK(bm.k_blocks == 3);
  pqkv::host_tensor<std::int32_t, 3> num(bm.batch, bm.q_heads, bm.q_blocks);
  pqkv::host_tensor<std::int32_t, 4> idx(bm.batch, bm.q_heads, bm.q_blocks, bm.k_blocks);
  pqkv::cpu::bitmask_to_block_mask(bits.const_view(), m, cfg, 128, 128, num.view(), idx.view());
  for (index_t s = 0; s < m.batch; ++s) {
    for (index_t h = 0; h < m.q_heads; ++h) {
      for (index_t Q = 0; Q < bm.q_blocks; ++Q) {
        std::vector<std::int32_t> want;
        for (index_t K = 0; K < bm.k_blocks; ++K) {
          bool any = false;
          for (index_t qb = Q * 4; qb < std::min((Q + 1) * 4, m.q_blocks); ++qb) {
            for (index_t kb = K * 8; kb < std::min((K + 1) * 8, m.k_blocks); ++kb) { any = any || bit(bits, s, h, qb, kb); }
          }
          if (any) { want.push_back(static_cast<std::int32_t>(K)); }
        }
        CHECK(num.view()(s, h, Q) == static_cast<std::int32_t>(want.size()));
        for (index_t K = 0; K < bm.k_blocks; ++K) {
          CHECK(idx.view()(s, h, Q, K) == (K < static_cast<index_t>(want.size()) ? want[static_cast<std::size_t>(K)] : 0));
        }
      }
    }
  }
  // The empty sequence has no rows, no bits.
  for (index_t h = 0; h < m.q_heads; ++h) {
    for (index_t qb = 0; qb < m.q_blocks; ++qb) { CHECK(bits.view()(1, h, qb, 0) == 0u); }
  }
}

TEST_CASE("mean-pooled estimator: scores match a double recomputation; tau 0 and inf behave")
{
  auto const b = make_batch(4, 2, 64, {0, 200, 333}, 77);
  pqkv::sparse_config const cfg{.block_q = 32, .block_k = 32, .sink = 32, .local = 32};
  pqkv::cpu::mean_pool_estimator const est{b.q.const_view(), b.k.const_view(), b.cu, cfg};
  auto const m = est.shape();
  std::vector<double> scores(static_cast<std::size_t>(m.k_blocks));
  double worst = 0;
  index_t checked = 0;
  for (index_t s = 0; s < 2; ++s) {
    index_t const t0 = b.cu[static_cast<std::size_t>(s)], n = b.cu[static_cast<std::size_t>(s) + 1] - t0;
    for (index_t h = 0; h < 4; ++h) {
      index_t const g = h / 2;
      for (index_t qb = 0; qb * 32 < n; ++qb) {
        est.block_scores(s, h, qb, scores);
        index_t const q1 = std::min((qb + 1) * 32, n);
        std::vector<double> qbar(64, 0.0);
        for (index_t c = 0; c < 64; ++c) {
          for (index_t i = qb * 32; i < q1; ++i) { qbar[static_cast<std::size_t>(c)] += b.q.view()(h, t0 + i, c); }
          qbar[static_cast<std::size_t>(c)] /= static_cast<double>(q1 - qb * 32);
        }
        auto logit = [&](std::vector<double> const& kv) {
          double d = 0;
          for (index_t c = 0; c < 64; ++c) { d += qbar[static_cast<std::size_t>(c)] * kv[static_cast<std::size_t>(c)]; }
          return d / 8.0;
        };
        std::vector<double> f;
        for (index_t j = 0; j < q1; ++j) {
          if (!pqkv::test::naive_forced(n, qb, j / 32, 32, 32, 32, 32)) { continue; }
          std::vector<double> kv(64);
          for (index_t c = 0; c < 64; ++c) { kv[static_cast<std::size_t>(c)] = b.k.view()(g, t0 + j, c); }
          f.push_back(logit(kv));
        }
        double const mx = *std::max_element(f.begin(), f.end());
        double l = 0;
        for (double x : f) { l += std::exp(x - mx); }
        for (index_t kb = 0; kb * 32 < q1; ++kb) {
          if (pqkv::test::naive_forced(n, qb, kb, 32, 32, 32, 32)) { continue; }
          std::vector<double> kbar(64, 0.0);
          index_t const k1 = std::min((kb + 1) * 32, n);
          for (index_t c = 0; c < 64; ++c) {
            for (index_t j = kb * 32; j < k1; ++j) { kbar[static_cast<std::size_t>(c)] += b.k.view()(g, t0 + j, c); }
            kbar[static_cast<std::size_t>(c)] /= static_cast<double>(k1 - kb * 32);
          }
          worst = std::max(worst, std::abs(scores[static_cast<std::size_t>(kb)] - (logit(kbar) - mx - std::log(l))));
          ++checked;
        }
      }
    }
  }
  CHECK(checked > 50);
  CHECK(worst < 1e-4);
  std::vector<double> d0, dinf;
  mask_of(est, {0.f, 0.f, 0.f, 0.f}, &d0);
  mask_of(est, {inf, inf, inf, inf}, &dinf);
  for (double d : d0) { CHECK(d == 1.0); }
  for (double d : dinf) { CHECK(d < 0.6); }
}

TEST_CASE("sale mask: bad input throws naming the argument")
{
  auto const b = make_batch(4, 2, 64, {0, 100}, 9);
  auto msg_cfg = [&](pqkv::sparse_config cfg) {
    return error_message([&] { pqkv::cpu::sale_estimator{b.q.const_view(), b.k.const_view(), b.cu, cfg}; });
  };
  CHECK(msg_cfg({.block_q = 48}).find("block_q=48") != std::string::npos);
  CHECK(msg_cfg({.block_k = 24}).find("block_k=24") != std::string::npos);
  CHECK(msg_cfg({.block_k = 64, .local = 32}).find("local=32 must be >= block_k=64") != std::string::npos);
  CHECK(msg_cfg({.sink = -1}).find("sink=-1") != std::string::npos);
  CHECK(msg_cfg({.max_blocks = -2}).find("max_blocks=-2") != std::string::npos);
  auto const q32 = pqkv::test::noise_tensor(4, 100, 32, 1), k32 = pqkv::test::noise_tensor(2, 100, 32, 2);
  CHECK(error_message([&] {
          pqkv::cpu::sale_estimator{q32.const_view(), k32.const_view(), b.cu, pqkv::sparse_config{}};
        }).find("head_dim=32") != std::string::npos);
  auto const k3 = pqkv::test::noise_tensor(3, 100, 64, 2);
  CHECK(error_message([&] {
          pqkv::cpu::sale_estimator{b.q.const_view(), k3.const_view(), b.cu, pqkv::sparse_config{}};
        }).find("q heads=4 is not a positive multiple of kv heads=3") != std::string::npos);
  pqkv::host_tensor<__nv_bfloat16, 3> kb(2, 100, 64);
  CHECK(error_message([&] {
          pqkv::cpu::sale_estimator{b.q.const_view(), kb.const_view(), b.cu, pqkv::sparse_config{}};
        }).find("q dtype=f32 differs from k dtype=bf16") != std::string::npos);
  CHECK(error_message([&] {
          pqkv::cpu::mean_pool_estimator{b.q.const_view(), kb.const_view(), b.cu, pqkv::sparse_config{}};
        }).find("q dtype=f32") != std::string::npos);
  CHECK(error_message([&] {
          pqkv::cpu::sale_estimator{b.q.const_view(), b.k.const_view(), b.cu, pqkv::sparse_config{},
                                    pqkv::quant_config{pqkv::quant_grid::int4, 4}};
        }).find("group=4") != std::string::npos);
  pqkv::cpu::sale_estimator const est{b.q.const_view(), b.k.const_view(), b.cu, pqkv::sparse_config{}};
  auto const m = est.shape();
  pqkv::host_tensor<std::uint32_t, 4> bits(m.batch, m.q_heads, m.q_blocks, m.words);
  auto build = [&](std::vector<float> tau) {
    return error_message([&] { pqkv::cpu::build_mask(est, std::span<float const>{tau}, bits.view()); });
  };
  CHECK(build({0.1f, -0.5f, 0.f, 0.f}).find("tau[1]=-0.5") != std::string::npos);
  CHECK(build({0.1f, 0.f, std::numeric_limits<float>::quiet_NaN(), 0.f}).find("tau[2]=nan") != std::string::npos);
  CHECK(build({0.1f}).find("tau.size()=1, q_heads=4") != std::string::npos);
  pqkv::host_tensor<std::uint32_t, 4> small(m.batch, m.q_heads, m.q_blocks - 1, m.words);
  std::vector<float> const tau(4, 0.1f);
  CHECK(error_message([&] { pqkv::cpu::build_mask(est, std::span<float const>{tau}, small.view()); })
            .find("bitmask extents") != std::string::npos);
  std::vector<double> d1(1);
  CHECK(error_message([&] {
          pqkv::cpu::build_mask(est, std::span<float const>{tau}, bits.view(), std::span<double>{d1});
        }).find("density.size()=1") != std::string::npos);
  std::vector<std::int32_t> indptr(static_cast<std::size_t>(pqkv::bsr_indptr_size(m)) - 1), indices(1);
  CHECK(error_message([&] { pqkv::cpu::bitmask_to_bsr(bits.const_view(), m, indptr, indices); })
            .find("indptr.size()") != std::string::npos);
  pqkv::cpu::build_mask(est, std::span<float const>{tau}, bits.view());
  indptr.resize(indptr.size() + 1);
  CHECK(error_message([&] { pqkv::cpu::bitmask_to_bsr(bits.const_view(), m, indptr, indices); })
            .find("indices.size()=1 is smaller than") != std::string::npos);
  CHECK(error_message([&] { (void)pqkv::make_block_mask_shape(m, est.config(), 96, 128); })
            .find("consumer block_q=96") != std::string::npos);
  pqkv::host_tensor<std::int32_t, 3> num(1, 4, 1);
  pqkv::host_tensor<std::int32_t, 4> idx(1, 4, 1, 0);
  CHECK(error_message([&] {
          pqkv::cpu::bitmask_to_block_mask(bits.const_view(), m, est.config(), 128, 128, num.view(), idx.view());
        }).find("kv_indices extents") != std::string::npos);
  auto qn = b.q;
  qn.view()(1, 7, 3) = std::numeric_limits<float>::infinity();
  CHECK(error_message([&] {
          pqkv::cpu::sale_estimator{qn.const_view(), b.k.const_view(), b.cu, pqkv::sparse_config{}};
        }).find("q(1, 7, 3)=inf is not finite") != std::string::npos);
}

namespace {

/// SpargeAttn's LUT recomputed by a plain loop over positions: consumer block
/// (Q, K) is kept iff a mask bit is set for some q block holding a row of
/// [Q cq, (Q+1) cq) and key block holding a key of [K ck, (K+1) ck); per row
/// the kept K ascending as the first index, then steps, then zeros.
struct plain_lut {
  std::vector<std::int32_t> valid, lut;
};

plain_lut plain_sparge_lut(pqkv::host_tensor<std::uint32_t, 4> const& bits, pqkv::mask_shape const& m, index_t bq,
                           index_t bk, index_t cq, index_t ck)
{
  index_t const nq = (m.max_len + cq - 1) / cq, nk = (m.max_len + ck - 1) / ck;
  plain_lut r;
  for (index_t s = 0; s < m.batch; ++s) {
    for (index_t h = 0; h < m.q_heads; ++h) {
      for (index_t Q = 0; Q < nq; ++Q) {
        std::vector<std::int32_t> row(static_cast<std::size_t>(nk), 0);
        std::int32_t cnt = 0, prev = 0;
        for (index_t K = 0; K < nk; ++K) {
          bool any = false;
          for (index_t i = Q * cq; i < (Q + 1) * cq; i += bq) {
            for (index_t j = K * ck; j < (K + 1) * ck; j += bk) {
              if (i / bq < m.q_blocks && j / bk < m.k_blocks) { any = any || bit(bits, s, h, i / bq, j / bk); }
            }
          }
          if (any) {
            row[static_cast<std::size_t>(cnt++)] = static_cast<std::int32_t>(K) - prev;
            prev = static_cast<std::int32_t>(K);
          }
        }
        r.valid.push_back(cnt);
        r.lut.insert(r.lut.end(), row.begin(), row.end());
      }
    }
  }
  return r;
}

/// A mask with about `density` of the blocks below k_blocks set at random and
/// about a fifth of the rows empty.
pqkv::host_tensor<std::uint32_t, 4> random_mask(pqkv::mask_shape const& m, double density, std::uint64_t seed)
{
  pqkv::host_tensor<std::uint32_t, 4> bits(m.batch, m.q_heads, m.q_blocks, m.words);
  std::uint64_t i = 0;
  for (index_t s = 0; s < m.batch; ++s) {
    for (index_t h = 0; h < m.q_heads; ++h) {
      for (index_t qb = 0; qb < m.q_blocks; ++qb) {
        for (index_t w = 0; w < m.words; ++w) { bits.view()(s, h, qb, w) = 0u; }
        bool const empty_row = pqkv::detail::random_unit(seed, i++, 7) < 0.2;
        for (index_t kb = 0; kb < m.k_blocks && !empty_row; ++kb) {
          if (pqkv::detail::random_unit(seed, i++, 0) < density) {
            bits.view()(s, h, qb, kb / 32) |= std::uint32_t{1} << (kb % 32);
          }
        }
      }
    }
  }
  return bits;
}

/// Runs the library's LUT at cq x ck and compares it with the plain loop and
/// with the BlockMask of the same mask (the LUT's prefix sums are its indices).
void check_sparge_lut(pqkv::host_tensor<std::uint32_t, 4> const& bits, pqkv::mask_shape const& m,
                      pqkv::sparse_config const& cfg, index_t cq, index_t ck)
{
  CAPTURE(cq);
  CAPTURE(ck);
  auto const b = pqkv::make_block_mask_shape(m, cfg, cq, ck);
  pqkv::host_tensor<std::int32_t, 3> valid(b.batch, b.q_heads, b.q_blocks);
  pqkv::host_tensor<std::int32_t, 4> lut(b.batch, b.q_heads, b.q_blocks, b.k_blocks);
  CHECK(pqkv::sparge_valid_size(b) == static_cast<index_t>(valid.size()));
  CHECK(pqkv::sparge_lut_size(b) == static_cast<index_t>(lut.size()));
  std::fill(valid.data(), valid.data() + valid.size(), -7);  // poison: every entry must be written
  std::fill(lut.data(), lut.data() + lut.size(), -7);
  pqkv::cpu::bitmask_to_sparge_lut(bits.const_view(), m, cfg, cq, ck, valid.view(), lut.view());
  auto const want = plain_sparge_lut(bits, m, cfg.block_q, cfg.block_k, cq, ck);
  CHECK(valid.storage() == want.valid);
  CHECK(lut.storage() == want.lut);
  pqkv::host_tensor<std::int32_t, 3> num(b.batch, b.q_heads, b.q_blocks);
  pqkv::host_tensor<std::int32_t, 4> idx(b.batch, b.q_heads, b.q_blocks, b.k_blocks);
  pqkv::cpu::bitmask_to_block_mask(bits.const_view(), m, cfg, cq, ck, num.view(), idx.view());
  CHECK(num.storage() == valid.storage());
  index_t empty = 0;
  for (index_t r = 0; r < pqkv::sparge_valid_size(b); ++r) {
    std::int32_t at = 0;
    empty += valid.data()[r] == 0;
    for (index_t j = 0; j < valid.data()[r]; ++j) {
      std::int32_t const step = lut.data()[r * b.k_blocks + j];
      CHECK((j == 0 ? step >= 0 : step > 0));
      at += step;
      CHECK(at == idx.data()[r * b.k_blocks + j]);
    }
  }
  MESSAGE("consumer ", cq, " x ", ck, ": rows ", pqkv::sparge_valid_size(b), ", empty ", empty);
}

}  // namespace

TEST_CASE("sale mask: Sparge LUT of a hand-made mask holds the first block, then the steps, then zeros")
{
  std::vector<std::int32_t> const cu{0, 160};
  pqkv::sparse_config const cfg{.block_q = 16, .block_k = 16, .sink = 16, .local = 16};
  auto const m = pqkv::make_mask_shape(cu, 1, 1, cfg);
  REQUIRE(m.q_blocks == 10);
  REQUIRE(m.k_blocks == 10);
  pqkv::host_tensor<std::uint32_t, 4> bits(1, 1, 10, 1);
  std::fill(bits.data(), bits.data() + bits.size(), 0u);
  bits.view()(0, 0, 9, 0) = (1u << 2) | (1u << 3) | (1u << 7);  // row 9: blocks 2, 3, 7; row 8: only block 0
  bits.view()(0, 0, 8, 0) = 1u;
  pqkv::host_tensor<std::int32_t, 3> valid(1, 1, 10);
  pqkv::host_tensor<std::int32_t, 4> lut(1, 1, 10, 10);
  pqkv::cpu::bitmask_to_sparge_lut(bits.const_view(), m, cfg, 16, 16, valid.view(), lut.view());
  CHECK(valid.view()(0, 0, 9) == 3);
  CHECK(valid.view()(0, 0, 8) == 1);
  CHECK(valid.view()(0, 0, 0) == 0);  // an empty row
  std::vector<std::int32_t> row9, row8, row0;
  for (index_t K = 0; K < 10; ++K) {
    row9.push_back(lut.view()(0, 0, 9, K));
    row8.push_back(lut.view()(0, 0, 8, K));
    row0.push_back(lut.view()(0, 0, 0, K));
  }
  CHECK(row9 == std::vector<std::int32_t>{2, 1, 4, 0, 0, 0, 0, 0, 0, 0});
  CHECK(row8 == std::vector<std::int32_t>{0, 0, 0, 0, 0, 0, 0, 0, 0, 0});  // block 0 first: a step of 0
  CHECK(row0 == std::vector<std::int32_t>(10, 0));
  // 32 x 32 consumer blocks: rows 8 and 9 merge into consumer row 4, blocks {0, 1, 3}.
  pqkv::host_tensor<std::int32_t, 3> v2(1, 1, 5);
  pqkv::host_tensor<std::int32_t, 4> l2(1, 1, 5, 5);
  pqkv::cpu::bitmask_to_sparge_lut(bits.const_view(), m, cfg, 32, 32, v2.view(), l2.view());
  CHECK(v2.storage() == std::vector<std::int32_t>{0, 0, 0, 0, 3});
  std::vector<std::int32_t> row4;
  for (index_t K = 0; K < 5; ++K) { row4.push_back(l2.view()(0, 0, 4, K)); }
  CHECK(row4 == std::vector<std::int32_t>{0, 1, 2, 0, 0});
}

TEST_CASE("sale mask: Sparge LUT equals a plain loop: ragged batch, empty rows, consumer blocks equal to and larger "
          "than the mask's")
{
  auto const b = make_batch(4, 2, 64, {0, 300, 300, 513}, 55);  // an empty sequence, padding rows
  pqkv::sparse_config const cfg{.block_q = 32, .block_k = 16, .sink = 16, .local = 32};
  pqkv::cpu::sale_estimator const est{b.q.const_view(), b.k.const_view(), b.cu, cfg};
  auto const m = est.shape();
  auto const sale_bits = mask_of(est, {0.02f, 0.005f, 0.f, inf});
  auto const rand_bits = random_mask(m, 0.15, 91);
  for (auto const* bits : {&sale_bits, &rand_bits}) {
    // equal to the mask blocks; SageAttention2 sm90 (64 x 128) and sm80/sm89 (128 x 64) tiles; odd multiples;
    // one consumer block covering the whole sequence
    for (auto const& [cq, ck] : std::vector<std::pair<index_t, index_t>>{
             {32, 16}, {64, 128}, {128, 64}, {96, 48}, {32, 80}, {512, 512}}) {
      check_sparge_lut(*bits, m, cfg, cq, ck);
    }
  }
  // Sequences of one token and of 64 + 1 tokens, 64 x 32 mask blocks.
  std::vector<std::int32_t> const cu{0, 1, 66, 66};
  pqkv::sparse_config const c2{};
  auto const m2 = pqkv::make_mask_shape(cu, 4, 2, c2);
  auto const r2 = random_mask(m2, 0.5, 92);
  for (auto const& [cq, ck] : std::vector<std::pair<index_t, index_t>>{{64, 32}, {64, 128}, {128, 64}}) {
    check_sparge_lut(r2, m2, c2, cq, ck);
  }
}

TEST_CASE("sale mask: Sparge LUT bad input throws naming the argument")
{
  std::vector<std::int32_t> const cu{0, 256};
  pqkv::sparse_config const cfg{};  // 64 x 32
  auto const m = pqkv::make_mask_shape(cu, 4, 2, cfg);
  auto const bits = random_mask(m, 0.3, 93);
  auto const b = pqkv::make_block_mask_shape(m, cfg, 64, 128);
  pqkv::host_tensor<std::int32_t, 3> valid(b.batch, b.q_heads, b.q_blocks);
  pqkv::host_tensor<std::int32_t, 4> lut(b.batch, b.q_heads, b.q_blocks, b.k_blocks);
  auto convert = [&](auto bitmask, index_t cq, index_t ck, auto v, auto l) {
    return error_message([&] { pqkv::cpu::bitmask_to_sparge_lut(bitmask, m, cfg, cq, ck, v, l); });
  };
  auto const bv = bits.const_view();
  CHECK(convert(bv, 96, 128, valid.view(), lut.view()).find("consumer block_q=96") != std::string::npos);
  CHECK(convert(bv, 64, 48, valid.view(), lut.view()).find("consumer block_k=48 must be a positive multiple of "
                                                          "block_k=32") != std::string::npos);
  CHECK(convert(bv, 0, 128, valid.view(), lut.view()).find("consumer block_q=0") != std::string::npos);
  CHECK(convert(bv, 128, 128, valid.view(), lut.view()).find("valid_block_num extents (1, 4, 4) differ from (1, 4, 2)") !=
        std::string::npos);
  pqkv::host_tensor<std::int32_t, 4> short_lut(b.batch, b.q_heads, b.q_blocks, b.k_blocks - 1);
  CHECK(convert(bv, 64, 128, valid.view(), short_lut.view()).find("lut extents (1, 4, 4, 1) differ from (1, 4, 4, 2)") !=
        std::string::npos);
  pqkv::host_tensor<std::uint32_t, 4> small(m.batch, m.q_heads, m.q_blocks - 1, m.words);
  CHECK(convert(small.const_view(), 64, 128, valid.view(), lut.view()).find("bitmask extents") != std::string::npos);
  auto const null_lut = pqkv::make_view(static_cast<std::int32_t*>(nullptr), b.batch, b.q_heads, b.q_blocks, b.k_blocks);
  CHECK(convert(bv, 64, 128, valid.view(), null_lut).find("valid_block_num or lut data_handle() is null") !=
        std::string::npos);
}

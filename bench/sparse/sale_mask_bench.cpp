// SPDX-License-Identifier: Apache-2.0
// CPU reference SALE mask against a naive dense-logits loop in the same
// binary: one sequence, 8 q / 2 KV heads, d = 128, Bq = 64, Bk = 32, sink 32,
// local 128, n in {1K, 2K}. Three timings: quantization of Q and K
// (center_quantize), the estimate + threshold (build_mask over a built
// sale_estimator) and the anchor, float q.k logits of every causal pair.
// Counters: items = causal (q head, query, key) pairs per second.
#include <pqkv/core/host_tensor.hpp>
#include <pqkv/core/parallel.hpp>
#include <pqkv/core/random.hpp>
#include <pqkv/sparse/quantize.hpp>
#include <pqkv/sparse/sale_mask.hpp>

#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

namespace {

using pqkv::index_t;
constexpr index_t q_heads = 8, kv_heads = 2, dim = 128;

struct mask_data {
  index_t n;
  std::vector<std::int32_t> cu;
  pqkv::host_tensor<float, 3> q, k;
  explicit mask_data(index_t tokens)
    : n(tokens), cu{0, static_cast<std::int32_t>(tokens)}, q(q_heads, tokens, dim), k(kv_heads, tokens, dim)
  {
    for (std::size_t i = 0; i < q.size(); ++i) {
      q.data()[i] = static_cast<float>(4.0 * (pqkv::detail::random_unit(2, 0, i) - 0.5));
    }
    for (std::size_t i = 0; i < k.size(); ++i) {
      k.data()[i] = static_cast<float>(pqkv::detail::random_unit(2, 1, i) - 0.5);
    }
  }
};

void set_counters(benchmark::State& state, index_t n)
{
  state.SetItemsProcessed(state.iterations() * q_heads * n * (n + 1) / 2);
  state.SetBytesProcessed(state.iterations() * (q_heads + kv_heads) * n * dim * static_cast<index_t>(sizeof(float)));
}

void BM_sale_quantize(benchmark::State& state)
{
  mask_data d(state.range(0));
  pqkv::quant_config const qc{};
  pqkv::host_tensor<std::int8_t, 3> qcodes(q_heads, d.n, dim), kcodes(kv_heads, d.n, dim);
  pqkv::host_tensor<float, 2> qs(q_heads, d.n), ks(kv_heads, d.n);
  pqkv::host_tensor<float, 3> qm(1, q_heads, dim), km(1, kv_heads, dim);
  for (auto _ : state) {
    pqkv::cpu::center_quantize(d.q.const_view(), d.cu, qc, qcodes.view(), qs.view(), qm.view());
    pqkv::cpu::center_quantize(d.k.const_view(), d.cu, qc, kcodes.view(), ks.view(), km.view());
    benchmark::DoNotOptimize(kcodes.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, d.n);
}

void BM_sale_estimate_threshold(benchmark::State& state)
{
  mask_data d(state.range(0));
  pqkv::cpu::sale_estimator const est{d.q.const_view(), d.k.const_view(), d.cu, pqkv::sparse_config{}};
  auto const m = est.shape();
  pqkv::host_tensor<std::uint32_t, 4> bits(m.batch, m.q_heads, m.q_blocks, m.words);
  std::vector<float> const tau(q_heads, 0.01f);
  std::vector<double> density(q_heads);
  for (auto _ : state) {
    pqkv::cpu::build_mask(est, std::span<float const>{tau}, bits.view());
    benchmark::DoNotOptimize(bits.data());
    benchmark::ClobberMemory();
  }
  pqkv::cpu::build_mask(est, std::span<float const>{tau}, bits.view(), std::span<double>{density});
  state.counters["density_head0"] = density[0];
  set_counters(state, d.n);
}

/// Anchor: every causal logit q_i . k_j / sqrt(d) in float, parallel over heads.
void BM_dense_logits_naive(benchmark::State& state)
{
  mask_data d(state.range(0));
  auto const q = d.q.const_view();
  auto const k = d.k.const_view();
  std::vector<float> row_max(static_cast<std::size_t>(q_heads * d.n));
  float const scale = 1.f / std::sqrt(static_cast<float>(dim));
  for (auto _ : state) {
    pqkv::cpu::parallel_for(q_heads, [&](index_t h) {
      index_t const g = h / (q_heads / kv_heads);
      for (index_t i = 0; i < d.n; ++i) {
        float best = -1e30f;
        for (index_t j = 0; j <= i; ++j) {
          float dot = 0.f;
          for (index_t c = 0; c < dim; ++c) { dot += q(h, i, c) * k(g, j, c); }
          best = std::max(best, scale * dot);
        }
        row_max[static_cast<std::size_t>(h * d.n + i)] = best;
      }
    });
    benchmark::DoNotOptimize(row_max.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, d.n);
}

BENCHMARK(BM_sale_quantize)->Arg(1024)->Arg(2048)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_sale_estimate_threshold)->Arg(1024)->Arg(2048)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_dense_logits_naive)->Arg(1024)->Arg(2048)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

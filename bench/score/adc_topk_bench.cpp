// SPDX-License-Identifier: Apache-2.0
// CPU reference ADC scoring + GQA softmax_sum + top-k (pqkv::cpu::adc_topk)
// against a naive loop in the same binary: 8 KV heads, 32 q heads, d = 128,
// 8 bits, m in {2, 8, 16}, n in {32K, 128K}, k in {2048, n/5}, 4 sink + 64
// window tokens. Codes, centroids and queries are random (the cost does not
// depend on their values, only the top-k's partition work varies a little).
// Counters: items = sequence tokens scored per second (each for all 8 KV
// heads), bytes = code bytes read per second.
#include <pqkv/core/host_tensor.hpp>
#include <pqkv/core/parallel.hpp>
#include <pqkv/core/random.hpp>
#include <pqkv/score/adc_topk.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

namespace {

using pqkv::index_t;
constexpr index_t kv_heads = 8, q_heads = 32, dim = 128, sink = 4, window = 64;

struct adc_data {
  pqkv::adc_shape shape;
  index_t n, k;
  pqkv::host_tensor<float, 2> q;              // [q_heads, dim]
  pqkv::host_tensor<std::uint8_t, 3> codes;   // [kv_heads, n, m]
  pqkv::host_tensor<float, 4> centroids;      // [kv_heads, m, 256, dsub]
  pqkv::host_tensor<std::int32_t, 2> out;     // [kv_heads, k]
  std::vector<std::int32_t> valid;

  adc_data(index_t tokens, index_t m, index_t k_arg)
    : shape{q_heads, kv_heads, dim, m, 8}, n{tokens}, k{k_arg > 0 ? k_arg : tokens / 5}, q(q_heads, dim),
      codes(kv_heads, tokens, m), centroids(kv_heads, m, 256, dim / m), out(kv_heads, k), valid(kv_heads)
  {
    for (std::size_t i = 0; i < q.size(); ++i) {
      q.data()[i] = static_cast<float>(pqkv::detail::random_unit(2, 0, i) - 0.5);
    }
    for (std::size_t i = 0; i < centroids.size(); ++i) {
      centroids.data()[i] = static_cast<float>(pqkv::detail::random_unit(2, 1, i) - 0.5);
    }
    for (std::size_t i = 0; i < codes.size(); ++i) {
      codes.data()[i] = static_cast<std::uint8_t>(pqkv::detail::random_below(2, 2, i, 256));
    }
  }
};

void set_counters(benchmark::State& state, adc_data const& d)
{
  state.SetItemsProcessed(state.iterations() * d.n);
  state.SetBytesProcessed(state.iterations() * kv_heads * d.n * d.shape.m);
  state.counters["k"] = static_cast<double>(d.k);
}

template <class Aggregation>
void BM_adc_topk_pqkv(benchmark::State& state)
{
  adc_data d(state.range(0), state.range(1), state.range(2));
  pqkv::cpu::adc_topk<Aggregation> const op{d.shape, {.k = d.k, .sink = sink, .window = window}};
  for (auto _ : state) {
    op(d.q.const_view(), d.codes.const_view(), d.centroids.const_view(), d.n, d.out.view(), d.valid);
    benchmark::DoNotOptimize(d.out.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, d);
}

/// Anchor: reconstruct each candidate key from its codes, dot it with every q
/// head of the group, softmax per head, sum, then std::sort all candidates by
/// (score desc, index asc) and keep the first k, ascending. Parallel over KV
/// heads like the reference, so the ratio compares the algorithms.
void BM_adc_topk_naive(benchmark::State& state)
{
  adc_data d(state.range(0), state.range(1), state.range(2));
  index_t const m = d.shape.m, dsub = dim / m, r = q_heads / kv_heads;
  index_t const first = sink, nc = d.n - sink - window;
  float const scale = 1.f / std::sqrt(static_cast<float>(dim));
  auto const q = d.q.const_view();
  auto const codes = d.codes.const_view();
  auto const c = d.centroids.const_view();
  auto const out = d.out.view();
  for (auto _ : state) {
    pqkv::cpu::parallel_for(kv_heads, [&](index_t g) {
      std::vector<float> key(static_cast<std::size_t>(dim));
      std::vector<float> logits(static_cast<std::size_t>(r * nc));
      for (index_t i = 0; i < nc; ++i) {
        for (index_t j = 0; j < m; ++j) {
          for (index_t e = 0; e < dsub; ++e) {
            key[static_cast<std::size_t>(j * dsub + e)] = c(g, j, codes(g, first + i, j), e);
          }
        }
        for (index_t hl = 0; hl < r; ++hl) {
          float dot = 0.f;
          for (index_t e = 0; e < dim; ++e) { dot += q(g * r + hl, e) * key[static_cast<std::size_t>(e)]; }
          logits[static_cast<std::size_t>(hl * nc + i)] = scale * dot;
        }
      }
      std::vector<std::pair<float, std::int32_t>> scored(static_cast<std::size_t>(nc));
      for (index_t i = 0; i < nc; ++i) {
        scored[static_cast<std::size_t>(i)] = {0.f, static_cast<std::int32_t>(first + i)};
      }
      for (index_t hl = 0; hl < r; ++hl) {
        float* row = logits.data() + hl * nc;
        float const mx = *std::max_element(row, row + nc);
        double z = 0;
        for (index_t i = 0; i < nc; ++i) { z += std::exp(row[i] - mx); }
        for (index_t i = 0; i < nc; ++i) {
          scored[static_cast<std::size_t>(i)].first += static_cast<float>(std::exp(row[i] - mx) / z);
        }
      }
      std::sort(scored.begin(), scored.end(), [](auto const& a, auto const& b) {
        return a.first != b.first ? a.first > b.first : a.second < b.second;
      });
      index_t const kk = std::min(d.k, nc);
      for (index_t i = 0; i < kk; ++i) { out(g, i) = scored[static_cast<std::size_t>(i)].second; }
      std::sort(&out(g, 0), &out(g, 0) + kk);
      std::fill(&out(g, 0) + kk, &out(g, 0) + d.k, -1);
    });
    benchmark::DoNotOptimize(d.out.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, d);
}

void adc_args(benchmark::internal::Benchmark* b)
{
  b->ArgNames({"n", "m", "k"})->Unit(benchmark::kMillisecond)->UseRealTime();
  for (index_t n : {32768, 131072}) {
    for (index_t m : {2, 8, 16}) {
      for (index_t k : {2048, 0}) { b->Args({n, m, k}); }  // k = 0: n / 5
    }
  }
}

}  // namespace

BENCHMARK(BM_adc_topk_pqkv<pqkv::gqa::softmax_sum>)->Apply(adc_args);
BENCHMARK(BM_adc_topk_naive)->Apply(adc_args);
// The other policies skip the softmax: the scoring + top-k floor.
BENCHMARK(BM_adc_topk_pqkv<pqkv::gqa::sum>)
  ->ArgNames({"n", "m", "k"})
  ->Args({131072, 16, 2048})
  ->Unit(benchmark::kMillisecond)
  ->UseRealTime();
BENCHMARK(BM_adc_topk_pqkv<pqkv::gqa::max>)
  ->ArgNames({"n", "m", "k"})
  ->Args({131072, 16, 2048})
  ->Unit(benchmark::kMillisecond)
  ->UseRealTime();

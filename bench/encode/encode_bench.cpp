// SPDX-License-Identifier: Apache-2.0
// CPU reference encoder (pqkv::cpu::pq_encoder) against a naive loop in the
// same binary: 8 KV heads, d = 128, 8 bits, m in {2, 8, 16}, n in {32K, 128K}
// (the anchor at 32K only), and one decode step's append.
// Keys and centroids are random (the cost does not depend on their values).
// Counters: items = sequence tokens encoded per second (each for all 8 KV
// heads), bytes = key bytes read per second.
#include <pqkv/core/host_tensor.hpp>
#include <pqkv/core/parallel.hpp>
#include <pqkv/core/random.hpp>
#include <pqkv/encode/encode.hpp>

#include <benchmark/benchmark.h>

#include <cstdint>
#include <initializer_list>
#include <limits>

namespace {

using pqkv::index_t;
constexpr index_t kv_heads = 8, dim = 128;

struct encode_data {
  pqkv::pq_config cfg;
  pqkv::host_tensor<float, 3> keys;       // [kv_heads, n, dim]
  pqkv::host_tensor<float, 4> centroids;  // [kv_heads, m, ksub, dsub]
  pqkv::host_tensor<std::uint8_t, 3> codes;

  encode_data(index_t n, index_t m)
    : cfg{.dim = dim, .m = m, .nbits = 8}, keys(kv_heads, n, dim), centroids(kv_heads, m, 256, dim / m),
      codes(kv_heads, n, m)
  {
    for (std::size_t i = 0; i < keys.size(); ++i) {
      keys.data()[i] = static_cast<float>(pqkv::detail::random_unit(1, 0, i) - 0.5);
    }
    for (std::size_t i = 0; i < centroids.size(); ++i) {
      centroids.data()[i] = static_cast<float>(pqkv::detail::random_unit(1, 1, i) - 0.5);
    }
  }
};

void set_counters(benchmark::State& state, index_t n)
{
  state.SetItemsProcessed(state.iterations() * n);
  state.SetBytesProcessed(state.iterations() * kv_heads * n * dim * static_cast<index_t>(sizeof(float)));
}

void BM_encode_pqkv(benchmark::State& state)
{
  index_t const n = state.range(0), m = state.range(1);
  encode_data d(n, m);
  pqkv::cpu::pq_encoder const enc{d.cfg};
  for (auto _ : state) {
    enc.encode(d.keys.const_view(), d.centroids.const_view(), d.codes.view());
    benchmark::DoNotOptimize(d.codes.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, n);
}

/// Anchor: the textbook loop, parallel over heads the same way, one centroid
/// at a time in its natural [ksub, dsub] layout, argmin by strict <.
void BM_encode_naive(benchmark::State& state)
{
  index_t const n = state.range(0), m = state.range(1), dsub = dim / m;
  encode_data d(n, m);
  auto const k = d.keys.const_view();
  auto const c = d.centroids.const_view();
  auto const codes = d.codes.view();
  for (auto _ : state) {
    pqkv::cpu::parallel_for(kv_heads, [&](index_t h) {
      for (index_t t = 0; t < n; ++t) {
        for (index_t j = 0; j < m; ++j) {
          float best = std::numeric_limits<float>::infinity();
          index_t best_c = 0;
          for (index_t ci = 0; ci < 256; ++ci) {
            float dist = 0.f;
            for (index_t i = 0; i < dsub; ++i) {
              float const e = k(h, t, j * dsub + i) - c(h, j, ci, i);
              dist += e * e;
            }
            if (dist < best) {
              best = dist;
              best_c = ci;
            }
          }
          codes(h, t, j) = static_cast<std::uint8_t>(best_c);
        }
      }
    });
    benchmark::DoNotOptimize(d.codes.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, n);
}

/// One decode step: the new token of every head appended at the end.
void BM_append_one_token(benchmark::State& state)
{
  index_t const m = state.range(0);
  encode_data d(1024, m);
  pqkv::cpu::pq_encoder const enc{d.cfg};
  auto const kv = d.keys.const_view();
  auto const one = pqkv::make_strided_view<float const, 3>(&kv(0, 1023, 0), {kv_heads, 1, dim}, {1024 * dim, dim, 1});
  for (auto _ : state) {
    enc.append(one, d.centroids.const_view(), d.codes.view(), 1023);
    benchmark::DoNotOptimize(d.codes.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, 1);
}

void encode_args(benchmark::internal::Benchmark* b, std::initializer_list<index_t> sizes)
{
  b->ArgNames({"n", "m"})->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(0.2);
  for (index_t n : sizes) {
    for (index_t m : {2, 8, 16}) { b->Args({n, m}); }
  }
}

}  // namespace

BENCHMARK(BM_encode_pqkv)->Apply([](auto* b) { encode_args(b, {32768, 131072}); });
// The work is linear in n; at 128K the anchor takes most of a minute per case.
BENCHMARK(BM_encode_naive)->Apply([](auto* b) { encode_args(b, {32768}); });
BENCHMARK(BM_append_one_token)->ArgNames({"m"})->Arg(2)->Arg(8)->Arg(16)->Unit(benchmark::kMicrosecond)->UseRealTime();

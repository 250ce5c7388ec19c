// SPDX-License-Identifier: Apache-2.0
/// Benchmarks of `pqkv::cpu::kmeans_trainer` on synthetic realistic keys.
///
/// `kmeans_vs_faiss/*` is the head-to-head with faiss (bench/run_kmeans_vs_faiss.sh
/// runs both): one head of 32768 keys, d = 128, 25 iterations, tol = 0, random
/// init, 2 or 1 threads. With PQKV_KMEANS_DUMP_DIR set, it also writes the keys
/// (keys.npy, [tokens, dim] float32), each configuration's centroids
/// (pqkv_m<m>_nbits<nbits>.npy, [m, ksub, dsub]) and its initial centroids
/// (pqkv_init_m<m>_nbits<nbits>.npy) there, so the anchor trains on the same
/// data, can start from the same init, and scores both codebooks the same way.

#include <pqkv/codebook/kmeans.hpp>
#include <pqkv/core/host_tensor.hpp>
#include <pqkv/core/parallel.hpp>

#include "common/keygen.hpp"

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

constexpr pqkv::index_t bench_tokens = 32768, bench_dim = 128;

/// Keys [heads, tokens, dim] of the shared generator, made once per shape.
pqkv::host_tensor<float, 3> const& bench_keys(pqkv::index_t heads, pqkv::index_t tokens)
{
  static std::vector<std::pair<std::pair<pqkv::index_t, pqkv::index_t>, pqkv::host_tensor<float, 3>>> cache;
  for (auto const& [shape, keys] : cache) {
    if (shape == std::pair{heads, tokens}) { return keys; }
  }
  pqkv::test::keygen_config cfg;
  cfg.kv_heads = heads;
  cfg.tokens = tokens;
  cfg.dim = bench_dim;
  pqkv::host_tensor<float, 3> keys(heads, tokens, bench_dim);
  pqkv::test::make_keys(cfg, 0, keys.view());
  cache.emplace_back(std::pair{heads, tokens}, std::move(keys));
  return cache.back().second;
}

/// Writes a float32 C-order .npy file.
void write_npy(std::string const& path, float const* data, std::vector<pqkv::index_t> const& shape)
{
  std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (";
  std::size_t count = 1;
  for (auto e : shape) {
    dict += std::to_string(e) + ", ";
    count *= static_cast<std::size_t>(e);
  }
  dict += "), }";
  std::size_t const unpadded = 10 + dict.size() + 1;
  dict.append((64 - unpadded % 64) % 64, ' ');
  dict += '\n';
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) { return; }
  std::fwrite("\x93NUMPY\x01\x00", 1, 8, f);
  auto const len = static_cast<std::uint16_t>(dict.size());
  unsigned char const len_le[2] = {static_cast<unsigned char>(len & 0xff), static_cast<unsigned char>(len >> 8)};
  std::fwrite(len_le, 1, 2, f);
  std::fwrite(dict.data(), 1, dict.size(), f);
  std::fwrite(data, sizeof(float), count, f);
  std::fclose(f);
}

char const* dump_dir() { return std::getenv("PQKV_KMEANS_DUMP_DIR"); }

void set_counters(benchmark::State& state, pqkv::kmeans_report const& rep, pqkv::index_t heads,
                  pqkv::index_t tokens)
{
  state.counters["mse"] = rep.mse;
  state.counters["iterations"] = rep.iterations;
  state.counters["threads"] = pqkv::cpu::num_threads();
  // One "item" is a token of one head seen by one assignment pass.
  auto const passes = static_cast<std::int64_t>(rep.iterations + 1);
  state.SetItemsProcessed(state.iterations() * heads * tokens * passes);
  state.SetBytesProcessed(state.iterations() * heads * tokens * bench_dim * static_cast<std::int64_t>(sizeof(float)) *
                          passes);
}

/// The faiss comparison: args m, nbits, threads; random init, 25 iterations, tol 0.
void kmeans_vs_faiss(benchmark::State& state)
{
  auto const m = state.range(0);
  auto const nbits = static_cast<int>(state.range(1));
  auto const threads = static_cast<int>(state.range(2));
  auto const& keys = bench_keys(1, bench_tokens);
  pqkv::pq_config cfg{.dim = bench_dim, .m = m, .nbits = nbits, .max_iter = 25, .tol = 0, .seed = 1234,
                      .init = pqkv::init_method::random_sample};
  pqkv::cpu::kmeans_trainer trainer{cfg};
  pqkv::host_tensor<float, 4> centroids(1, m, cfg.ksub(), cfg.dsub());
  pqkv::cpu::set_num_threads(threads);
  pqkv::kmeans_report rep;
  for (auto _ : state) {
    rep = trainer.train(keys.const_view(), centroids.view());
    benchmark::DoNotOptimize(centroids.data());
  }
  pqkv::cpu::set_num_threads(0);
  set_counters(state, rep, 1, bench_tokens);
  state.counters["threads"] = threads;
  if (char const* dir = dump_dir()) {
    std::string const d = dir, tag = "_m" + std::to_string(m) + "_nbits" + std::to_string(nbits) + ".npy";
    write_npy(d + "/keys.npy", keys.data(), {bench_tokens, bench_dim});
    write_npy(d + "/pqkv" + tag, centroids.data(), {m, cfg.ksub(), cfg.dsub()});
    // The init alone (max_iter = 0 draws the same rows), so faiss can start from it too.
    cfg.max_iter = 0;
    pqkv::cpu::kmeans_trainer{cfg}.train(keys.const_view(), centroids.view());
    write_npy(d + "/pqkv_init" + tag, centroids.data(), {m, cfg.ksub(), cfg.dsub()});
  }
}

/// Init cost and quality: args m, nbits, init (0 = kmeans++, 1 = random sample).
void kmeans_init(benchmark::State& state)
{
  auto const m = state.range(0);
  auto const nbits = static_cast<int>(state.range(1));
  auto const& keys = bench_keys(1, bench_tokens);
  pqkv::pq_config cfg{.dim = bench_dim, .m = m, .nbits = nbits, .max_iter = 25, .tol = 0, .seed = 1234,
                      .init = state.range(2) == 0 ? pqkv::init_method::kmeans_plus_plus
                                                  : pqkv::init_method::random_sample};
  pqkv::cpu::kmeans_trainer trainer{cfg};
  pqkv::host_tensor<float, 4> centroids(1, m, cfg.ksub(), cfg.dsub());
  pqkv::cpu::set_num_threads(2);
  pqkv::kmeans_report rep;
  for (auto _ : state) {
    rep = trainer.train(keys.const_view(), centroids.view());
    benchmark::DoNotOptimize(centroids.data());
  }
  pqkv::cpu::set_num_threads(0);
  set_counters(state, rep, 1, bench_tokens);
  state.counters["mse_init"] = rep.objective.front();
}

/// Thread scaling: args m, nbits, threads.
void kmeans_threads(benchmark::State& state)
{
  auto const m = state.range(0);
  auto const nbits = static_cast<int>(state.range(1));
  auto const& keys = bench_keys(1, bench_tokens);
  pqkv::pq_config cfg{.dim = bench_dim, .m = m, .nbits = nbits, .max_iter = 25, .tol = 0, .seed = 1234,
                      .init = pqkv::init_method::random_sample};
  pqkv::cpu::kmeans_trainer trainer{cfg};
  pqkv::host_tensor<float, 4> centroids(1, m, cfg.ksub(), cfg.dsub());
  pqkv::cpu::set_num_threads(static_cast<int>(state.range(2)));
  pqkv::kmeans_report rep;
  for (auto _ : state) {
    rep = trainer.train(keys.const_view(), centroids.view());
    benchmark::DoNotOptimize(centroids.data());
  }
  pqkv::cpu::set_num_threads(0);
  set_counters(state, rep, 1, bench_tokens);
}

/// A whole layer as PQCache trains it: 8 KV heads, default tol and kmeans++,
/// with and without subsampling (arg: max_train_points, 0 = all).
void kmeans_layer(benchmark::State& state)
{
  constexpr pqkv::index_t heads = 8;
  auto const& keys = bench_keys(heads, bench_tokens);
  pqkv::pq_config cfg{.dim = bench_dim, .m = 16, .nbits = 8, .max_train_points = state.range(0)};
  pqkv::cpu::kmeans_trainer trainer{cfg};
  pqkv::host_tensor<float, 4> centroids(heads, cfg.m, cfg.ksub(), cfg.dsub());
  pqkv::host_tensor<std::uint8_t, 3> codes(heads, bench_tokens, cfg.m);
  pqkv::kmeans_report rep;
  for (auto _ : state) {
    rep = trainer.train(keys.const_view(), centroids.view(), codes.view());
    benchmark::DoNotOptimize(codes.data());
  }
  set_counters(state, rep, heads, bench_tokens);
}

double min_of(std::vector<double> const& v) { return *std::min_element(v.begin(), v.end()); }

}  // namespace

// Repetitions come from --benchmark_repetitions (the driver script sets them).
BENCHMARK(kmeans_vs_faiss)
  ->ArgNames({"m", "nbits", "threads"})
  ->ArgsProduct({{2, 8, 16}, {6, 8}, {2, 1}})
  ->Unit(benchmark::kMillisecond)
  ->UseRealTime()
  ->Iterations(1)
  ->ComputeStatistics("min", min_of);

BENCHMARK(kmeans_init)
  ->ArgNames({"m", "nbits", "random"})
  ->ArgsProduct({{2, 16}, {8}, {0, 1}})
  ->Unit(benchmark::kMillisecond)
  ->UseRealTime()
  ->Iterations(1)
  ->Repetitions(3)
  ->ComputeStatistics("min", min_of);

BENCHMARK(kmeans_threads)
  ->ArgNames({"m", "nbits", "threads"})
  ->ArgsProduct({{2, 16}, {8}, {1, 2}})
  ->Unit(benchmark::kMillisecond)
  ->UseRealTime()
  ->Iterations(1)
  ->Repetitions(3)
  ->ComputeStatistics("min", min_of);

BENCHMARK(kmeans_layer)
  ->ArgNames({"max_train_points"})
  ->Arg(0)
  ->Arg(8192)
  ->Unit(benchmark::kMillisecond)
  ->UseRealTime()
  ->Iterations(1)
  ->Repetitions(3)
  ->ComputeStatistics("min", min_of);

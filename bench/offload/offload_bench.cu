// SPDX-License-Identifier: Apache-2.0
// The offload path of a decode step: bf16 K and V, d = 128, 8 KV heads, a
// 128K-token pinned store; k selected rows per head.
//   BM_contiguous_h2d   the anchor: one cudaMemcpyAsync of a contiguous pinned
//                       buffer of the same byte count (the PCIe ceiling)
//   BM_gather           gpu::gather (zero-copy kernel, device indices), per load kind
//   BM_copy_engine      gpu::copy_engine_gather (host indices, runs merged,
//                       cudaMemcpyBatchAsync); the index D2H + sync it would
//                       need in a decode loop is not charged
//   BM_cache_access     gpu::slot_table::access (lookup + policy update +
//                       inserts, no copy) on a decode trace, warm
//   BM_cache_step       access + the gather of the misses into the hot buffer
//   BM_hit_rate         hit rate and bytes moved per step vs cache size on a
//                       synthetic decode trace with temporal locality: pqkv's
//                       token caches (LRU, LFU, FIFO) vs PQCache's block LFU
// Args: k (rows per head), pattern (0 random, 1 clustered: runs of 64 rows).
// Times: CUDA events around the stream call after warm-up, median of the
// iterations (median_us); bytes = K + V rows moved.
// The torch anchors (bench/anchors/torch_gather.py) time the same shapes.
#include <pqkv/cache/block_lfu.hpp>
#include <pqkv/cache/gpu_cache.cuh>
#include <pqkv/core/device_buffer.cuh>
#include <pqkv/core/random.hpp>
#include <pqkv/offload/gather.cuh>
#include <pqkv/offload/kv_store.cuh>

#include "common/gpu_timing.cuh"

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <vector>

namespace {

using pqkv::index_t;
using T = __nv_bfloat16;
constexpr index_t heads = 8, dim = 128, tokens = 131072;
constexpr std::size_t row_bytes = dim * sizeof(T);

/// One store for all benchmarks (512 MiB of pinned K + V), filled once.
pqkv::gpu::kv_store<T>& shared_store()
{
  static std::unique_ptr<pqkv::gpu::kv_store<T>> store = [] {
    auto s = std::make_unique<pqkv::gpu::kv_store<T>>(
      pqkv::gpu::kv_store_shape{.layers = 1, .sequences = 1, .kv_heads = heads, .capacity = tokens, .head_dim = dim});
    pqkv::device_buffer<T> chunk(static_cast<std::size_t>(heads * 8192 * dim));
    std::vector<std::uint16_t> host(chunk.size());
    for (index_t c = 0; c < tokens / 8192; ++c) {
      for (std::size_t i = 0; i < host.size(); ++i) {
        host[i] = static_cast<std::uint16_t>(pqkv::detail::random_bits(1, static_cast<std::uint64_t>(c), i) & 0x3FFF);
      }
      PQKV_CUDA_TRY(cudaMemcpy(chunk.data(), host.data(), chunk.size_bytes(), cudaMemcpyHostToDevice));
      auto v = pqkv::make_strided_view<T const, 3>(chunk.data(), {heads, 8192, dim}, {8192 * dim, dim, 1});
      s->append(0, 0, v, v, nullptr);
      PQKV_CUDA_TRY(cudaStreamSynchronize(nullptr));
    }
    return s;
  }();
  return *store;
}

/// Indices [heads, k] ascending: random distinct rows, or runs of 64 consecutive rows.
std::vector<std::int32_t> make_indices(index_t k, int pattern, std::uint64_t seed)
{
  std::vector<std::int32_t> out(static_cast<std::size_t>(heads * k));
  for (index_t h = 0; h < heads; ++h) {
    std::vector<std::int32_t> rows;
    std::vector<std::uint8_t> taken(static_cast<std::size_t>(tokens), 0);
    std::uint64_t draw = 0;
    while (static_cast<index_t>(rows.size()) < k) {
      auto const start = static_cast<std::int32_t>(
        pqkv::detail::random_below(seed, static_cast<std::uint64_t>(h), draw++, static_cast<std::uint64_t>(tokens)));
      int const run = pattern == 0 ? 1 : 64;
      for (int r = 0; r < run && static_cast<index_t>(rows.size()) < k; ++r) {
        auto const t = static_cast<std::size_t>((start + r) % tokens);
        if (taken[t] == 0) {
          taken[t] = 1;
          rows.push_back(static_cast<std::int32_t>(t));
        }
      }
    }
    std::sort(rows.begin(), rows.end());
    std::copy(rows.begin(), rows.end(), out.begin() + h * k);
  }
  return out;
}

/// A stream and Google Benchmark's loop timed on it (3 warm-up calls); counter median_us.
struct timer {
  pqkv::bench::owned_stream owned;
  cudaStream_t stream = owned.get();
  pqkv::test::event_timer events{stream};

  template <class F>
  void run(benchmark::State& state, F&& call)
  {
    std::vector<double> us = pqkv::bench::timed_loop(state, events, call, 3);
    for (double& t : us) { t *= 1e3; }
    state.counters["median_us"] = pqkv::test::median(us);
  }
};

void BM_contiguous_h2d(benchmark::State& state)
{
  index_t const k = state.range(0);
  std::size_t const bytes = static_cast<std::size_t>(2 * heads * k) * row_bytes;
  pqkv::pinned_buffer<std::byte> src(bytes);
  std::memset(src.data(), 1, bytes);
  pqkv::device_buffer<std::byte> dst(bytes);
  timer t;
  t.run(state, [&] { PQKV_CUDA_TRY(cudaMemcpyAsync(dst.data(), src.data(), bytes, cudaMemcpyHostToDevice, t.stream)); });
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * bytes));
  state.counters["GBps_median"] = static_cast<double>(bytes) / state.counters["median_us"] * 1e-3;
}

void BM_gather(benchmark::State& state)
{
  index_t const k = state.range(0);
  int const pattern = static_cast<int>(state.range(1));
  auto const load = state.range(2) == 0 ? pqkv::gpu::gather_load::volatile_ : pqkv::gpu::gather_load::streaming;
  int const bpsm = static_cast<int>(state.range(3));
  auto& store = shared_store();
  // Several index sets, rotated, so that no two timed calls read the same rows.
  int const sets = 4;
  pqkv::device_buffer<std::int32_t> idx(static_cast<std::size_t>(sets * heads * k));
  for (int s = 0; s < sets; ++s) {
    auto const h = make_indices(k, pattern, 10 + static_cast<std::uint64_t>(s));
    PQKV_CUDA_TRY(cudaMemcpy(idx.data() + s * heads * k, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
  }
  pqkv::device_buffer<T> k_out(static_cast<std::size_t>(heads * k * dim)), v_out(k_out.size());
  PQKV_CUDA_TRY(cudaDeviceSynchronize());  // uploads from pageable memory may still be in flight
  timer t;
  int it = 0;
  t.run(state, [&] {
    auto const s = it++ % sets;
    pqkv::gpu::gather(store.ref(), 0,
                      pqkv::make_view(static_cast<std::int32_t const*>(idx.data()) + s * heads * k, 1, heads, k),
                      pqkv::make_view(k_out.data(), 1, heads, k, dim), pqkv::make_view(v_out.data(), 1, heads, k, dim),
                      nullptr, t.stream, {.blocks_per_sm = bpsm, .load = load});
  });
  std::size_t const bytes = static_cast<std::size_t>(2 * heads * k) * row_bytes;
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * bytes));
  state.counters["GBps_median"] = static_cast<double>(bytes) / state.counters["median_us"] * 1e-3;
}

void BM_copy_engine(benchmark::State& state)
{
  index_t const k = state.range(0);
  int const pattern = static_cast<int>(state.range(1));
  auto& store = shared_store();
  auto const idx = make_indices(k, pattern, 10);
  pqkv::device_buffer<T> k_out(static_cast<std::size_t>(heads * k * dim)), v_out(k_out.size());
  pqkv::gpu::copy_engine_gather<T> ce;
  timer t;
  t.run(state, [&] {
    ce(store, 0, pqkv::make_view(static_cast<std::int32_t const*>(idx.data()), 1, heads, k),
       pqkv::make_view(k_out.data(), 1, heads, k, dim), pqkv::make_view(v_out.data(), 1, heads, k, dim), t.stream);
  });
  std::size_t const bytes = static_cast<std::size_t>(2 * heads * k) * row_bytes;
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * bytes));
  state.counters["GBps_median"] = static_cast<double>(bytes) / state.counters["median_us"] * 1e-3;
  state.counters["copies"] = static_cast<double>(ce.copies());
}

// ---------------------------------------------------------------------------
// A synthetic decode trace with temporal locality: per head, token scores are
// a persistent heavy-tailed base, a per-128-token-block effect, sink and
// recent-window bonuses, plus AR(1) noise (rho = 0.9) that drifts step by
// step; the selection is the top-k, ascending. The sequence grows by one token
// a step.
struct decode_trace {
  index_t k = 0, n0 = 0, steps = 0;
  std::vector<std::vector<std::int32_t>> sel;  // [steps][heads * k]
};

decode_trace const& trace_for(index_t k)
{
  static std::vector<std::unique_ptr<decode_trace>> cache;
  for (auto const& t : cache) {
    if (t->k == k) { return *t; }
  }
  auto t = std::make_unique<decode_trace>();
  t->k = k;
  t->n0 = 32768;
  t->steps = 96;
  index_t const n_max = t->n0 + t->steps;
  std::vector<float> base(static_cast<std::size_t>(heads * n_max)), noise(base.size(), 0.f);
  auto normal = [](std::uint64_t s, std::uint64_t a, std::uint64_t b) {
    double const u1 = pqkv::detail::random_unit(s, a, 2 * b) + 1e-12, u2 = pqkv::detail::random_unit(s, a, 2 * b + 1);
    return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
  };
  for (index_t h = 0; h < heads; ++h) {
    for (index_t i = 0; i < n_max; ++i) {
      double const u = pqkv::detail::random_unit(5, static_cast<std::uint64_t>(h), static_cast<std::uint64_t>(i)) + 1e-12;
      float const gumbel = static_cast<float>(-std::log(-std::log(u)));
      float const block = 0.7f * normal(6, static_cast<std::uint64_t>(h), static_cast<std::uint64_t>(i / 128));
      base[static_cast<std::size_t>(h * n_max + i)] = gumbel + block + (i < 4 ? 5.f : 0.f);
      noise[static_cast<std::size_t>(h * n_max + i)] = normal(7, static_cast<std::uint64_t>(h), static_cast<std::uint64_t>(i));
    }
  }
  float const rho = 0.9f, sigma = 0.6f, keep = std::sqrt(1.f - rho * rho);
  std::vector<std::int32_t> order;
  std::vector<float> score;
  for (index_t s = 0; s < t->steps; ++s) {
    index_t const n = t->n0 + s;
    std::vector<std::int32_t> step_sel(static_cast<std::size_t>(heads * k));
    for (index_t h = 0; h < heads; ++h) {
      score.resize(static_cast<std::size_t>(n));
      for (index_t i = 0; i < n; ++i) {
        auto& e = noise[static_cast<std::size_t>(h * n_max + i)];
        e = rho * e + keep * normal(8 + static_cast<std::uint64_t>(s), static_cast<std::uint64_t>(h), static_cast<std::uint64_t>(i));
        score[static_cast<std::size_t>(i)] =
          base[static_cast<std::size_t>(h * n_max + i)] + sigma * e + (i >= n - 64 ? 3.f : 0.f);
      }
      order.resize(static_cast<std::size_t>(n));
      std::iota(order.begin(), order.end(), 0);
      std::nth_element(order.begin(), order.begin() + k, order.end(), [&](std::int32_t a, std::int32_t b) {
        return score[static_cast<std::size_t>(a)] > score[static_cast<std::size_t>(b)];
      });
      std::sort(order.begin(), order.begin() + k);
      std::copy(order.begin(), order.begin() + k, step_sel.begin() + h * k);
    }
    t->sel.push_back(std::move(step_sel));
  }
  cache.push_back(std::move(t));
  return *cache.back();
}

template <class Policy>
void BM_cache_access(benchmark::State& state)
{
  index_t const k = state.range(0);
  auto const capacity = static_cast<std::uint32_t>(state.range(1));
  bool const with_gather = state.range(2) != 0;
  auto const& tr = trace_for(k);
  auto& store = shared_store();
  pqkv::gpu::slot_table<Policy> table{{.layers = 1, .batch = 1, .kv_heads = heads, .capacity = capacity,
                                       .key_bound = static_cast<std::int32_t>(tokens), .max_keys = k}};
  auto const steps = static_cast<std::size_t>(tr.steps);
  pqkv::device_buffer<std::int32_t> keys(steps * static_cast<std::size_t>(heads * k)), slots(static_cast<std::size_t>(heads * k));
  for (std::size_t s = 0; s < steps; ++s) {
    PQKV_CUDA_TRY(cudaMemcpy(keys.data() + s * static_cast<std::size_t>(heads * k), tr.sel[s].data(),
                             tr.sel[s].size() * 4, cudaMemcpyHostToDevice));
  }
  pqkv::device_buffer<T> hot_k(static_cast<std::size_t>(heads * capacity * dim)), hot_v(hot_k.size());
  PQKV_CUDA_TRY(cudaDeviceSynchronize());  // uploads from pageable memory may still be in flight
  timer t;
  std::size_t it = 0;
  auto call = [&] {
    // Replays the trace; the first quarter of it warms the cache each round.
    std::size_t const s = it++ % steps;
    if (s == 0) { table.reset(t.stream); }
    auto const kv = pqkv::make_view(static_cast<std::int32_t const*>(keys.data()) + s * static_cast<std::size_t>(heads * k),
                                    1, heads, k);
    if (with_gather) {
      table.step(0, kv, {}, store.ref(), pqkv::make_view(hot_k.data(), 1, heads, static_cast<index_t>(capacity), dim),
                 pqkv::make_view(hot_v.data(), 1, heads, static_cast<index_t>(capacity), dim),
                 pqkv::make_view(slots.data(), 1, heads, k), nullptr, t.stream);
    } else {
      table.access(0, kv, {}, pqkv::make_view(slots.data(), 1, heads, k), t.stream);
    }
  };
  for (std::size_t i = 0; i < steps / 4; ++i) { call(); }
  t.run(state, call);
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * heads * k));
  // 32 consecutive steps between two events: per-step device time with the
  // launches queued back to back, as in a decode loop (no reset among them).
  it = 0;
  for (std::size_t i = 0; i < steps / 4; ++i) { call(); }
  PQKV_CUDA_TRY(cudaStreamSynchronize(t.stream));
  double const ms = t.events.ms([&] {
    for (int i = 0; i < 32; ++i) { call(); }
  });
  state.counters["queued_us_per_step"] = ms * 1e3 / 32.0;
  // The same 32 steps captured in one CUDA graph and replayed, as a decode
  // loop runs them: per-step device time without per-launch gaps.
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  it = steps / 4;
  PQKV_CUDA_TRY(cudaStreamBeginCapture(t.stream, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < 32; ++i) { call(); }
  PQKV_CUDA_TRY(cudaStreamEndCapture(t.stream, &graph));
  PQKV_CUDA_TRY(cudaGraphInstantiate(&exec, graph, 0));
  for (int i = 0; i < 2; ++i) { PQKV_CUDA_TRY(cudaGraphLaunch(exec, t.stream)); }
  int const replays = 4;
  double const graph_ms = t.events.ms([&] {
    for (int i = 0; i < replays; ++i) { PQKV_CUDA_TRY(cudaGraphLaunch(exec, t.stream)); }
  });
  state.counters["graph_us_per_step"] = graph_ms * 1e3 / (32.0 * replays);
  PQKV_CUDA_TRY(cudaGraphExecDestroy(exec));
  PQKV_CUDA_TRY(cudaGraphDestroy(graph));
}

/// Hit rate and bytes moved per step over the trace: range(0) = cache tokens
/// per head (pqkv: slots; PQCache: capacity_blocks * 128), range(1) = policy
/// (0 LRU, 1 LFU, 2 FIFO, 3 PQCache block LFU). Runs the GPU caches; counters
/// are averages over the steps after the first (cold) one.
void BM_hit_rate(benchmark::State& state)
{
  index_t const k = 2048;
  auto const budget = static_cast<std::uint32_t>(state.range(0));
  int const policy = static_cast<int>(state.range(1));
  auto const& tr = trace_for(k);
  auto const steps = static_cast<std::size_t>(tr.steps);
  pqkv::device_buffer<std::int32_t> keys(static_cast<std::size_t>(heads * k)), slots(keys.size()), off(1);
  double hits = 0, selected = 0, bytes = 0;
  cudaStream_t stream = nullptr;
  PQKV_CUDA_TRY(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  auto run_table = [&](auto policy_obj) {
    using P = decltype(policy_obj);
    pqkv::gpu::slot_table<P> table{{.layers = 1, .batch = 1, .kv_heads = heads, .capacity = budget,
                                    .key_bound = static_cast<std::int32_t>(tokens), .max_keys = k}};
    for (std::size_t s = 0; s < steps; ++s) {
      PQKV_CUDA_TRY(
        cudaMemcpyAsync(keys.data(), tr.sel[s].data(), tr.sel[s].size() * 4, cudaMemcpyHostToDevice, stream));
      table.access(0, pqkv::make_view(static_cast<std::int32_t const*>(keys.data()), 1, heads, k), {},
                   pqkv::make_view(slots.data(), 1, heads, k), stream);
      std::vector<std::int32_t> c(static_cast<std::size_t>(heads * 4));
      PQKV_CUDA_TRY(cudaMemcpyAsync(c.data(), table.last().counters, c.size() * 4, cudaMemcpyDeviceToHost, stream));
      PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
      if (s == 0) { continue; }
      for (index_t h = 0; h < heads; ++h) {
        hits += c[static_cast<std::size_t>(h * 4)];
        selected += c[static_cast<std::size_t>(h * 4)] + c[static_cast<std::size_t>(h * 4 + 1)];
        bytes += 2.0 * static_cast<double>(row_bytes) * c[static_cast<std::size_t>(h * 4 + 1)];  // every miss crosses once
      }
    }
  };
  for (auto _ : state) {
    hits = selected = bytes = 0;
    if (policy == 0) { run_table(pqkv::cache::lru{}); }
    if (policy == 1) { run_table(pqkv::cache::lfu{}); }
    if (policy == 2) { run_table(pqkv::cache::fifo{}); }
    if (policy == 3) {
      std::uint32_t const blocks = budget / 128;
      pqkv::gpu::block_lfu_cache cache{{.capacity_blocks = blocks, .block_tokens = 128, .blocks_per_step = blocks,
                                        .max_tokens = tokens},
                                       1, 1, heads, k};
      for (std::size_t s = 0; s < steps; ++s) {
        std::int32_t const n = static_cast<std::int32_t>(tr.n0 + static_cast<index_t>(s));
        PQKV_CUDA_TRY(
          cudaMemcpyAsync(keys.data(), tr.sel[s].data(), tr.sel[s].size() * 4, cudaMemcpyHostToDevice, stream));
        PQKV_CUDA_TRY(cudaMemcpyAsync(off.data(), &n, 4, cudaMemcpyHostToDevice, stream));
        cache.step(0, pqkv::make_view(static_cast<std::int32_t const*>(keys.data()), 1, heads, k),
                   std::span<std::int32_t const>(off.data(), 1), pqkv::make_view(slots.data(), 1, heads, k), stream);
        std::int32_t c[5] = {};
        PQKV_CUDA_TRY(cudaMemcpyAsync(c, cache.last().counters, sizeof(c), cudaMemcpyDeviceToHost, stream));
        std::int32_t copy_rows = 0;
        PQKV_CUDA_TRY(cudaMemcpyAsync(&copy_rows, cache.last().copy_count, 4, cudaMemcpyDeviceToHost, stream));
        PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
        if (s == 0) { continue; }
        hits += c[0];
        selected += c[0] + c[1];
        // Token misses are fetched for this step; copied blocks (all heads) fill the cache for the next.
        bytes += 2.0 * static_cast<double>(row_bytes) * (c[1] + static_cast<double>(copy_rows) * heads);
      }
    }
  }
  PQKV_CUDA_TRY(cudaStreamDestroy(stream));
  double const measured = static_cast<double>(steps - 1);
  state.counters["hit_rate"] = selected > 0 ? hits / selected : 0.0;
  state.counters["MB_per_step"] = bytes / measured / 1e6;
  state.counters["cache_tokens_per_head"] = budget;
  state.counters["selected_per_step"] = selected / measured;
}

}  // namespace

BENCHMARK(BM_contiguous_h2d)->ArgName("k")->Arg(2048)->Arg(8192)->Arg(26214)->UseManualTime()->Iterations(50)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_gather)
  ->ArgNames({"k", "clustered", "streaming", "bpsm"})
  ->ArgsProduct({{2048, 8192, 26214}, {0, 1}, {0, 1}, {8}})
  ->Args({8192, 0, 0, 2})
  ->Args({8192, 0, 0, 4})
  ->Args({8192, 0, 0, 16})
  ->UseManualTime()
  ->Iterations(50)
  ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_copy_engine)
  ->ArgNames({"k", "clustered"})
  ->ArgsProduct({{2048, 8192, 26214}, {0, 1}})
  ->UseManualTime()
  ->Iterations(5)
  ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_cache_access<pqkv::cache::lru>)
  ->ArgNames({"k", "capacity", "gather"})
  ->ArgsProduct({{2048}, {2048, 4096, 8192}, {0, 1}})
  ->Args({26214, 26214, 0})
  ->Args({26214, 32768, 0})
  ->Args({26214, 32768, 1})
  ->UseManualTime()
  ->Iterations(144)
  ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_cache_access<pqkv::cache::lfu>)
  ->ArgNames({"k", "capacity", "gather"})
  ->ArgsProduct({{2048}, {4096}, {0, 1}})
  ->UseManualTime()
  ->Iterations(144)
  ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_cache_access<pqkv::cache::fifo>)
  ->ArgNames({"k", "capacity", "gather"})
  ->ArgsProduct({{2048}, {4096}, {0}})
  ->UseManualTime()
  ->Iterations(144)
  ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_hit_rate)
  ->ArgNames({"cache_tokens", "policy"})
  ->ArgsProduct({{2048, 3072, 4096, 8192}, {0, 1, 2, 3}})
  ->Iterations(1)
  ->Unit(benchmark::kMillisecond);

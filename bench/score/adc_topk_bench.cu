// SPDX-License-Identifier: Apache-2.0
// pqkv::gpu::adc_topk: one decode step (LUT + ADC scores + GQA aggregation +
// top-k) for 8 KV heads, 32 q heads, d = 128, 4 sink + 64 window tokens.
// Args: batch, n (tokens per sequence), m, nbits, k (0: n / 5), bpsm (the
// limits' blocks_per_sm tuning of the score kernel's grid; swept at batch 1,
// m = 8). Counter `cluster` = blocks of the select kernel per row.
// Times are CUDA events around the stream call (manual time), after warm-up;
// the inputs rotate among copies that together exceed L2, as the codes of
// successive layers would. Counters: items = sequence tokens scored, bytes =
// code bytes read, median_us = median of the iterations, graph_median_us =
// median of replays of the call captured in a CUDA graph.
// The torch anchors (bench/anchors/torch_adc_topk.py) time the same shapes.
// BM_gpu_adc_topk_paged: the same call with the codes in a page pool behind
// a shuffled block table (arg page; page 0 = the contiguous layout through
// the same harness), so contiguous vs paged compare in one run.
#include <pqkv/core/device_buffer.cuh>
#include <pqkv/core/random.hpp>
#include <pqkv/score/adc_topk.cuh>
#include <pqkv/score/paged_codes.hpp>

#include "common/gpu_timing.cuh"

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstddef>
#include <numeric>
#include <cstdint>
#include <vector>

namespace {

using pqkv::index_t;
constexpr index_t kv_heads = 8, q_heads = 32, dim = 128, sink = 4, window = 64;

__global__ void fill_uniform(float* p, std::size_t n, std::uint64_t seed)
{
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n; i += std::size_t{gridDim.x} * blockDim.x) {
    p[i] = static_cast<float>(2.0 * pqkv::detail::random_unit(seed, 0, i) - 1.0);
  }
}

__global__ void fill_codes(std::uint8_t* p, std::size_t n, std::uint64_t seed, std::uint64_t ksub)
{
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n; i += std::size_t{gridDim.x} * blockDim.x) {
    p[i] = static_cast<std::uint8_t>(pqkv::detail::random_below(seed, 1, i, ksub));
  }
}

/// Random queries and codes (`copies` of each, so timed calls do not reuse a
/// warm L2), centroids, lengths n, outputs and the workspace of one scorer.
struct scorer_inputs {
  scorer_inputs(pqkv::adc_shape const& shape, index_t batch_, index_t n_, index_t k_, std::size_t workspace_bytes)
      : batch{batch_}, n{n_}, k{k_}, m{shape.m},
        code_bytes{static_cast<std::size_t>(batch * kv_heads * n * shape.m)},
        copies{std::clamp<std::size_t>((std::size_t{160} << 20) / code_bytes + 1, 1, 8)},
        q_count{static_cast<std::size_t>(batch * q_heads * dim)},
        codes(code_bytes * copies), q(q_count * copies),
        centroids(static_cast<std::size_t>(kv_heads * shape.m * shape.ksub() * shape.dsub())),
        lens(static_cast<std::size_t>(batch)), out(static_cast<std::size_t>(batch * kv_heads * k)),
        valid(static_cast<std::size_t>(batch * kv_heads)), workspace(std::max<std::size_t>(workspace_bytes, 1)),
        ksub{shape.ksub()}, dsub{shape.dsub()}
  {
    fill_codes<<<1024, 256>>>(codes.data(), codes.size(), 1, static_cast<std::uint64_t>(shape.ksub()));
    PQKV_CUDA_CHECK_LAST();
    fill_uniform<<<256, 256>>>(q.data(), q.size(), 2);
    PQKV_CUDA_CHECK_LAST();
    fill_uniform<<<256, 256>>>(centroids.data(), centroids.size(), 3);
    PQKV_CUDA_CHECK_LAST();
    std::vector<std::int32_t> const host_lens(static_cast<std::size_t>(batch), static_cast<std::int32_t>(n));
    PQKV_CUDA_TRY(cudaMemcpy(lens.data(), host_lens.data(), lens.size_bytes(), cudaMemcpyHostToDevice));
  }

  [[nodiscard]] auto queries(std::size_t c) const
  {
    return pqkv::make_view(static_cast<float const*>(q.data()) + c * q_count, batch, q_heads, dim);
  }
  [[nodiscard]] std::uint8_t const* code_copy(std::size_t c) const { return codes.data() + c * code_bytes; }
  [[nodiscard]] auto centroid_view() const
  {
    return pqkv::make_view(static_cast<float const*>(centroids.data()), kv_heads, m, ksub, dsub);
  }
  [[nodiscard]] std::span<std::int32_t const> seq_lens() const
  {
    return {lens.data(), static_cast<std::size_t>(batch)};
  }
  [[nodiscard]] auto out_view() { return pqkv::make_view(out.data(), batch, kv_heads, k); }
  [[nodiscard]] auto valid_view() { return pqkv::make_view(valid.data(), batch, kv_heads); }

  index_t batch, n, k, m;
  std::size_t code_bytes, copies, q_count;
  pqkv::device_buffer<std::uint8_t> codes;
  pqkv::device_buffer<float> q, centroids;
  pqkv::device_buffer<std::int32_t> lens, out, valid;
  pqkv::device_buffer<std::byte> workspace;
  index_t ksub, dsub;
};

/// Times `call(copy)` on `stream`: stream-launched calls (median_us), then the
/// same calls captured in one CUDA graph per input copy and replayed, as a
/// decode loop would (graph_median_us).
template <class Call>
void time_stream_and_graph(benchmark::State& state, cudaStream_t stream, std::size_t copies, Call call)
{
  pqkv::test::event_timer const timer{stream};
  std::size_t iter = 0;
  auto next = [&] { call(iter++ % copies); };
  std::vector<double> us = pqkv::bench::timed_loop(state, timer, next, 5);
  for (double& t : us) { t *= 1e3; }
  state.counters["median_us"] = pqkv::test::median(us);
  std::vector<pqkv::test::captured_graph> graphs;
  for (std::size_t c = 0; c < copies; ++c) {
    graphs.emplace_back(stream, [&] { call(c); });
  }
  for (auto const& g : graphs) { g.launch(stream); }
  std::vector<double> graph_us;
  for (std::size_t i = 0; i < std::max<std::size_t>(us.size(), 20); ++i) {
    graph_us.push_back(timer.ms([&] { graphs[i % copies].launch(stream); }) * 1e3);
  }
  state.counters["graph_median_us"] = pqkv::test::median(graph_us);
}

template <class Aggregation>
void BM_gpu_adc_topk(benchmark::State& state)
{
  index_t const batch = state.range(0), n = state.range(1), m = state.range(2);
  int const nbits = static_cast<int>(state.range(3));
  index_t const k = state.range(4) > 0 ? state.range(4) : n / 5;
  int const blocks_per_sm = static_cast<int>(state.range(5));
  pqkv::adc_shape const shape{q_heads, kv_heads, dim, m, nbits};
  pqkv::gpu::adc_topk<Aggregation> const op{shape, {.k = k, .sink = sink, .window = window},
                                            {.max_batch = batch, .max_tokens = n, .blocks_per_sm = blocks_per_sm}};

  scorer_inputs in{shape, batch, n, k, op.workspace_bytes()};
  pqkv::bench::owned_stream const owned;
  cudaStream_t const stream = owned.get();
  time_stream_and_graph(state, stream, in.copies, [&](std::size_t c) {
    op(in.queries(c), pqkv::make_view(in.code_copy(c), batch, kv_heads, n, m), in.centroid_view(), in.seq_lens(),
       in.out_view(), in.valid_view(), in.workspace.span(), stream);
  });
  state.counters["k"] = static_cast<double>(k);
  state.counters["cluster"] = op.cluster_blocks(batch);
  state.counters["active_clusters"] = op.active_clusters(op.cluster_blocks(batch));
  state.counters["active_16"] = op.active_clusters(16);
  state.SetItemsProcessed(state.iterations() * batch * n);
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(in.code_bytes));
}

void main_grid(benchmark::internal::Benchmark* b)
{
  b->ArgNames({"batch", "n", "m", "nbits", "k", "bpsm"});
  for (std::int64_t batch : {1, 8}) {
    for (std::int64_t n : {32768, 131072, 1048576}) {
      for (std::int64_t m : {2, 4, 8, 16}) {
        for (std::int64_t k : {std::int64_t{2048}, std::int64_t{0}}) {
          for (std::int64_t bpsm : {2, 4, 8}) {
            if (bpsm == 4 || (batch == 1 && m == 8)) { b->Args({batch, n, m, 8, k, bpsm}); }
          }
        }
      }
    }
  }
  for (std::int64_t n : {32768, 131072, 1048576}) { b->Args({1, n, 2, 6, 0, 4}); }  // PQCache's default (m, bits)
}

void sum_grid(benchmark::internal::Benchmark* b)
{
  b->ArgNames({"batch", "n", "m", "nbits", "k", "bpsm"});
  for (std::int64_t n : {32768, 131072, 1048576}) {
    for (std::int64_t k : {std::int64_t{2048}, std::int64_t{0}}) {
      b->Args({1, n, 8, 8, k, 4});
    }
  }
}

/// Contiguous (page 0) or paged codes, same inputs: pages of the pool are a
/// random permutation of the sequences' logical pages.
template <class Aggregation>
void BM_gpu_adc_topk_paged(benchmark::State& state)
{
  index_t const batch = state.range(0), n = state.range(1), m = state.range(2);
  int const nbits = static_cast<int>(state.range(3));
  index_t const k = state.range(4) > 0 ? state.range(4) : n / 5;
  index_t const page = state.range(5);
  pqkv::adc_shape const shape{q_heads, kv_heads, dim, m, nbits};
  pqkv::gpu::adc_topk<Aggregation> const op{shape, {.k = k, .sink = sink, .window = window},
                                            {.max_batch = batch, .max_tokens = n}};
  scorer_inputs in{shape, batch, n, k, op.workspace_bytes()};
  // The block table: a shuffled permutation of one copy's pages (random
  // codes, so the pool needs no reordering).
  index_t const width = page > 0 ? (n + page - 1) / page : 0;
  std::vector<std::int32_t> table(static_cast<std::size_t>(batch * width));
  std::iota(table.begin(), table.end(), 0);
  for (std::size_t i = table.size(); i > 1; --i) {
    std::swap(table[i - 1], table[static_cast<std::size_t>(pqkv::detail::random_below(9, 0, i, i))]);
  }
  pqkv::device_buffer<std::int32_t> table_d(std::max<std::size_t>(table.size(), 1));
  if (!table.empty()) {
    PQKV_CUDA_TRY(cudaMemcpy(table_d.data(), table.data(), table.size() * sizeof(std::int32_t), cudaMemcpyHostToDevice));
  }

  pqkv::bench::owned_stream const owned;
  cudaStream_t const stream = owned.get();
  time_stream_and_graph(state, stream, in.copies, [&](std::size_t c) {
    if (page > 0) {
      pqkv::paged_codes const paged{pqkv::make_view(in.code_copy(c), batch * width, kv_heads, page, m),
                                    pqkv::make_view(static_cast<std::int32_t const*>(table_d.data()), batch, width)};
      op(in.queries(c), paged, in.centroid_view(), in.seq_lens(), in.out_view(), in.valid_view(), in.workspace.span(),
         stream);
    } else {
      op(in.queries(c), pqkv::make_view(in.code_copy(c), batch, kv_heads, n, m), in.centroid_view(), in.seq_lens(),
         in.out_view(), in.valid_view(), in.workspace.span(), stream);
    }
  });
  state.counters["k"] = static_cast<double>(k);
  state.counters["page"] = static_cast<double>(page);
  state.SetItemsProcessed(state.iterations() * batch * n);
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(in.code_bytes));
}

void paged_grid(benchmark::internal::Benchmark* b)
{
  b->ArgNames({"batch", "n", "m", "nbits", "k", "page"});
  for (std::int64_t batch : {1, 8}) {
    for (std::int64_t m : {8, 16}) {
      for (std::int64_t page : {0, 64, 16}) { b->Args({batch, 131072, m, 8, 2048, page}); }
    }
  }
}

BENCHMARK(BM_gpu_adc_topk_paged<pqkv::gqa::softmax_sum>)
  ->Apply(paged_grid)
  ->UseManualTime()
  ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_gpu_adc_topk<pqkv::gqa::softmax_sum>)
  ->Apply(main_grid)
  ->UseManualTime()
  ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_gpu_adc_topk<pqkv::gqa::sum>)->Apply(sum_grid)->UseManualTime()->Unit(benchmark::kMicrosecond);

}  // namespace

// SPDX-License-Identifier: Apache-2.0
// pqkv::gpu::kmeans_trainer and pqkv::gpu::pq_encoder on one layer of a
// Llama-3.1-8B-like model: 8 KV heads, d = 128, float keys.
// Args: tokens, m, nbits, path (0: the FP32 / SIMT assignment, 1: the
// tensor-core assignment with exact re-check; m = 16 (dsub 8) has no
// tensor-core path). Counter fallback_rows (path 1): the fraction of row
// assignments in one call that took the exact fallback scan.
//   BM_gpu_kmeans_train   20 Lloyd iterations (tol = 0) from a provided init
//                         (centroid k of each (head, subspace) = training row
//                         k * tokens / ksub); the timed call copies the init
//                         into the centroids, packs, and runs 21 assignment and
//                         20 update passes. Counter mse: the report's final
//                         objective (the torch anchor prints its own on the
//                         same generator).
//   BM_gpu_kmeans_pp_init k-means++ init alone (max_iter = 0): the timed call
//                         packs, draws ksub centroids by D^2 sampling (ksub - 1
//                         passes over the training rows) and runs the initial
//                         assignment. Args: tokens, m, nbits, max_train_points
//                         (0: all tokens). Counter mse: the init's objective.
//   BM_gpu_encode         one prefill encode of the layer.
//   BM_gpu_encode_append  one decode step (1 token per head) from a captured
//                         graph with the position read on the device.
// Times are CUDA events around the call (manual time), after a warm-up;
// median_ms / median_us: the median over the iterations. The keys follow
// the closed form of bench/anchors/torch_kmeans.py, so the anchor trains on
// the same data (up to the rounding of sinf).
#include <pqkv/codebook/kmeans.cuh>
#include <pqkv/core/device_buffer.cuh>
#include <pqkv/encode/encode.cuh>

#include "common/gpu_timing.cuh"

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace {

using pqkv::index_t;
constexpr index_t heads = 8, dim = 128;

/// keys(h, t, c), the anchor's formula: sin(u * (0.5 + 0.01 c) + 0.37 h + 0.11 c)
/// + 0.25 sin(0.001 t (1 + c mod 5)), u = (t mod 9973) * 0.618034.
__global__ void fill_keys(float* k, index_t tokens)
{
  index_t const total = heads * tokens * dim;
  for (index_t i = blockIdx.x * index_t{blockDim.x} + threadIdx.x; i < total; i += index_t{gridDim.x} * blockDim.x) {
    index_t const c = i % dim, t = (i / dim) % tokens, h = i / (dim * tokens);
    float const cf = static_cast<float>(c), hf = static_cast<float>(h);
    float const u = __fmul_rn(static_cast<float>(t % 9973), 0.618034f);
    float const a = __fadd_rn(__fadd_rn(__fmul_rn(u, __fadd_rn(0.5f, __fmul_rn(0.01f, cf))), __fmul_rn(0.37f, hf)),
                              __fmul_rn(0.11f, cf));
    float const b = __fmul_rn(__fmul_rn(static_cast<float>(t), 0.001f), static_cast<float>(1 + c % 5));
    k[i] = __fadd_rn(sinf(a), __fmul_rn(0.25f, sinf(b)));
  }
}

/// centroids(h, s, k, j) = keys(h, k * tokens / ksub, s * dsub + j)
__global__ void fill_init(float* c, float const* keys, index_t tokens, index_t m, index_t ksub)
{
  index_t const dsub = dim / m, total = heads * m * ksub * dsub;
  for (index_t i = blockIdx.x * index_t{blockDim.x} + threadIdx.x; i < total; i += index_t{gridDim.x} * blockDim.x) {
    index_t const j = i % dsub, k = (i / dsub) % ksub, s = (i / (dsub * ksub)) % m, h = i / (dsub * ksub * m);
    c[i] = keys[(h * tokens + k * tokens / ksub) * dim + s * dsub + j];
  }
}

/// The assignment path of argument `path`.
pqkv::gpu::assign_path path_of(long path)
{
  return path == 1 ? pqkv::gpu::assign_path::tensor_core : pqkv::gpu::assign_path::simt;
}

/// A zeroed device counter of fallback rows.
struct fallback_counter {
  pqkv::device_buffer<unsigned long long> buf{1};
  fallback_counter() { reset(); }
  void reset() { PQKV_CUDA_TRY(cudaMemset(buf.data(), 0, sizeof(unsigned long long))); }
  [[nodiscard]] double read()
  {
    unsigned long long v = 0;
    PQKV_CUDA_TRY(cudaMemcpy(&v, buf.data(), sizeof(v), cudaMemcpyDeviceToHost));
    return static_cast<double>(v);
  }
};

/// A stream with a CUDA-event timer on it.
struct timer {
  pqkv::bench::owned_stream owned;
  cudaStream_t stream = owned.get();
  pqkv::test::event_timer events{stream};
};

void BM_gpu_kmeans_train(benchmark::State& state)
{
  index_t const tokens = state.range(0), m = state.range(1);
  int const nbits = static_cast<int>(state.range(2));
  pqkv::pq_config const cfg{
    .dim = dim, .m = m, .nbits = nbits, .max_iter = 20, .tol = 0, .init = pqkv::init_method::provided};
  fallback_counter fb;
  pqkv::gpu::kmeans_trainer const tr{cfg, {.max_heads = heads, .max_tokens = tokens},
                                     {.path = path_of(state.range(3)), .fallback_counter = fb.buf.data()}};
  std::size_t const nc = static_cast<std::size_t>(heads * m * cfg.ksub() * cfg.dsub());
  pqkv::device_buffer<float> keys(static_cast<std::size_t>(heads * tokens * dim)), init(nc), cent(nc);
  pqkv::device_buffer<std::byte> ws(tr.workspace_bytes());
  fill_keys<<<1024, 256>>>(keys.data(), tokens);
  PQKV_CUDA_CHECK_LAST();
  fill_init<<<256, 256>>>(init.data(), keys.data(), tokens, m, cfg.ksub());
  PQKV_CUDA_CHECK_LAST();
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  timer tm;
  auto const kv = pqkv::make_view(static_cast<float const*>(keys.data()), heads, tokens, dim);
  auto const cv = pqkv::make_view(cent.data(), heads, m, cfg.ksub(), cfg.dsub());
  auto call = [&] {
    PQKV_CUDA_TRY(cudaMemcpyAsync(cent.data(), init.data(), nc * sizeof(float), cudaMemcpyDeviceToDevice, tm.stream));
    tr.train(kv, cv, ws.span(), tm.stream);
  };
  std::vector<double> times = pqkv::bench::timed_loop(state, tm.events, call);
  auto const rep = tr.report(ws.span(), tm.stream);
  fb.reset();
  call();
  PQKV_CUDA_TRY(cudaStreamSynchronize(tm.stream));
  state.counters["fallback_rows"] = fb.read() / static_cast<double>((cfg.max_iter + 1) * heads * tokens * m);
  state.counters["median_ms"] = pqkv::test::median(times);
  state.counters["mse"] = rep.mse;
  state.counters["iterations"] = rep.iterations;
  state.SetItemsProcessed(state.iterations() * heads * tokens);
  state.SetBytesProcessed(state.iterations() * heads * tokens * dim * static_cast<index_t>(sizeof(float)));
}

void BM_gpu_kmeans_pp_init(benchmark::State& state)
{
  index_t const tokens = state.range(0), m = state.range(1), train_points = state.range(3);
  int const nbits = static_cast<int>(state.range(2));
  pqkv::pq_config const cfg{.dim = dim, .m = m, .nbits = nbits, .max_iter = 0, .tol = 0,
                            .init = pqkv::init_method::kmeans_plus_plus, .max_train_points = train_points};
  pqkv::gpu::kmeans_trainer const tr{cfg, {.max_heads = heads, .max_tokens = tokens}};
  std::size_t const nc = static_cast<std::size_t>(heads * m * cfg.ksub() * cfg.dsub());
  pqkv::device_buffer<float> keys(static_cast<std::size_t>(heads * tokens * dim)), cent(nc);
  pqkv::device_buffer<std::byte> ws(tr.workspace_bytes());
  fill_keys<<<1024, 256>>>(keys.data(), tokens);
  PQKV_CUDA_CHECK_LAST();
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  timer tm;
  auto const kv = pqkv::make_view(static_cast<float const*>(keys.data()), heads, tokens, dim);
  auto const cv = pqkv::make_view(cent.data(), heads, m, cfg.ksub(), cfg.dsub());
  auto call = [&] { tr.train(kv, cv, ws.span(), tm.stream); };
  std::vector<double> times = pqkv::bench::timed_loop(state, tm.events, call);
  auto const rep = tr.report(ws.span(), tm.stream);
  index_t const n = train_points > 0 && train_points < tokens ? train_points : tokens;
  state.counters["median_ms"] = pqkv::test::median(times);
  state.counters["mse"] = rep.mse;
  state.counters["train_rows"] = static_cast<double>(n);
  state.SetItemsProcessed(state.iterations() * heads * n);
  // each of the ksub - 1 picks reads every training row once
  state.SetBytesProcessed(state.iterations() * (cfg.ksub() - 1) * heads * n * dim * static_cast<index_t>(sizeof(float)));
}

void BM_gpu_encode(benchmark::State& state)
{
  index_t const tokens = state.range(0), m = state.range(1);
  int const nbits = static_cast<int>(state.range(2));
  pqkv::pq_config const cfg{.dim = dim, .m = m, .nbits = nbits};
  fallback_counter fb;
  pqkv::gpu::pq_encoder const enc{cfg, {.path = path_of(state.range(3)), .fallback_counter = fb.buf.data()}};
  std::size_t const nc = static_cast<std::size_t>(heads * m * cfg.ksub() * cfg.dsub());
  pqkv::device_buffer<float> keys(static_cast<std::size_t>(heads * tokens * dim)), cent(nc);
  pqkv::device_buffer<std::uint8_t> codes(static_cast<std::size_t>(heads * tokens * m));
  fill_keys<<<1024, 256>>>(keys.data(), tokens);
  PQKV_CUDA_CHECK_LAST();
  fill_init<<<256, 256>>>(cent.data(), keys.data(), tokens, m, cfg.ksub());
  PQKV_CUDA_CHECK_LAST();
  PQKV_CUDA_TRY(cudaDeviceSynchronize());
  timer tm;
  auto call = [&] {
    enc.encode(pqkv::make_view(static_cast<float const*>(keys.data()), heads, tokens, dim),
               pqkv::make_view(static_cast<float const*>(cent.data()), heads, m, cfg.ksub(), cfg.dsub()),
               pqkv::make_view(codes.data(), heads, tokens, m), tm.stream);
  };
  std::vector<double> times = pqkv::bench::timed_loop(state, tm.events, call);
  fb.reset();
  call();
  PQKV_CUDA_TRY(cudaStreamSynchronize(tm.stream));
  state.counters["fallback_rows"] = fb.read() / static_cast<double>(heads * tokens * m);
  state.counters["median_us"] = pqkv::test::median(times) * 1e3;
  state.SetItemsProcessed(state.iterations() * heads * tokens);
  state.SetBytesProcessed(state.iterations() * heads * tokens * dim * static_cast<index_t>(sizeof(float)));
}

void BM_gpu_encode_append(benchmark::State& state)
{
  index_t const cap = state.range(0), m = state.range(1);
  int const nbits = static_cast<int>(state.range(2));
  pqkv::pq_config const cfg{.dim = dim, .m = m, .nbits = nbits};
  pqkv::gpu::pq_encoder const enc{cfg};
  std::size_t const nc = static_cast<std::size_t>(heads * m * cfg.ksub() * cfg.dsub());
  pqkv::device_buffer<float> keys(static_cast<std::size_t>(heads * cap * dim)), cent(nc);
  pqkv::device_buffer<std::uint8_t> codes(static_cast<std::size_t>(heads * cap * m));
  pqkv::device_buffer<index_t> pos(1);
  fill_keys<<<1024, 256>>>(keys.data(), cap);
  PQKV_CUDA_CHECK_LAST();
  fill_init<<<256, 256>>>(cent.data(), keys.data(), cap, m, cfg.ksub());
  PQKV_CUDA_CHECK_LAST();
  index_t const p0 = cap / 2;
  PQKV_CUDA_TRY(cudaMemcpy(pos.data(), &p0, sizeof(p0), cudaMemcpyHostToDevice));
  timer tm;
  pqkv::test::captured_graph const step(tm.stream, [&] {
    enc.append(pqkv::make_strided_view<float const, 3>(keys.data(), {heads, 1, dim}, {cap * dim, dim, 1}),
               pqkv::make_view(static_cast<float const*>(cent.data()), heads, m, cfg.ksub(), cfg.dsub()),
               pqkv::make_view(codes.data(), heads, cap, m), std::span<index_t const>{pos.data(), 1}, tm.stream);
  });
  auto call = [&] { step.launch(tm.stream); };
  std::vector<double> times = pqkv::bench::timed_loop(state, tm.events, call);
  state.counters["median_us"] = pqkv::test::median(times) * 1e3;
  state.SetItemsProcessed(state.iterations() * heads);
}

void train_args(benchmark::internal::Benchmark* b)
{
  for (long const tokens : {32768L, 131072L, 1048576L}) {
    for (long const m : {2L, 8L, 16L}) {
      for (long const bits : {6L, 8L}) {
        for (long const path : {0L, 1L}) {
          if (path == 1 && m == 16) { continue; }  // dsub 8: no tensor-core path
          b->Args({tokens, m, bits, path});
        }
      }
    }
  }
}

}  // namespace

BENCHMARK(BM_gpu_kmeans_train)->Apply(train_args)->UseManualTime()->Iterations(3)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_gpu_kmeans_pp_init)
  ->Args({32768, 2, 8, 0})
  ->Args({32768, 16, 8, 0})
  ->Args({131072, 2, 6, 0})
  ->Args({131072, 2, 8, 0})
  ->Args({131072, 8, 8, 0})
  ->Args({131072, 16, 8, 0})
  ->Args({131072, 16, 8, 16384})
  ->Args({1048576, 8, 8, 0})
  ->UseManualTime()
  ->Iterations(3)
  ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_gpu_encode)->Apply(train_args)->UseManualTime()->Iterations(20)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_gpu_encode_append)
  ->Args({131072, 2, 6})
  ->Args({131072, 8, 8})
  ->Args({131072, 16, 8})
  ->UseManualTime()
  ->Iterations(200)
  ->Unit(benchmark::kMicrosecond);

// SPDX-License-Identifier: Apache-2.0
// pqkv::gpu::rq_encoder and pqkv::gpu::code_attention on 8 KV heads, d = 128.
//
// BM_gpu_rq_encode: prefill encode of one tensor (K or V) of 8 heads x n
//   tokens, bf16 rows; args n, stages, bits, shared (1: one codebook for all
//   heads, as VQKV's). Points: 8 stages of 256 (pqkv's 8+8 design point: K
//   and V each cost this) and VQKV's keys, 56 stages of 1024. Counters:
//   items = rows encoded, tflops = the exact-distance work (rows x stages x
//   2^bits x dsub x 3 flops: sub + fma) per second.
// BM_gpu_rq_append: one decode token for 8 heads, device position, the call
//   captured in a CUDA graph and replayed (time per replay); rows = 1: the
//   per-row cluster kernel (the default for small calls), 0: the tile kernel.
// BM_gpu_code_attention: one decode step, 32 q / 8 KV heads, args n and the
//   configuration (0: (256x8; 256x8) per-head codebooks, uint8; 1: VQKV
//   (1024x56; 512x16) shared codebooks, uint16; 2: (256x4; 256x4); 3:
//   (16x16; 16x16)). Code inputs rotate among copies that together exceed L2.
//   Counters: median_us (stream call), graph_median_us (replays of the call
//   captured in a graph), bytes = code bytes read, lut_shared.
// BM_gpu_rq_reconstruct: rows [0, n) of 8 heads rebuilt into bf16 [8, n,
//   128] (gpu::rq_reconstruct), args n and the configuration (0: 8 stages of
//   256, per-head codebooks, uint8; 1: VQKV's keys, 56 stages of 1024, shared,
//   uint16). Counters: median_us, gbps = (codes read + rows written) / time,
//   and, from the same run, copy_gbps = a device-to-device cudaMemcpyAsync of
//   the rows' size (2 x bytes / time: it reads and writes them), the
//   practical HBM ceiling the issue's 80% goal is measured against.
// The torch anchors (bench/anchors/torch_residual.py) time the same shapes.
#include <pqkv/attend/code_attention.cuh>
#include <pqkv/core/device_buffer.cuh>
#include <pqkv/core/random.hpp>
#include <pqkv/decode/residual_reconstruct.cuh>
#include <pqkv/encode/residual.cuh>

#include "common/gpu_timing.cuh"

#include <benchmark/benchmark.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace {

using pqkv::index_t;
constexpr index_t kv_heads = 8, q_heads = 32, dim = 128;

__global__ void fill_uniform(float* p, std::size_t n, std::uint64_t seed, float gain)
{
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n; i += std::size_t{gridDim.x} * blockDim.x) {
    p[i] = gain * static_cast<float>(2.0 * pqkv::detail::random_unit(seed, 0, i) - 1.0);
  }
}

__global__ void fill_bf16(__nv_bfloat16* p, std::size_t n, std::uint64_t seed)
{
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n; i += std::size_t{gridDim.x} * blockDim.x) {
    p[i] = __float2bfloat16_rn(static_cast<float>(2.0 * pqkv::detail::random_unit(seed, 0, i) - 1.0));
  }
}

template <class Code>
__global__ void fill_codes(Code* p, std::size_t n, std::uint64_t seed, std::uint64_t ksub)
{
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n; i += std::size_t{gridDim.x} * blockDim.x) {
    p[i] = static_cast<Code>(pqkv::detail::random_below(seed, 1, i, ksub));
  }
}

pqkv::rq_config rq(int stages, int bits)
{
  pqkv::rq_config c;
  c.dim = dim;
  c.stages = stages;
  c.bits = bits;
  return c;
}

template <class Code>
void run_encode(benchmark::State& state, pqkv::rq_config const& cfg, index_t n, bool shared)
{
  index_t const cbh = shared ? 1 : kv_heads;
  pqkv::gpu::rq_encoder const enc{cfg};
  pqkv::device_buffer<__nv_bfloat16> keys(static_cast<std::size_t>(kv_heads * n * dim));
  pqkv::device_buffer<float> cent(static_cast<std::size_t>(cbh * cfg.stages * cfg.ksub() * cfg.dsub()));
  pqkv::device_buffer<Code> codes(static_cast<std::size_t>(kv_heads * n * cfg.codes_per_row()));
  fill_bf16<<<1024, 256>>>(keys.data(), keys.size(), 1);
  PQKV_CUDA_CHECK_LAST();
  fill_uniform<<<1024, 256>>>(cent.data(), cent.size(), 2, 0.5f);
  PQKV_CUDA_CHECK_LAST();
  pqkv::bench::owned_stream const owned;
  cudaStream_t const stream = owned.get();
  pqkv::test::event_timer const timer{stream};
  auto call = [&] {
    enc.encode(pqkv::make_view(static_cast<__nv_bfloat16 const*>(keys.data()), kv_heads, n, dim),
               pqkv::rq_centroids_view<float const>{cent.data(), cbh, index_t{1}, index_t{cfg.stages}, cfg.ksub(),
                                                    cfg.dsub()},
               pqkv::make_view(codes.data(), kv_heads, n, cfg.codes_per_row()), stream);
  };
  std::vector<double> ms = pqkv::bench::timed_loop(state, timer, call, 1);
  double const med = pqkv::test::median(ms);
  state.counters["median_ms"] = med;
  double const flops = 3.0 * static_cast<double>(kv_heads * n) * cfg.stages * static_cast<double>(cfg.ksub()) * dim;
  state.counters["tflops"] = flops / (med * 1e-3) / 1e12;
  state.SetItemsProcessed(state.iterations() * kv_heads * n);
  state.SetBytesProcessed(state.iterations() * kv_heads * n * dim * 2);
}

void BM_gpu_rq_encode(benchmark::State& state)
{
  index_t const n = state.range(0);
  int const stages = static_cast<int>(state.range(1)), bits = static_cast<int>(state.range(2));
  bool const shared = state.range(3) != 0;
  auto const cfg = rq(stages, bits);
  if (bits <= 8) {
    run_encode<std::uint8_t>(state, cfg, n, shared);
  } else {
    run_encode<std::uint16_t>(state, cfg, n, shared);
  }
}
BENCHMARK(BM_gpu_rq_encode)
  ->ArgNames({"n", "stages", "bits", "shared"})
  ->Args({131072, 8, 8, 0})
  ->Args({131072, 56, 10, 1})
  ->UseManualTime()
  ->Unit(benchmark::kMillisecond)
  ->Iterations(3);

template <class Code>
void run_append(benchmark::State& state, pqkv::rq_config const& cfg, bool shared, bool rows)
{
  index_t const cbh = shared ? 1 : kv_heads, cap = 4096;
  pqkv::gpu::rq_encoder const enc{cfg, {.row_path_max = rows ? 2048 : 0}};
  pqkv::device_buffer<__nv_bfloat16> keys(static_cast<std::size_t>(kv_heads * dim));
  pqkv::device_buffer<float> cent(static_cast<std::size_t>(cbh * cfg.stages * cfg.ksub() * cfg.dsub()));
  pqkv::device_buffer<Code> codes(static_cast<std::size_t>(kv_heads * cap * cfg.codes_per_row()));
  pqkv::device_buffer<index_t> pos(1);
  fill_bf16<<<64, 256>>>(keys.data(), keys.size(), 3);
  PQKV_CUDA_CHECK_LAST();
  fill_uniform<<<1024, 256>>>(cent.data(), cent.size(), 4, 0.5f);
  PQKV_CUDA_CHECK_LAST();
  index_t const p = 1000;
  PQKV_CUDA_TRY(cudaMemcpy(pos.data(), &p, sizeof(index_t), cudaMemcpyHostToDevice));
  pqkv::bench::owned_stream const owned;
  cudaStream_t const stream = owned.get();
  pqkv::test::event_timer const timer{stream};
  pqkv::test::captured_graph const graph(stream, [&] {
    enc.append(pqkv::make_view(static_cast<__nv_bfloat16 const*>(keys.data()), kv_heads, index_t{1}, dim),
               pqkv::rq_centroids_view<float const>{cent.data(), cbh, index_t{1}, index_t{cfg.stages}, cfg.ksub(),
                                                    cfg.dsub()},
               pqkv::make_view(codes.data(), kv_heads, cap, cfg.codes_per_row()),
               std::span<index_t const>{pos.data(), 1}, stream);
  });
  std::vector<double> us = pqkv::bench::timed_loop(state, timer, [&] { graph.launch(stream); }, 3);
  for (double& t : us) { t *= 1e3; }
  state.counters["median_us"] = pqkv::test::median(us);
  state.SetItemsProcessed(state.iterations() * kv_heads);
}

void BM_gpu_rq_append(benchmark::State& state)
{
  int const stages = static_cast<int>(state.range(0)), bits = static_cast<int>(state.range(1));
  bool const shared = state.range(2) != 0, rows = state.range(3) != 0;
  if (bits <= 8) {
    run_append<std::uint8_t>(state, rq(stages, bits), shared, rows);
  } else {
    run_append<std::uint16_t>(state, rq(stages, bits), shared, rows);
  }
}
BENCHMARK(BM_gpu_rq_append)
  ->ArgNames({"stages", "bits", "shared", "rows"})
  ->Args({8, 8, 0, 1})
  ->Args({8, 8, 0, 0})
  ->Args({56, 10, 1, 1})
  ->UseManualTime()
  ->Unit(benchmark::kMicrosecond);

struct attn_point {
  int kstages, kbits, vstages, vbits;
  bool shared;
};

constexpr attn_point points[] = {{8, 8, 8, 8, false}, {56, 10, 16, 9, true}, {4, 8, 4, 8, false}, {16, 4, 16, 4, false}};

template <class KCode, class VCode>
void run_attention(benchmark::State& state, attn_point const& pt, index_t n)
{
  auto const kcfg = rq(pt.kstages, pt.kbits), vcfg = rq(pt.vstages, pt.vbits);
  index_t const cbh = pt.shared ? 1 : kv_heads;
  pqkv::gpu::code_attention const op{kcfg, vcfg, q_heads, kv_heads, {.max_tokens = n}};
  auto const kcount = static_cast<std::size_t>(kv_heads * n * kcfg.codes_per_row());
  auto const vcount = static_cast<std::size_t>(kv_heads * n * vcfg.codes_per_row());
  std::size_t const code_bytes = kcount * sizeof(KCode) + vcount * sizeof(VCode);
  std::size_t const copies = std::clamp<std::size_t>((std::size_t{120} << 20) / code_bytes + 1, 1, 8);
  pqkv::device_buffer<KCode> kcodes(kcount * copies);
  pqkv::device_buffer<VCode> vcodes(vcount * copies);
  pqkv::device_buffer<float> q(static_cast<std::size_t>(q_heads * dim));
  pqkv::device_buffer<float> kc(static_cast<std::size_t>(cbh * kcfg.stages * kcfg.ksub() * dim));
  pqkv::device_buffer<float> vc(static_cast<std::size_t>(cbh * vcfg.stages * vcfg.ksub() * dim));
  pqkv::device_buffer<float> out(static_cast<std::size_t>(q_heads * dim)), lse(static_cast<std::size_t>(q_heads));
  pqkv::device_buffer<std::byte> ws(op.workspace_bytes());
  fill_codes<<<1024, 256>>>(kcodes.data(), kcodes.size(), 5, static_cast<std::uint64_t>(kcfg.ksub()));
  PQKV_CUDA_CHECK_LAST();
  fill_codes<<<1024, 256>>>(vcodes.data(), vcodes.size(), 6, static_cast<std::uint64_t>(vcfg.ksub()));
  PQKV_CUDA_CHECK_LAST();
  fill_uniform<<<64, 256>>>(q.data(), q.size(), 7, 1.f);
  PQKV_CUDA_CHECK_LAST();
  fill_uniform<<<1024, 256>>>(kc.data(), kc.size(), 8, 0.3f);
  PQKV_CUDA_CHECK_LAST();
  fill_uniform<<<1024, 256>>>(vc.data(), vc.size(), 9, 0.3f);
  PQKV_CUDA_CHECK_LAST();
  pqkv::bench::owned_stream const owned;
  cudaStream_t const stream = owned.get();
  pqkv::test::event_timer const timer{stream};
  std::size_t iter = 0;
  auto call = [&] {
    std::size_t const c = iter++ % copies;
    op(pqkv::query_view<float const>{pqkv::make_view(static_cast<float const*>(q.data()), q_heads, dim)},
       pqkv::rq_centroids_view<float const>{kc.data(), cbh, index_t{1}, index_t{kcfg.stages}, kcfg.ksub(), dim},
       pqkv::make_view(static_cast<KCode const*>(kcodes.data()) + c * kcount, kv_heads, n, kcfg.codes_per_row()),
       pqkv::rq_centroids_view<float const>{vc.data(), cbh, index_t{1}, index_t{vcfg.stages}, vcfg.ksub(), dim},
       pqkv::make_view(static_cast<VCode const*>(vcodes.data()) + c * vcount, kv_heads, n, vcfg.codes_per_row()), n,
       pqkv::make_view(out.data(), q_heads, dim), lse.span(), ws.span(), stream);
  };
  std::vector<double> us = pqkv::bench::timed_loop(state, timer, call, 3);
  for (double& t : us) { t *= 1e3; }
  state.counters["median_us"] = pqkv::test::median(us);
  std::vector<pqkv::test::captured_graph> graphs;
  for (std::size_t c = 0; c < copies; ++c) {
    iter = c;
    graphs.emplace_back(stream, call);
  }
  for (auto const& g : graphs) { g.launch(stream); }
  std::vector<double> graph_us;
  for (std::size_t i = 0; i < std::max<std::size_t>(us.size(), 20); ++i) {
    graph_us.push_back(timer.ms([&] { graphs[i % copies].launch(stream); }) * 1e3);
  }
  state.counters["graph_median_us"] = pqkv::test::median(graph_us);
  state.counters["lut_shared"] = op.lut_in_shared_memory() ? 1 : 0;
  state.counters["chunk_tokens"] = static_cast<double>(op.chunk_tokens(n));
  state.SetItemsProcessed(state.iterations() * kv_heads * n);
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(code_bytes));
}

void BM_gpu_code_attention(benchmark::State& state)
{
  index_t const n = state.range(0);
  attn_point const& pt = points[state.range(1)];
  if (pt.kbits <= 8 && pt.vbits <= 8) {
    run_attention<std::uint8_t, std::uint8_t>(state, pt, n);
  } else {
    run_attention<std::uint16_t, std::uint16_t>(state, pt, n);
  }
}
BENCHMARK(BM_gpu_code_attention)
  ->ArgNames({"n", "config"})
  ->ArgsProduct({{32768, 131072}, {0, 1, 2, 3}})
  ->UseManualTime()
  ->Unit(benchmark::kMicrosecond);

template <class Code>
void run_reconstruct(benchmark::State& state, pqkv::rq_config const& cfg, bool shared, index_t n)
{
  index_t const cbh = shared ? 1 : kv_heads;
  auto const code_count = static_cast<std::size_t>(kv_heads * n * cfg.codes_per_row());
  auto const row_count = static_cast<std::size_t>(kv_heads * n * dim);
  pqkv::device_buffer<Code> codes(code_count);
  pqkv::device_buffer<float> cent(static_cast<std::size_t>(cbh * cfg.stages * cfg.ksub() * dim));
  pqkv::device_buffer<__nv_bfloat16> rows(row_count), copy(row_count);
  fill_codes<<<1024, 256>>>(codes.data(), codes.size(), 10, static_cast<std::uint64_t>(cfg.ksub()));
  PQKV_CUDA_CHECK_LAST();
  fill_uniform<<<1024, 256>>>(cent.data(), cent.size(), 11, 0.3f);
  PQKV_CUDA_CHECK_LAST();
  pqkv::bench::owned_stream const owned;
  cudaStream_t const stream = owned.get();
  pqkv::test::event_timer const timer{stream};
  auto call = [&] {
    pqkv::gpu::rq_reconstruct(cfg,
                              pqkv::rq_centroids_view<float const>{cent.data(), cbh, index_t{1}, index_t{cfg.stages},
                                                                   cfg.ksub(), dim},
                              pqkv::make_view(static_cast<Code const*>(codes.data()), kv_heads, n, cfg.codes_per_row()),
                              index_t{0}, pqkv::make_view(rows.data(), kv_heads, n, dim), stream);
  };
  std::vector<double> us = pqkv::bench::timed_loop(state, timer, call, 3);
  for (double& t : us) { t *= 1e3; }
  double const med = pqkv::test::median(us);
  // The anchor, same process and buffers: a plain device-to-device copy of the rows.
  std::vector<double> copy_us;
  for (int i = 0; i < 20; ++i) {
    copy_us.push_back(timer.ms([&] {
      PQKV_CUDA_TRY(cudaMemcpyAsync(copy.data(), rows.data(), rows.size_bytes(), cudaMemcpyDeviceToDevice, stream));
    }) * 1e3);
  }
  double const copy_med = pqkv::test::median(copy_us);
  double const bytes = static_cast<double>(code_count * sizeof(Code) + rows.size_bytes());
  state.counters["median_us"] = med;
  state.counters["gbps"] = bytes / (med * 1e-6) / 1e9;
  state.counters["copy_us"] = copy_med;
  state.counters["copy_gbps"] = 2.0 * static_cast<double>(rows.size_bytes()) / (copy_med * 1e-6) / 1e9;
  state.SetItemsProcessed(state.iterations() * kv_heads * n);
}

void BM_gpu_rq_reconstruct(benchmark::State& state)
{
  index_t const n = state.range(0);
  if (state.range(1) == 0) {
    run_reconstruct<std::uint8_t>(state, rq(8, 8), false, n);
  } else {
    run_reconstruct<std::uint16_t>(state, rq(56, 10), true, n);
  }
}
BENCHMARK(BM_gpu_rq_reconstruct)
  ->ArgNames({"n", "config"})
  ->ArgsProduct({{32768, 131072}, {0, 1}})
  ->UseManualTime()
  ->Unit(benchmark::kMicrosecond);

}  // namespace

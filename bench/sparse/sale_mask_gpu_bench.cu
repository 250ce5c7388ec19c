// SPDX-License-Identifier: Apache-2.0
// pqkv::gpu::sale_mask: the whole SALE mask of one prefill layer (centre +
// quantize Q and K, corrections, exact sink/local row statistics, INT8
// tensor-core estimate + keep rule, density) for one sequence, 32 q / 8 KV
// heads, d = 128, bf16, Bq = 64, Bk = 32, sink 32, local 128, tau 0.004 on
// every head. Args: n (tokens), grid (7: SALE's 4-bit, 127: 8-bit), group.
// Data: noise with a per-head offset (so centring matters) and an attention
// sink on the first 4 keys, so most estimated blocks fall below tau.
// Times are CUDA events around the stream call (manual time), after warm-up.
// Counters: median_ms; est_tops = 2 * d * (q head, query, key) pairs of the
// estimated (non-forced causal) blocks / time, i.e. the int8 rate the whole
// mask achieves on the estimate's work; density = mean kept / causal blocks;
// items = causal (q head, query, key) pairs. The torch anchors
// (bench/anchors/torch_sale_mask.py) time the same computation and dense SDPA.
#include <pqkv/core/device_buffer.cuh>
#include <pqkv/core/random.hpp>
#include <pqkv/sparse/sale_mask.cuh>

#include "common/gpu_timing.cuh"

#include <benchmark/benchmark.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <vector>

namespace {

using pqkv::index_t;
constexpr index_t q_heads = 32, kv_heads = 8, dim = 128;

/// x[h][t][c] = gain * (2u - 1) + offset[h][c] (+ the sink direction on keys t < 4).
__global__ void fill_rows(__nv_bfloat16* p, index_t heads, index_t n, std::uint64_t seed, float gain, float sink)
{
  std::size_t const total = static_cast<std::size_t>(heads * n * dim);
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < total;
       i += std::size_t{gridDim.x} * blockDim.x) {
    auto const c = static_cast<index_t>(i % dim), t = static_cast<index_t>((i / dim) % n), h = static_cast<index_t>(i / (dim * n));
    float v = gain * static_cast<float>(2.0 * pqkv::detail::random_unit(seed, 0, i) - 1.0);
    v += 0.5f * static_cast<float>(2.0 * pqkv::detail::random_unit(seed, 1, static_cast<std::uint64_t>(h * dim + c)) - 1.0);
    float const u = static_cast<float>(2.0 * pqkv::detail::random_unit(99, 2, static_cast<std::uint64_t>(c)) - 1.0);
    v += t < 4 ? sink * u : 0.3f * u;
    p[i] = __float2bfloat16_rn(v);
  }
}

void BM_gpu_sale_mask(benchmark::State& state)
{
  index_t const n = state.range(0);
  pqkv::quant_config const qcfg{state.range(1) == 7 ? pqkv::quant_grid::int4 : pqkv::quant_grid::int8,
                                state.range(2)};
  pqkv::sparse_config const cfg;  // 64 x 32, sink 32, local 128
  pqkv::gpu::sale_dims const dims{1, n, q_heads, kv_heads, dim, n};
  pqkv::gpu::sale_mask<__nv_bfloat16> const op{dims, cfg, qcfg};
  auto const m = op.shape();

  pqkv::device_buffer<__nv_bfloat16> q(static_cast<std::size_t>(q_heads * n * dim)),
    k(static_cast<std::size_t>(kv_heads * n * dim));
  fill_rows<<<2048, 256>>>(q.data(), q_heads, n, 1, 4.f, 1.5f);
  PQKV_CUDA_CHECK_LAST();
  fill_rows<<<2048, 256>>>(k.data(), kv_heads, n, 2, 1.f, 2.5f);
  PQKV_CUDA_CHECK_LAST();
  std::vector<std::int32_t> const cu{0, static_cast<std::int32_t>(n)};
  std::vector<float> const tau(static_cast<std::size_t>(q_heads), 0.004f);
  pqkv::device_buffer<std::int32_t> dcu(2);
  pqkv::device_buffer<float> dtau(static_cast<std::size_t>(q_heads));
  PQKV_CUDA_TRY(cudaMemcpy(dcu.data(), cu.data(), 8, cudaMemcpyHostToDevice));
  pqkv::device_buffer<std::uint32_t> bits(static_cast<std::size_t>(pqkv::bitmask_size(m)));
  pqkv::device_buffer<double> density(static_cast<std::size_t>(q_heads));
  pqkv::device_buffer<std::byte> workspace(op.workspace_bytes());

  pqkv::bench::owned_stream const owned;
  cudaStream_t const stream = owned.get();
  op.load_tau(tau, std::span<float>{dtau.data(), tau.size()}, stream);
  pqkv::test::event_timer const timer{stream};
  auto call = [&] {
    op(pqkv::kv_view<__nv_bfloat16 const>{pqkv::make_view(static_cast<__nv_bfloat16 const*>(q.data()), q_heads, n, dim)},
       pqkv::kv_view<__nv_bfloat16 const>{pqkv::make_view(static_cast<__nv_bfloat16 const*>(k.data()), kv_heads, n, dim)},
       std::span<std::int32_t const>{dcu.data(), 2}, std::span<float const>{dtau.data(), tau.size()},
       pqkv::make_view(bits.data(), m.batch, m.q_heads, m.q_blocks, m.words),
       std::span<double>{density.data(), static_cast<std::size_t>(q_heads)}, workspace.span(), stream);
  };
  std::vector<double> ms = pqkv::bench::timed_loop(state, timer, call, 2);
  double const med = pqkv::test::median(ms);
  state.counters["median_ms"] = med;

  std::vector<double> dens(static_cast<std::size_t>(q_heads));
  PQKV_CUDA_TRY(cudaMemcpy(dens.data(), density.data(), dens.size() * sizeof(double), cudaMemcpyDeviceToHost));
  state.counters["density"] = std::accumulate(dens.begin(), dens.end(), 0.0) / static_cast<double>(q_heads);
  // Pairs of the estimated blocks: rows of q block qb times keys of its non-forced blocks.
  double est_pairs = 0;
  for (index_t qb = 0; qb < m.q_blocks; ++qb) {
    index_t const rows = std::min(cfg.block_q, n - qb * cfg.block_q);
    for (index_t kb = 0; kb < pqkv::causal_blocks(cfg, n, qb); ++kb) {
      if (!pqkv::forced_block(cfg, n, qb, kb)) { est_pairs += static_cast<double>(rows * cfg.block_k); }
    }
  }
  state.counters["est_tops"] = 2.0 * static_cast<double>(dim * q_heads) * est_pairs / (med * 1e-3) / 1e12;
  state.SetItemsProcessed(state.iterations() * q_heads * n * (n + 1) / 2);
  state.SetBytesProcessed(state.iterations() * (q_heads + kv_heads) * n * dim * 2);
}

}  // namespace

BENCHMARK(BM_gpu_sale_mask)
  ->ArgNames({"n", "grid", "group"})
  ->Args({32768, 7, 1})
  ->Args({131072, 7, 1})
  ->Args({32768, 127, 16})
  ->UseManualTime()
  ->Unit(benchmark::kMillisecond);

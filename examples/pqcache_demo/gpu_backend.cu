// SPDX-License-Identifier: Apache-2.0
// The demo's GPU backend (backend.hpp): one layer's prefill and decode steps
// with pqkv::gpu::kmeans_trainer, pqkv::gpu::pq_encoder and pqkv::gpu::adc_topk.
#include "backend.hpp"
#include "common/cuda_util.cuh"

#include <pqkv/codebook/kmeans.cuh>
#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/device_buffer.cuh>
#include <pqkv/encode/encode.cuh>
#include <pqkv/score/adc_topk.cuh>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace pqcache_demo {

using pqkv::index_t;

gpu_probe probe_gpu()
{
  int count = 0;
  cudaError_t const st = cudaGetDeviceCount(&count);
  if (st != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error, so a CPU run is unaffected
    return {false, std::string("the CUDA runtime found no usable device (") + cudaGetErrorString(st) + ")"};
  }
  if (count == 0) { return {false, "the CUDA runtime reports no device"}; }
  int device = 0;
  cudaDeviceProp prop{};
  PQKV_CUDA_TRY(cudaGetDevice(&device));
  PQKV_CUDA_TRY(cudaGetDeviceProperties(&prop, device));
  return {true, std::string(prop.name) + " (device " + std::to_string(device) + ")"};
}

namespace {

/// Two events on a stream: the device time of what is enqueued between them.
using stage_timer = pqkv::test::event_timer;

struct owned_stream {
  cudaStream_t s{};
  owned_stream() { PQKV_CUDA_TRY(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)); }
  ~owned_stream() { cudaStreamDestroy(s); }
  owned_stream(owned_stream const&) = delete;
  owned_stream& operator=(owned_stream const&) = delete;
};

}  // namespace

struct gpu_backend::impl {
  pqkv::pq_config pq;
  index_t kv_heads, q_heads, capacity, prefill, k;
  owned_stream stream;
  stage_timer timer{stream.s};
  pqkv::gpu::kmeans_trainer trainer;
  pqkv::gpu::pq_encoder encoder;
  pqkv::gpu::adc_topk<pqkv::gqa::softmax_sum> select;
  pqkv::device_buffer<float> keys, centroids, queries;
  pqkv::device_buffer<std::uint8_t> codes;
  pqkv::device_buffer<std::byte> train_ws, select_ws;
  pqkv::device_buffer<std::int32_t> seq_len, out, valid;
  pqkv::device_buffer<index_t> position;

  impl(pqkv::pq_config const& cfg, index_t kv, index_t qh, index_t cap, index_t n0,
       pqkv::selection_params const& params)
    : pq{cfg}, kv_heads{kv}, q_heads{qh}, capacity{cap}, prefill{n0}, k{params.k},
      trainer{cfg, {.max_heads = kv, .max_tokens = n0}}, encoder{cfg},
      select{pqkv::adc_shape::from(cfg, qh, kv), params, {.max_batch = 1, .max_tokens = cap}},
      keys(static_cast<std::size_t>(kv * cap * cfg.dim)),
      centroids(static_cast<std::size_t>(kv * cfg.m * cfg.ksub() * cfg.dsub())),
      queries(static_cast<std::size_t>(qh * cfg.dim)), codes(static_cast<std::size_t>(kv * cap * cfg.m)),
      train_ws(trainer.workspace_bytes()), select_ws(select.workspace_bytes() > 0 ? select.workspace_bytes() : 1),
      seq_len(1), out(static_cast<std::size_t>(kv * (params.k > 0 ? params.k : 1))),
      valid(static_cast<std::size_t>(kv)), position(1)
  {
  }

  /// keys[:, first:first + count, :] on the device.
  [[nodiscard]] pqkv::strided_view<float const, 3> token_range(index_t first, index_t count) const
  {
    return pqkv::make_strided_view<float const, 3>(keys.data() + first * pq.dim, {kv_heads, count, pq.dim},
                                                   {capacity * pq.dim, pq.dim, 1});
  }
  [[nodiscard]] pqkv::centroids_view<float const> book() const
  {
    return pqkv::make_view(static_cast<float const*>(centroids.data()), kv_heads, pq.m, pq.ksub(), pq.dsub());
  }
  [[nodiscard]] pqkv::codes_view<std::uint8_t> code_view() const
  {
    return pqkv::make_view(codes.data(), kv_heads, capacity, pq.m);
  }
};

gpu_backend::gpu_backend(pqkv::pq_config const& pq, index_t kv_heads, index_t q_heads, index_t capacity,
                         index_t prefill, pqkv::selection_params const& params)
  : impl_{std::make_unique<impl>(pq, kv_heads, q_heads, capacity, prefill, params)}
{
}

gpu_backend::~gpu_backend() = default;

double gpu_backend::upload_keys(pqkv::kv_view<float const> keys)
{
  impl& s = *impl_;
  PQKV_EXPECTS(keys.extent(0) == s.kv_heads && keys.extent(1) == s.capacity && keys.extent(2) == s.pq.dim,
               "gpu_backend.upload_keys", "keys [", keys.extent(0), ", ", keys.extent(1), ", ", keys.extent(2),
               "], expected [", s.kv_heads, ", ", s.capacity, ", ", s.pq.dim, "]");
  PQKV_EXPECTS(keys.stride(2) == 1 && keys.stride(1) >= s.pq.dim, "gpu_backend.upload_keys", "keys strides (",
               keys.stride(1), ", ", keys.stride(2), ") are not rows of contiguous channels");
  // One 2D copy per head: a row of the copy is one token's dim floats.
  return s.timer.ms([&] {
    for (index_t h = 0; h < s.kv_heads; ++h) {
      PQKV_CUDA_TRY(cudaMemcpy2DAsync(s.keys.data() + h * s.capacity * s.pq.dim, s.pq.dim * sizeof(float),
                                      keys.data_handle() + h * keys.stride(0),
                                      static_cast<std::size_t>(keys.stride(1)) * sizeof(float),
                                      s.pq.dim * sizeof(float), static_cast<std::size_t>(s.capacity),
                                      cudaMemcpyHostToDevice, s.stream.s));
    }
  });
}

double gpu_backend::train(pqkv::kmeans_report& report)
{
  impl& s = *impl_;
  auto const cv = pqkv::make_view(s.centroids.data(), s.kv_heads, s.pq.m, s.pq.ksub(), s.pq.dsub());
  double const ms = s.timer.ms([&] { s.trainer.train(s.token_range(0, s.prefill), cv, s.train_ws.span(), s.stream.s); });
  report = s.trainer.report(s.train_ws.span(), s.stream.s);
  return ms;
}

double gpu_backend::encode_prefill()
{
  impl& s = *impl_;
  return s.timer.ms([&] { s.encoder.append(s.token_range(0, s.prefill), s.book(), s.code_view(), 0, s.stream.s); });
}

double gpu_backend::append(index_t position)
{
  impl& s = *impl_;
  PQKV_EXPECTS(position >= 0 && position < s.capacity, "gpu_backend.append", "position=", position,
               " outside [0, ", s.capacity, ")");
  PQKV_CUDA_TRY(cudaMemcpyAsync(s.position.data(), &position, sizeof(position), cudaMemcpyHostToDevice, s.stream.s));
  return s.timer.ms([&] {
    s.encoder.append(s.token_range(position, 1), s.book(), s.code_view(),
                     std::span<index_t const>{s.position.data(), 1}, s.stream.s);
  });
}

double gpu_backend::select(pqkv::query_view<float const> queries, index_t n, pqkv::selection_view<std::int32_t> out,
                           std::span<std::int32_t> valid_counts)
{
  impl& s = *impl_;
  constexpr char const* where = "gpu_backend.select";
  PQKV_EXPECTS(queries.extent(0) == s.q_heads && queries.extent(1) == s.pq.dim, where, "queries [",
               queries.extent(0), ", ", queries.extent(1), "], expected [", s.q_heads, ", ", s.pq.dim, "]");
  PQKV_EXPECTS(out.extent(0) == s.kv_heads && out.extent(1) >= s.k, where, "out [", out.extent(0), ", ",
               out.extent(1), "], expected [", s.kv_heads, ", >= ", s.k, "]");
  PQKV_EXPECTS(static_cast<index_t>(valid_counts.size()) == s.kv_heads, where, "valid_counts.size()=",
               valid_counts.size(), ", kv_heads=", s.kv_heads);
  PQKV_EXPECTS(n >= 0 && n <= s.capacity, where, "n=", n, " outside [0, ", s.capacity, "]");
  std::vector<float> q(static_cast<std::size_t>(s.q_heads * s.pq.dim));
  for (index_t i = 0; i < s.q_heads; ++i) {
    for (index_t j = 0; j < s.pq.dim; ++j) { q[static_cast<std::size_t>(i * s.pq.dim + j)] = queries(i, j); }
  }
  auto const len = static_cast<std::int32_t>(n);
  PQKV_CUDA_TRY(cudaMemcpyAsync(s.queries.data(), q.data(), q.size() * sizeof(float), cudaMemcpyHostToDevice,
                                s.stream.s));
  PQKV_CUDA_TRY(cudaMemcpyAsync(s.seq_len.data(), &len, sizeof(len), cudaMemcpyHostToDevice, s.stream.s));
  double const ms = s.timer.ms([&] {
    s.select(pqkv::make_view(static_cast<float const*>(s.queries.data()), 1, s.q_heads, s.pq.dim),
             pqkv::make_view(static_cast<std::uint8_t const*>(s.codes.data()), 1, s.kv_heads, s.capacity, s.pq.m),
             s.book(), std::span<std::int32_t const>{s.seq_len.data(), 1},
             pqkv::make_view(s.out.data(), 1, s.kv_heads, s.k), pqkv::make_view(s.valid.data(), 1, s.kv_heads),
             s.select_ws.span(), s.stream.s);
  });
  std::vector<std::int32_t> sel(static_cast<std::size_t>(s.kv_heads * s.k));
  PQKV_CUDA_TRY(cudaMemcpyAsync(sel.data(), s.out.data(), sel.size() * sizeof(std::int32_t), cudaMemcpyDeviceToHost,
                                s.stream.s));
  PQKV_CUDA_TRY(cudaMemcpyAsync(valid_counts.data(), s.valid.data(), valid_counts.size() * sizeof(std::int32_t),
                                cudaMemcpyDeviceToHost, s.stream.s));
  PQKV_CUDA_TRY(cudaStreamSynchronize(s.stream.s));
  for (index_t g = 0; g < s.kv_heads; ++g) {
    for (index_t i = 0; i < out.extent(1); ++i) {
      out(g, i) = i < s.k ? sel[static_cast<std::size_t>(g * s.k + i)] : -1;
    }
  }
  return ms;
}

void gpu_backend::download_centroids(pqkv::centroids_view<float> out) const
{
  impl const& s = *impl_;
  pqkv::check_centroids(out, s.pq, s.kv_heads, "gpu_backend.download_centroids");
  PQKV_CUDA_TRY(cudaMemcpyAsync(out.data_handle(), s.centroids.data(), s.centroids.size_bytes(),
                                cudaMemcpyDeviceToHost, s.stream.s));
  PQKV_CUDA_TRY(cudaStreamSynchronize(s.stream.s));
}

void gpu_backend::download_codes(index_t first, index_t count, pqkv::codes_view<std::uint8_t> out) const
{
  impl const& s = *impl_;
  constexpr char const* where = "gpu_backend.download_codes";
  PQKV_EXPECTS(out.extent(0) == s.kv_heads && out.extent(1) == s.capacity && out.extent(2) == s.pq.m, where,
               "out [", out.extent(0), ", ", out.extent(1), ", ", out.extent(2), "], expected [", s.kv_heads, ", ",
               s.capacity, ", ", s.pq.m, "]");
  PQKV_EXPECTS(first >= 0 && count >= 0 && first + count <= s.capacity, where, "rows [", first, ", ", first + count,
               ") outside [0, ", s.capacity, ")");
  if (count == 0) { return; }
  auto const row = static_cast<std::size_t>(s.capacity * s.pq.m);
  PQKV_CUDA_TRY(cudaMemcpy2DAsync(out.data_handle() + first * s.pq.m, row, s.codes.data() + first * s.pq.m, row,
                                  static_cast<std::size_t>(count * s.pq.m), static_cast<std::size_t>(s.kv_heads),
                                  cudaMemcpyDeviceToHost, s.stream.s));
  PQKV_CUDA_TRY(cudaStreamSynchronize(s.stream.s));
}

std::size_t gpu_backend::device_bytes() const noexcept
{
  impl const& s = *impl_;
  return s.keys.size_bytes() + s.centroids.size_bytes() + s.queries.size_bytes() + s.codes.size_bytes() +
         s.train_ws.size_bytes() + s.select_ws.size_bytes() + s.seq_len.size_bytes() + s.out.size_bytes() +
         s.valid.size_bytes() + s.position.size_bytes();
}

}  // namespace pqcache_demo

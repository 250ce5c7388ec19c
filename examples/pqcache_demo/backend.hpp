// SPDX-License-Identifier: Apache-2.0
#pragma once
// The demo's GPU backend behind a plain C++ interface: main.cpp is compiled by
// the host compiler alone and reaches the CUDA components (gpu::kmeans_trainer,
// gpu::pq_encoder, gpu::adc_topk) only through this class, defined in
// gpu_backend.cu, which is built only when the project is configured with
// CUDA (PQKV_DEMO_HAS_CUDA is then defined for main.cpp).
#include <pqkv/pqkv.hpp>

#include <cstdint>
#include <memory>
#include <span>
#include <string>

namespace pqcache_demo {

/// Whether a CUDA device is present, and its name or why not.
struct gpu_probe {
  bool usable = false;
  std::string detail;
};

/// Asks the CUDA runtime for a device (cudaGetDeviceCount > 0).
gpu_probe probe_gpu();

/// One layer on the GPU: keys, codebook and codes live in device memory.
/// Every stage call returns its device time in ms (CUDA events; it
/// synchronizes, as a demo that prints timings must).
class gpu_backend {
 public:
  /// Allocates device memory for keys [kv_heads, capacity, dim] and codes
  /// [kv_heads, capacity, m]; builds the trainer (for `prefill` training
  /// tokens), the encoder and the scorer on the current device.
  gpu_backend(pqkv::pq_config const& pq, pqkv::index_t kv_heads, pqkv::index_t q_heads, pqkv::index_t capacity,
              pqkv::index_t prefill, pqkv::selection_params const& params);
  ~gpu_backend();
  gpu_backend(gpu_backend const&) = delete;
  gpu_backend& operator=(gpu_backend const&) = delete;

  /// Copies keys [kv_heads, capacity, dim] (any strides) to the device.
  double upload_keys(pqkv::kv_view<float const> keys);
  /// Trains the codebook on tokens [0, prefill) with gpu::kmeans_trainer.
  double train(pqkv::kmeans_report& report);
  /// Encodes tokens [0, prefill) into the codes with gpu::pq_encoder.
  double encode_prefill();
  /// Encodes token `position` into the codes (the decode-step append path,
  /// the position read from device memory).
  double append(pqkv::index_t position);
  /// gpu::adc_topk over the first n tokens for queries [q_heads, dim]
  /// (uploaded first, not timed); the selection [kv_heads, >= k] and the
  /// valid counts [kv_heads] are copied back.
  double select(pqkv::query_view<float const> queries, pqkv::index_t n, pqkv::selection_view<std::int32_t> out,
                std::span<std::int32_t> valid_counts);

  /// The trained centroids [kv_heads, m, ksub, dsub].
  void download_centroids(pqkv::centroids_view<float> out) const;
  /// Code rows [first, first + count) of every head into out [kv_heads, capacity, m].
  void download_codes(pqkv::index_t first, pqkv::index_t count, pqkv::codes_view<std::uint8_t> out) const;
  /// Bytes of device memory held (buffers and workspaces).
  [[nodiscard]] std::size_t device_bytes() const noexcept;

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

}  // namespace pqcache_demo

// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file The PQ codebook layout: centroids [heads, m, ksub, dsub] in float,
/// one k-means codebook per (KV head, subspace), plus an owning host holder.

#include <pqkv/core/config.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/host_tensor.hpp>
#include <pqkv/core/views.hpp>

namespace pqkv {

/// Throws unless `centroids` is [heads, cfg.m, cfg.ksub(), cfg.dsub()].
template <class T>
void check_centroids(centroids_view<T> centroids, pq_config const& cfg, index_t heads, char const* where)
{
  PQKV_EXPECTS(centroids.extent(0) == heads, where, "centroids.extent(0)=", centroids.extent(0),
               ", heads=", heads);
  PQKV_EXPECTS(centroids.extent(1) == cfg.m, where, "centroids.extent(1)=", centroids.extent(1),
               ", config.m=", cfg.m);
  PQKV_EXPECTS(centroids.extent(2) == cfg.ksub(), where, "centroids.extent(2)=", centroids.extent(2),
               ", config.ksub()=", cfg.ksub());
  PQKV_EXPECTS(centroids.extent(3) == cfg.dsub(), where, "centroids.extent(3)=", centroids.extent(3),
               ", config.dsub()=", cfg.dsub());
  PQKV_EXPECTS(centroids.data_handle() != nullptr || element_count(centroids) == 0, where,
               "centroids.data_handle() is null");
}

/// Owning host codebook: the config it was built for and its centroids.
class codebook {
 public:
  codebook() = default;
  codebook(pq_config const& cfg, index_t heads) : config_{cfg}, centroids_{heads, cfg.m, cfg.ksub(), cfg.dsub()}
  {
    cfg.validate("codebook");
    PQKV_EXPECTS(heads > 0, "codebook", "heads=", heads, " must be positive");
  }

  [[nodiscard]] pq_config const& config() const noexcept { return config_; }
  [[nodiscard]] index_t heads() const noexcept { return centroids_.extent(0); }
  /// [heads, m, ksub, dsub]
  [[nodiscard]] centroids_view<float> centroids() noexcept { return centroids_.view(); }
  /// [heads, m, ksub, dsub]
  [[nodiscard]] centroids_view<float const> centroids() const noexcept { return centroids_.const_view(); }
  /// Bytes of the codes of one token and head.
  [[nodiscard]] index_t code_bytes_per_token() const noexcept { return config_.m; }

 private:
  pq_config config_{};
  host_tensor<float, 4> centroids_;
};

}  // namespace pqkv

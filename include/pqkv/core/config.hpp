// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pq_config`: the shape and training settings of a product quantizer.

#include <pqkv/core/error.hpp>
#include <pqkv/core/views.hpp>

#include <cmath>
#include <cstdint>

namespace pqkv {

/// How k-means picks its first centroids.
enum class init_method : std::uint8_t {
  kmeans_plus_plus,  ///< D^2 sampling (Arthur & Vassilvitskii), deterministic for a seed
  random_sample,     ///< ksub distinct training rows drawn for the seed (PQCache, faiss)
  provided,          ///< the caller's centroids, as passed in the output view
};

/// A product quantizer: `dim` is cut into `m` sub-vectors of `dsub = dim / m`
/// channels, each coded by one of `ksub = 2^nbits` centroids, trained per
/// (KV head, subspace) by k-means. Words follow faiss's ProductQuantizer.
struct pq_config {
  index_t dim = 128;          ///< head dimension
  index_t m = 8;              ///< subspaces; must divide dim
  int nbits = 8;              ///< bits per code, 1..8 (codes are uint8)
  int max_iter = 25;          ///< Lloyd iterations at most
  double tol = 1e-4;          ///< stop once the relative objective decrease is below tol; 0: never
  std::uint64_t seed = 4321;  ///< drives init and subsampling (PQCache's seed)
  init_method init = init_method::kmeans_plus_plus;
  index_t max_train_points = 0;  ///< train on a seeded subsample of this many tokens; 0: all

  [[nodiscard]] constexpr index_t dsub() const noexcept { return m > 0 ? dim / m : 0; }
  [[nodiscard]] constexpr index_t ksub() const noexcept { return index_t{1} << nbits; }

  /// Throws `pqkv::error` naming the first field that is out of range.
  void validate(char const* where = "pq_config") const
  {
    PQKV_EXPECTS(dim > 0, where, "dim=", dim, " must be positive");
    PQKV_EXPECTS(m > 0, where, "m=", m, " must be positive");
    PQKV_EXPECTS(dim % m == 0, where, "m=", m, " does not divide dim=", dim);
    PQKV_EXPECTS(nbits >= 1 && nbits <= 8, where, "nbits=", nbits, " is outside 1..8 (codes are uint8)");
    PQKV_EXPECTS(max_iter >= 0, where, "max_iter=", max_iter, " must be >= 0");
    PQKV_EXPECTS(std::isfinite(tol) && tol >= 0, where, "tol=", tol, " must be finite and >= 0");
    PQKV_EXPECTS(max_train_points >= 0, where, "max_train_points=", max_train_points, " must be >= 0");
  }
};

}  // namespace pqkv

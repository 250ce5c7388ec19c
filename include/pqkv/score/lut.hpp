// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file The ADC look-up table: the inner product of every query sub-vector
/// with every centroid of its KV head's codebook.
///
/// Contract: q head h reads the codebook of KV head h / (q_heads / kv_heads),
/// and
///   lut[h][j][c] = fma chain over i = 0 .. dsub-1, starting from 0.f, of
///                  q[h][j*dsub + i] * centroids[kv_head(h)][j][c][i]
/// i.e. `acc = 0.f; for i: acc = fmaf(q_i, c_i, acc);` in float, in index
/// order. A GPU kernel that evaluates the same chain (`__fmaf_rn`) gets the
/// same bits; a tree reduction over i does not.

#include <pqkv/codebook/codebook.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/macros.hpp>
#include <pqkv/core/parallel.hpp>
#include <pqkv/core/views.hpp>

#include <cmath>
#include <cstdint>

namespace pqkv {

/// One LUT entry, evaluated as the file's contract says.
PQKV_HD float lut_entry(float const* q_sub, float const* centroid, index_t dsub)
{
  float acc = 0.f;
  for (index_t i = 0; i < dsub; ++i) { acc = fmaf(q_sub[i], centroid[i], acc); }
  return acc;
}

namespace detail {

/// Largest dsub the CPU LUT builders handle (a stack buffer per sub-vector).
inline constexpr index_t max_lut_dsub = 256;

/// Throws unless `q` is [q_heads, dim], non-null and finite.
inline void check_queries(query_view<float const> q, index_t q_heads, index_t dim, char const* where)
{
  PQKV_EXPECTS(q.extent(0) == q_heads, where, "q.extent(0)=", q.extent(0), ", q_heads=", q_heads);
  PQKV_EXPECTS(q.extent(1) == dim, where, "q.extent(1)=", q.extent(1), ", dim=", dim);
  PQKV_EXPECTS(q.data_handle() != nullptr || element_count(q) == 0, where, "q.data_handle() is null");
  for (index_t h = 0; h < q_heads; ++h) {
    for (index_t d = 0; d < dim; ++d) {
      PQKV_EXPECTS(std::isfinite(q(h, d)), where, "q(", h, ", ", d, ")=", q(h, d), " is not finite");
    }
  }
}

/// Throws unless every centroid coordinate is finite.
inline void check_centroids_finite(centroids_view<float const> centroids, char const* where)
{
  float const* p = centroids.data_handle();
  index_t const count = element_count(centroids);
  for (index_t i = 0; i < count; ++i) {
    if (!std::isfinite(p[i])) [[unlikely]] {
      index_t const dsub = centroids.extent(3), ksub = centroids.extent(2), m = centroids.extent(1);
      index_t const d = i % dsub, c = i / dsub % ksub, j = i / dsub / ksub % m, h = i / dsub / ksub / m;
      PQKV_EXPECTS(false, where, "centroids(", h, ", ", j, ", ", c, ", ", d, ")=", p[i], " is not finite");
    }
  }
}

/// The LUT of the r q heads of GQA group g (q heads g*r .. g*r + r-1),
/// interleaved as out[(j * ksub + c) * r + h_local] so one code reads the
/// whole group's entries at once. Values are exactly `lut_entry`'s.
inline void build_group_lut(query_view<float const> q, centroids_view<float const> centroids, index_t g,
                            index_t r, float* out)
{
  index_t const m = centroids.extent(1), ksub = centroids.extent(2), dsub = centroids.extent(3);
  float q_sub[max_lut_dsub];  // copied so the entry reads contiguous floats whatever q's strides
  for (index_t hl = 0; hl < r; ++hl) {
    index_t const h = g * r + hl;
    for (index_t j = 0; j < m; ++j) {
      for (index_t i = 0; i < dsub; ++i) { q_sub[i] = q(h, j * dsub + i); }
      float const* c0 = &centroids(g, j, 0, 0);
      for (index_t c = 0; c < ksub; ++c) { out[(j * ksub + c) * r + hl] = lut_entry(q_sub, c0 + c * dsub, dsub); }
    }
  }
}
}  // namespace detail

namespace cpu {

/// Builds lut [q_heads, m, ksub] from queries [q_heads, dim] and centroids
/// [kv_heads, m, ksub, dsub], as the file's contract says. q_heads must be a
/// multiple of kv_heads. Throws `pqkv::error` on a shape mismatch, a null
/// view, or a query or centroid that is not finite.
inline void build_lut(query_view<float const> q,                 // [q_heads, dim]
                      centroids_view<float const> centroids,     // [kv_heads, m, ksub, dsub]
                      view<float, 3> lut)                        // [q_heads, m, ksub]
{
  constexpr char const* where = "build_lut";
  index_t const kv_heads = centroids.extent(0), m = centroids.extent(1), ksub = centroids.extent(2),
                dsub = centroids.extent(3), q_heads = q.extent(0);
  PQKV_EXPECTS(kv_heads > 0, where, "centroids.extent(0)=", kv_heads, " must be positive");
  PQKV_EXPECTS(m > 0 && ksub > 0 && dsub > 0, where, "centroids extents (", kv_heads, ", ", m, ", ", ksub, ", ",
               dsub, ") must be positive");
  PQKV_EXPECTS(dsub <= pqkv::detail::max_lut_dsub, where, "centroids.extent(3)=", dsub, " exceeds ",
               pqkv::detail::max_lut_dsub);
  PQKV_EXPECTS(centroids.data_handle() != nullptr, where, "centroids.data_handle() is null");
  PQKV_EXPECTS(q_heads > 0 && q_heads % kv_heads == 0, where, "q.extent(0)=", q_heads,
               " is not a positive multiple of kv_heads=", kv_heads);
  pqkv::detail::check_queries(q, q_heads, m * dsub, where);
  PQKV_EXPECTS(lut.extent(0) == q_heads && lut.extent(1) == m && lut.extent(2) == ksub, where, "lut extents (",
               lut.extent(0), ", ", lut.extent(1), ", ", lut.extent(2), ") differ from (q_heads, m, ksub)=(",
               q_heads, ", ", m, ", ", ksub, ")");
  PQKV_EXPECTS(lut.data_handle() != nullptr, where, "lut.data_handle() is null");
  pqkv::detail::check_centroids_finite(centroids, where);

  index_t const r = q_heads / kv_heads;
  parallel_for(q_heads, [&](index_t h) {
    float q_sub[pqkv::detail::max_lut_dsub];
    for (index_t j = 0; j < m; ++j) {
      for (index_t i = 0; i < dsub; ++i) { q_sub[i] = q(h, j * dsub + i); }
      for (index_t c = 0; c < ksub; ++c) { lut(h, j, c) = lut_entry(q_sub, &centroids(h / r, j, c, 0), dsub); }
    }
  });
}

}  // namespace cpu
}  // namespace pqkv

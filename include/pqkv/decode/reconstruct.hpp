// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::cpu::reconstruct`: PQ codes back to approximate keys, each
/// sub-vector replaced by its centroid (then rounded to the output type).

#include <pqkv/core/dtype.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/parallel.hpp>
#include <pqkv/core/views.hpp>

#include <cstdint>
#include <type_traits>

namespace pqkv::cpu {

/// out(h, t, j*dsub + i) = from_float<Key>(centroids(h, j, codes(h, t, j), i)).
/// Shapes come from the views: m, ksub, dsub = centroids.extent(1, 2, 3).
/// Throws `pqkv::error` on a shape mismatch, a null view or a code >= ksub;
/// nothing is written then.
template <class Key, class Layout, class Accessor>
  requires(KvElement<Key> && !std::is_const_v<Key>)
void reconstruct(codes_view<std::uint8_t const> codes,                        // [heads, tokens, m]
                 centroids_view<float const> centroids,                       // [heads, m, ksub, dsub]
                 ::cuda::std::mdspan<Key, extents<3>, Layout, Accessor> out)  // [heads, tokens, m * dsub]
{
  constexpr char const* where = "reconstruct";
  index_t const heads = codes.extent(0), tokens = codes.extent(1), m = codes.extent(2);
  index_t const ksub = centroids.extent(2), dsub = centroids.extent(3);
  PQKV_EXPECTS(centroids.extent(0) == heads, where, "centroids.extent(0)=", centroids.extent(0),
               ", codes.extent(0)=", heads);
  PQKV_EXPECTS(centroids.extent(1) == m, where, "centroids.extent(1)=", centroids.extent(1), ", codes.extent(2)=", m);
  PQKV_EXPECTS(out.extent(0) == heads && out.extent(1) == tokens, where, "out extents (", out.extent(0), ", ",
               out.extent(1), ") differ from codes' (", heads, ", ", tokens, ")");
  PQKV_EXPECTS(out.extent(2) == m * dsub, where, "out.extent(2)=", out.extent(2), ", m * dsub=", m * dsub);
  PQKV_EXPECTS(codes.data_handle() != nullptr || element_count(codes) == 0, where, "codes.data_handle() is null");
  PQKV_EXPECTS(centroids.data_handle() != nullptr || element_count(centroids) == 0, where,
               "centroids.data_handle() is null");
  PQKV_EXPECTS(out.data_handle() != nullptr || element_count(out) == 0, where, "out.data_handle() is null");
  for (index_t h = 0; h < heads; ++h) {
    for (index_t t = 0; t < tokens; ++t) {
      for (index_t j = 0; j < m; ++j) {
        PQKV_EXPECTS(codes(h, t, j) < ksub, where, "codes(", h, ", ", t, ", ", j, ")=", int{codes(h, t, j)},
                     " >= ksub=", ksub);
      }
    }
  }
  parallel_for(heads, [&](index_t h) {
    for (index_t t = 0; t < tokens; ++t) {
      for (index_t j = 0; j < m; ++j) {
        index_t const c = codes(h, t, j);
        for (index_t i = 0; i < dsub; ++i) { out(h, t, j * dsub + i) = from_float<Key>(centroids(h, j, c, i)); }
      }
    }
  });
}

}  // namespace pqkv::cpu

// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::cpu::pq_encoder`: nearest-centroid assignment of keys to PQ
/// codes, for a whole prefill (`encode`) or a decode step's new tokens (`append`).
///
/// Contract (what the GPU encoder must reproduce bit for bit):
/// - Sub-vector j of key (h, t) is x_i = float(keys(h, t, j*dsub + i)), i < dsub
///   (the element converted to float exactly).
/// - Its distance to centroid c of (h, j) is evaluated in float as
///   `d = 0.f; for i = 0 .. dsub-1: { diff = x_i - centroids(h, j, c, i); d = fmaf(diff, diff, d); }`
///   (the subtraction rounded, then one fused multiply-add per channel, in
///   channel order; no expansion into |x|^2 - 2 x.c + |c|^2).
/// - codes(h, t, j) = the c in [0, ksub) with the smallest d; ties go to the
///   lower c (a strict `<` scan from c = 0).
/// - Keys and centroids must be finite (checked); a distance that overflows
///   to +inf then still ties to the lowest such c.
/// Determinism: results do not depend on the thread count or the token chunking.

#include <pqkv/codebook/codebook.hpp>
#include <pqkv/core/concepts.hpp>
#include <pqkv/core/config.hpp>
#include <pqkv/core/dtype.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/parallel.hpp>
#include <pqkv/core/views.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace pqkv {
namespace detail {

/// Tokens per parallel work item of the encoder: a few hundred sub-vector
/// searches, so chunks stay balanced without per-token scheduling.
inline constexpr index_t encode_chunk_tokens = 64;

/// Largest dsub the CPU encoder handles (a stack buffer per sub-vector).
inline constexpr index_t encode_max_dsub = 256;

/// The contract's distance of x[0, dsub) to centroid c[0, dsub).
inline float encode_distance(float const* x, float const* c, index_t dsub)
{
  float d = 0.f;
  for (index_t i = 0; i < dsub; ++i) {
    float const diff = x[i] - c[i];
    d = std::fma(diff, diff, d);
  }
  return d;
}

/// Encodes tokens [t0, t1) of head h one centroid at a time in the centroids'
/// own layout: for a few tokens (a decode step), where transposing costs more.
template <class Key>
void encode_rows_direct(kv_view<Key const> keys, centroids_view<float const> centroids,
                        codes_view<std::uint8_t> codes, index_t h, index_t t0, index_t t1, index_t position)
{
  index_t const m = centroids.extent(1), ksub = centroids.extent(2), dsub = centroids.extent(3);
  float x[encode_max_dsub];
  for (index_t t = t0; t < t1; ++t) {
    for (index_t j = 0; j < m; ++j) {
      for (index_t i = 0; i < dsub; ++i) { x[i] = to_float(keys(h, t, j * dsub + i)); }
      float const* c0 = &centroids(h, j, 0, 0);
      float best = encode_distance(x, c0, dsub);
      index_t best_c = 0;
      for (index_t c = 1; c < ksub; ++c) {
        float const d = encode_distance(x, c0 + c * dsub, dsub);
        if (d < best) {
          best = d;
          best_c = c;
        }
      }
      codes(h, position + t, j) = static_cast<std::uint8_t>(best_c);
    }
  }
}

/// Encodes tokens [t0, t1) of head h from centroids transposed per subspace
/// (ct_head[(j * dsub + i) * ksub + c]), 4 tokens x 16 centroids at a time in
/// registers; each distance is still the contract's chain in channel order.
/// The argmin is the lowest index of the smallest distance, as the contract's
/// strict `<` scan gives. Needs 16 <= ksub <= 256, ksub % 16 == 0.
template <class Key>
void encode_rows_blocked(kv_view<Key const> keys, float const* ct_head, codes_view<std::uint8_t> codes, index_t h,
                         index_t t0, index_t t1, index_t position, index_t m, index_t ksub, index_t dsub)
{
  constexpr index_t tile = 4, block = 16;  // the kernel below is written for tile == 4
  float x[tile][encode_max_dsub];
  alignas(32) float dist[tile][256];
  for (index_t t = t0; t < t1; t += tile) {
    index_t const cnt = std::min(tile, t1 - t);
    for (index_t j = 0; j < m; ++j) {
      for (index_t tt = 0; tt < tile; ++tt) {
        for (index_t i = 0; i < dsub; ++i) { x[tt][i] = tt < cnt ? to_float(keys(h, t + tt, j * dsub + i)) : 0.f; }
      }
      float const* ct = ct_head + j * dsub * ksub;
      float const* x0 = x[0];
      float const* x1 = x[1];
      float const* x2 = x[2];
      float const* x3 = x[3];
      for (index_t c0 = 0; c0 < ksub; c0 += block) {
        // One named accumulator row per token keeps all four in registers.
        float a0[block] = {}, a1[block] = {}, a2[block] = {}, a3[block] = {};
        for (index_t i = 0; i < dsub; ++i) {
          float const* row = ct + i * ksub + c0;
          float const v0 = x0[i], v1 = x1[i], v2 = x2[i], v3 = x3[i];
          for (index_t cc = 0; cc < block; ++cc) {
            float const r = row[cc];
            float const d0 = v0 - r, d1 = v1 - r, d2 = v2 - r, d3 = v3 - r;
            a0[cc] = std::fma(d0, d0, a0[cc]);
            a1[cc] = std::fma(d1, d1, a1[cc]);
            a2[cc] = std::fma(d2, d2, a2[cc]);
            a3[cc] = std::fma(d3, d3, a3[cc]);
          }
        }
        for (index_t cc = 0; cc < block; ++cc) {
          dist[0][c0 + cc] = a0[cc];
          dist[1][c0 + cc] = a1[cc];
          dist[2][c0 + cc] = a2[cc];
          dist[3][c0 + cc] = a3[cc];
        }
      }
      for (index_t tt = 0; tt < cnt; ++tt) {
        // Distances are >= +0 and never NaN, so their bit patterns order as
        // int32: two integer min-reductions (which vectorize) find the first
        // strict minimum.
        std::int32_t mn = std::numeric_limits<std::int32_t>::max();
        for (index_t c = 0; c < ksub; ++c) { mn = std::min(mn, std::bit_cast<std::int32_t>(dist[tt][c])); }
        auto const none = static_cast<std::int32_t>(ksub);
        std::int32_t c = none;
        for (index_t c2 = 0; c2 < ksub; ++c2) {
          c = std::min(c, std::bit_cast<std::int32_t>(dist[tt][c2]) == mn ? static_cast<std::int32_t>(c2) : none);
        }
        codes(h, position + t + tt, j) = static_cast<std::uint8_t>(c);
      }
    }
  }
}

}  // namespace detail

namespace cpu {

/// CPU PQ encoder for one `pq_config`; models `pqkv::Encoder`. Stateless past
/// its config, so calls are thread-safe; each call is multi-threaded over
/// heads x token chunks.
class pq_encoder {
 public:
  /// Validates `config`; throws `pqkv::error` naming a bad field.
  explicit pq_encoder(pq_config const& config) : config_{config}
  {
    config_.validate("pq_encoder");
    PQKV_EXPECTS(config_.dsub() <= pqkv::detail::encode_max_dsub, "pq_encoder", "dim / m=", config_.dsub(), " exceeds ",
                 pqkv::detail::encode_max_dsub);
  }

  [[nodiscard]] pq_config const& config() const noexcept { return config_; }

  /// codes [heads, tokens, m] for keys [heads, tokens, dim] (float, half or
  /// bf16; any strides). The codes may hold more rows than the keys (a
  /// buffer sized for the whole context): the first `tokens` rows of each
  /// head are written, the others left as they are. Throws `pqkv::error` on a shape mismatch, a null view,
  /// or a key or centroid that is not finite; nothing is written then.
  template <class Key, class Layout, class Accessor>
    requires KvElement<std::remove_const_t<Key>>
  void encode(::cuda::std::mdspan<Key, extents<3>, Layout, Accessor> keys,  // [heads, tokens, dim]
              centroids_view<float const> centroids,                        // [heads, m, ksub, dsub]
              codes_view<std::uint8_t> codes) const                         // [heads, tokens, m]
  {
    kv_view<std::remove_const_t<Key> const> const k{keys};
    PQKV_EXPECTS(codes.extent(1) >= k.extent(1), "pq_encoder.encode", "codes.extent(1)=", codes.extent(1),
                 " < keys.extent(1)=", k.extent(1));
    run(k, centroids, codes, 0, "pq_encoder.encode");
  }

  /// Encodes a decode step's keys_new [heads, t, dim] into codes rows
  /// [position, position + t) of codes [heads, capacity, m]; the other rows are
  /// left as they are. Same contract as `encode`, so appending token by token
  /// gives the codes of one `encode` over all of them.
  template <class Key, class Layout, class Accessor>
    requires KvElement<std::remove_const_t<Key>>
  void append(::cuda::std::mdspan<Key, extents<3>, Layout, Accessor> keys_new,  // [heads, t, dim]
              centroids_view<float const> centroids,                            // [heads, m, ksub, dsub]
              codes_view<std::uint8_t> codes,                                   // [heads, capacity, m]
              index_t position) const
  {
    kv_view<std::remove_const_t<Key> const> const k{keys_new};
    PQKV_EXPECTS(position >= 0, "pq_encoder.append", "position=", position, " must be >= 0");
    PQKV_EXPECTS(position <= codes.extent(1) - k.extent(1), "pq_encoder.append", "position=", position,
                 " + keys_new.extent(1)=", k.extent(1), " exceeds codes.extent(1)=", codes.extent(1));
    run(k, centroids, codes, position, "pq_encoder.append");
  }

 private:
  template <class Key>
  void run(kv_view<Key const> keys, centroids_view<float const> centroids, codes_view<std::uint8_t> codes,
           index_t position, char const* where) const
  {
    index_t const heads = keys.extent(0), tokens = keys.extent(1), m = config_.m, ksub = config_.ksub(),
                  dsub = config_.dsub();
    PQKV_EXPECTS(keys.extent(2) == config_.dim, where, "keys.extent(2)=", keys.extent(2), ", config.dim=",
                 config_.dim);
    PQKV_EXPECTS(codes.extent(0) == heads, where, "codes.extent(0)=", codes.extent(0), ", keys.extent(0)=", heads);
    PQKV_EXPECTS(codes.extent(2) == m, where, "codes.extent(2)=", codes.extent(2), ", config.m=", m);
    check_centroids(centroids, config_, heads, where);
    PQKV_EXPECTS(keys.data_handle() != nullptr || element_count(keys) == 0, where, "keys.data_handle() is null");
    PQKV_EXPECTS(codes.data_handle() != nullptr || element_count(codes) == 0, where, "codes.data_handle() is null");
    check_finite(centroids, keys, where);
    if (heads == 0 || tokens == 0) { return; }

    index_t const chunks = chunk_count(tokens, pqkv::detail::encode_chunk_tokens);
    auto chunk_range = [&](index_t w) {
      index_t const t0 = (w % chunks) * pqkv::detail::encode_chunk_tokens;
      return std::pair{t0, std::min(tokens, t0 + pqkv::detail::encode_chunk_tokens)};
    };
    // Transposing the centroids costs about as much as encoding ksub tokens,
    // so a decode step's few tokens read them as they are.
    if (tokens < 64 || ksub % 16 != 0) {
      parallel_for(heads * chunks, [&](index_t w) {
        auto const [t0, t1] = chunk_range(w);
        pqkv::detail::encode_rows_direct(keys, centroids, codes, w / chunks, t0, t1, position);
      });
      return;
    }
    std::vector<float> ct(static_cast<std::size_t>(heads * m * dsub * ksub));  // [heads, m, dsub, ksub]
    parallel_for(heads, [&](index_t h) {
      for (index_t j = 0; j < m; ++j) {
        float* dst = ct.data() + (h * m + j) * dsub * ksub;
        for (index_t c = 0; c < ksub; ++c) {
          for (index_t i = 0; i < dsub; ++i) { dst[i * ksub + c] = centroids(h, j, c, i); }
        }
      }
    });
    parallel_for(heads * chunks, [&](index_t w) {
      auto const [t0, t1] = chunk_range(w);
      index_t const h = w / chunks;
      pqkv::detail::encode_rows_blocked(keys, ct.data() + h * m * dsub * ksub, codes, h, t0, t1, position, m, ksub,
                                        dsub);
    });
  }

  template <class Key>
  static void check_finite(centroids_view<float const> centroids, kv_view<Key const> keys, char const* where)
  {
    float const* p = centroids.data_handle();
    for (index_t i = 0; i < element_count(centroids); ++i) {
      PQKV_EXPECTS(std::isfinite(p[i]), where, "centroids element ", i, " (row-major)=", p[i], " is not finite");
    }
    parallel_for(keys.extent(0), [&](index_t h) {
      for (index_t t = 0; t < keys.extent(1); ++t) {
        for (index_t d = 0; d < keys.extent(2); ++d) {
          float const x = to_float(keys(h, t, d));
          PQKV_EXPECTS(std::isfinite(x), where, "keys(", h, ", ", t, ", ", d, ")=", x, " is not finite");
        }
      }
    });
  }

  pq_config config_;
};

static_assert(Encoder<pq_encoder, float>);
#if defined(PQKV_HAS_HALF)
static_assert(Encoder<pq_encoder, __half>);
#endif
#if defined(PQKV_HAS_BF16)
static_assert(Encoder<pq_encoder, __nv_bfloat16>);
#endif

}  // namespace cpu
}  // namespace pqkv

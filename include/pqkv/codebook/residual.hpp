// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Residual (multi-stage) vector quantization of K or V rows: `rq_config`,
/// the centroid layout [heads, splits, stages, 2^bits, dsub], the owning
/// `residual_codebook`, `cpu::rq_trainer` (stage by stage k-means on the
/// residuals) and the import of given codebooks, plain or projected.
///
/// Layout. A row x [dim] is first permuted, xp[i] = x[perm[i]] (perm: the
/// caller's channel permutation, identity when empty), then cut into `splits`
/// contiguous sub-vectors of dsub = dim / splits channels. Each split s is
/// coded by its own residual quantizer of `stages` codebooks of ksub = 2^bits
/// codewords: centroids(h, s, st, c, :) is codeword c of stage st of split s.
/// The approximation of split s is the sum over stages of the chosen
/// codewords. heads == 1 means one codebook shared by every KV head of a layer.
/// Codes of a row are stored at position n = s * stages + st (split-major), so
/// the row-major [heads, splits, stages, ksub, dsub] centroids are also the
/// 4-D view [heads, splits * stages, ksub, dsub] that `Trainer` and `Encoder`
/// speak of, one "subspace" per code.
///
/// Training contract (`cpu::rq_trainer::train`, faiss ResidualQuantizer greedy
/// semantics, beam 1 while training):
/// - R <- permuted rows in float; with heads == 1 the rows of all KV heads are
///   pooled, head-major (row h * tokens + t).
/// - For stage st = 0 .. stages-1: the stage's codebooks of all splits are one
///   `cpu::kmeans_trainer` run on R with pq_config {dim, m = splits, nbits =
///   bits, max_iter, tol, seed + st, init, max_train_points}; then every row
///   of R is assigned greedily (the encoder's distance and tie rule, see
///   encode/residual.hpp) and R <- R - codeword, channel by channel in float.
/// - The CPU trainer needs bits <= 8 (the k-means it reuses has uint8
///   assignments); wider codebooks (9..16 bits) are imported.
/// Determinism: the same config and keys give bit-identical centroids for any
/// thread count.

#include <pqkv/codebook/codebook.hpp>
#include <pqkv/codebook/kmeans.hpp>
#include <pqkv/core/concepts.hpp>
#include <pqkv/core/config.hpp>
#include <pqkv/core/dtype.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/host_tensor.hpp>
#include <pqkv/core/parallel.hpp>
#include <pqkv/core/views.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

namespace pqkv {

/// Residual codebook centroids [heads, splits, stages, ksub, dsub].
template <class T = float>
using rq_centroids_view = view<T, 5>;

/// Residual quantizer of K or V rows (set separately for each). Words follow
/// faiss: `bits` per code, `ksub = 2^bits` codewords per stage.
struct rq_config {
  index_t dim = 128;                 ///< head dimension
  int splits = 1;                    ///< 1, 2 or 4 independent channel groups; must divide dim
  std::vector<index_t> permutation;  ///< xp[i] = x[permutation[i]]; empty: identity
  int stages = 8;                    ///< residual stages per split, 1..64
  int bits = 8;                      ///< bits per code, 1..16
  int beam = 1;                      ///< encoder beam width, 1..min(16, 2^bits); 1: greedy
  // k-means settings of every stage (see pq_config)
  int max_iter = 25;
  double tol = 1e-4;
  std::uint64_t seed = 4321;  ///< stage st trains with seed + st
  init_method init = init_method::kmeans_plus_plus;
  index_t max_train_points = 0;

  [[nodiscard]] index_t dsub() const noexcept { return splits > 0 ? dim / splits : 0; }
  [[nodiscard]] index_t ksub() const noexcept { return index_t{1} << bits; }
  /// Codes per row: splits * stages.
  [[nodiscard]] index_t codes_per_row() const noexcept { return index_t{splits} * stages; }
  /// Code bits of one token and head.
  [[nodiscard]] index_t code_bits_per_row() const noexcept { return codes_per_row() * bits; }
  /// Bytes per token and head in the packed bit-stream layout (whole bytes per row).
  [[nodiscard]] index_t packed_bytes_per_row() const noexcept { return (code_bits_per_row() + 7) / 8; }
  /// Bytes per token and head as uint8 (bits <= 8) or uint16 codes.
  [[nodiscard]] index_t unpacked_bytes_per_row() const noexcept { return codes_per_row() * (bits <= 8 ? 1 : 2); }
  /// Bytes of the float centroids for `heads` codebook heads.
  [[nodiscard]] index_t codebook_bytes(index_t heads) const noexcept
  {
    return heads * splits * stages * ksub() * dsub() * index_t{sizeof(float)};
  }
  /// The source channel of permuted channel i.
  [[nodiscard]] index_t channel(index_t i) const noexcept
  {
    return permutation.empty() ? i : permutation[static_cast<std::size_t>(i)];
  }

  /// One stage seen as a product quantizer over the permuted row: m = splits.
  /// The CPU trainer runs exactly this k-means per stage (seed + stage).
  [[nodiscard]] pq_config stage_pq(int stage = 0) const noexcept
  {
    pq_config p;
    p.dim = dim;
    p.m = splits;
    p.nbits = bits;
    p.max_iter = max_iter;
    p.tol = tol;
    p.seed = seed + static_cast<std::uint64_t>(stage);
    p.init = init;
    p.max_train_points = max_train_points;
    return p;
  }
  /// So an `rq_trainer` models `Trainer`, whose `config()` is a pq_config:
  /// the per-stage product quantizer.
  operator pq_config() const noexcept { return stage_pq(0); }  // NOLINT(google-explicit-constructor)

  /// Throws `pqkv::error` naming the first field that is out of range.
  void validate(char const* where = "rq_config") const
  {
    PQKV_EXPECTS(dim > 0, where, "dim=", dim, " must be positive");
    PQKV_EXPECTS(splits == 1 || splits == 2 || splits == 4, where, "splits=", splits, " must be 1, 2 or 4");
    PQKV_EXPECTS(dim % splits == 0, where, "splits=", splits, " does not divide dim=", dim);
    PQKV_EXPECTS(stages >= 1 && stages <= 64, where, "stages=", stages, " is outside 1..64");
    PQKV_EXPECTS(bits >= 1 && bits <= 16, where, "bits=", bits, " is outside 1..16");
    PQKV_EXPECTS(beam >= 1 && beam <= 16, where, "beam=", beam, " is outside 1..16");
    PQKV_EXPECTS(beam <= ksub(), where, "beam=", beam, " exceeds 2^bits=", ksub());
    PQKV_EXPECTS(max_iter >= 0, where, "max_iter=", max_iter, " must be >= 0");
    PQKV_EXPECTS(std::isfinite(tol) && tol >= 0, where, "tol=", tol, " must be finite and >= 0");
    PQKV_EXPECTS(max_train_points >= 0, where, "max_train_points=", max_train_points, " must be >= 0");
    if (!permutation.empty()) {
      PQKV_EXPECTS(static_cast<index_t>(permutation.size()) == dim, where, "permutation.size()=", permutation.size(),
                   ", dim=", dim, " (empty means identity)");
      std::vector<char> seen(static_cast<std::size_t>(dim), 0);
      for (std::size_t i = 0; i < permutation.size(); ++i) {
        index_t const p = permutation[i];
        PQKV_EXPECTS(p >= 0 && p < dim, where, "permutation[", i, "]=", p, " is outside [0, dim=", dim, ")");
        PQKV_EXPECTS(seen[static_cast<std::size_t>(p)] == 0, where, "permutation[", i, "]=", p,
                     " repeats a channel: not a permutation");
        seen[static_cast<std::size_t>(p)] = 1;
      }
    }
  }
};

/// Throws unless `centroids` is [1 or heads, splits, stages, ksub, dsub] of
/// `cfg`, non-null, and (when `finite`) every value is finite.
template <class T>
void check_rq_centroids(rq_centroids_view<T> centroids, rq_config const& cfg, index_t heads, char const* where,
                        bool finite = true)
{
  PQKV_EXPECTS(centroids.extent(0) == 1 || centroids.extent(0) == heads, where, "centroids.extent(0)=",
               centroids.extent(0), " must be 1 (shared) or heads=", heads);
  PQKV_EXPECTS(centroids.extent(1) == cfg.splits, where, "centroids.extent(1)=", centroids.extent(1),
               ", config.splits=", cfg.splits);
  PQKV_EXPECTS(centroids.extent(2) == cfg.stages, where, "centroids.extent(2)=", centroids.extent(2),
               ", config.stages=", cfg.stages);
  PQKV_EXPECTS(centroids.extent(3) == cfg.ksub(), where, "centroids.extent(3)=", centroids.extent(3),
               ", 2^config.bits=", cfg.ksub());
  PQKV_EXPECTS(centroids.extent(4) == cfg.dsub(), where, "centroids.extent(4)=", centroids.extent(4),
               ", config.dsub()=", cfg.dsub());
  PQKV_EXPECTS(centroids.data_handle() != nullptr, where, "centroids.data_handle() is null");
  if (finite) {
    auto const* p = centroids.data_handle();
    for (index_t e = 0; e < element_count(centroids); ++e) {
      PQKV_EXPECTS(std::isfinite(static_cast<float>(p[e])), where, "centroids element ", e, " (row-major)=", p[e],
                   " is not finite");
    }
  }
}

/// The 5-D view [heads, splits, stages, ksub, dsub] of a 4-D centroids view
/// [heads, splits * stages, ksub, dsub] (same memory).
template <class T>
[[nodiscard]] rq_centroids_view<T> as_rq_centroids(centroids_view<T> c, rq_config const& cfg, char const* where)
{
  PQKV_EXPECTS(c.extent(1) == cfg.codes_per_row(), where, "centroids.extent(1)=", c.extent(1),
               ", config.splits * config.stages=", cfg.codes_per_row());
  return rq_centroids_view<T>{c.data_handle(), c.extent(0), index_t{cfg.splits}, index_t{cfg.stages}, c.extent(2),
                              c.extent(3)};
}

/// Owning host residual codebook: its config and float centroids.
class residual_codebook {
 public:
  residual_codebook() = default;
  /// heads: 1 (shared by all KV heads) or the number of KV heads.
  residual_codebook(rq_config cfg, index_t heads)
    : config_{(cfg.validate("residual_codebook"), std::move(cfg))},
      centroids_{heads > 0 ? heads : 0, config_.splits, config_.stages, config_.ksub(), config_.dsub()}
  {
    PQKV_EXPECTS(heads > 0, "residual_codebook", "heads=", heads, " must be positive");
  }

  [[nodiscard]] rq_config const& config() const noexcept { return config_; }
  [[nodiscard]] index_t heads() const noexcept { return centroids_.extent(0); }
  /// [heads, splits, stages, ksub, dsub]
  [[nodiscard]] rq_centroids_view<float> centroids() noexcept { return centroids_.view(); }
  /// [heads, splits, stages, ksub, dsub]
  [[nodiscard]] rq_centroids_view<float const> centroids() const noexcept { return centroids_.const_view(); }
  /// [heads, splits * stages, ksub, dsub]: the same memory, one subspace per code.
  [[nodiscard]] centroids_view<float> flat_centroids() noexcept
  {
    return centroids_view<float>{centroids_.data(), heads(), config_.codes_per_row(), config_.ksub(), config_.dsub()};
  }

 private:
  rq_config config_{};
  host_tensor<float, 5> centroids_;
};

namespace detail::rq {

/// The encoder's distance: d = 0; d = fma(x_i - c_i, x_i - c_i, d), i ascending.
inline float distance(float const* x, float const* c, index_t dsub) noexcept
{
  float d = 0.f;
  for (index_t i = 0; i < dsub; ++i) {
    float const diff = x[i] - c[i];
    d = std::fma(diff, diff, d);
  }
  return d;
}

/// Lowest index of the smallest distance from x to the ksub codewords at c.
inline index_t nearest(float const* x, float const* c, index_t ksub, index_t dsub) noexcept
{
  float best = distance(x, c, dsub);
  index_t best_c = 0;
  for (index_t k = 1; k < ksub; ++k) {
    float const d = distance(x, c + k * dsub, dsub);
    if (d < best) {
      best = d;
      best_c = k;
    }
  }
  return best_c;
}

/// Throws unless every element of x [heads, tokens, dim] is finite; `name`
/// is how the message calls x.
template <class T>
void check_finite_rows(kv_view<T const> x, char const* name, char const* where)
{
  cpu::parallel_for(x.extent(0), [&](index_t h) {
    for (index_t t = 0; t < x.extent(1); ++t) {
      for (index_t d = 0; d < x.extent(2); ++d) {
        float const v = to_float(x(h, t, d));
        PQKV_EXPECTS(std::isfinite(v), where, name, "(", h, ", ", t, ", ", d, ")=", v, " is not finite");
      }
    }
  });
}

}  // namespace detail::rq

/// What one `rq_trainer::train` call did.
struct rq_train_report {
  /// residual_mse[st]: mean over training rows of ||residual||^2 (sum over
  /// channels, double) after stages 0..st; size stages.
  std::vector<double> residual_mse;
  double initial_mse = 0;                ///< the same before any stage: mean ||x||^2
  std::vector<kmeans_report> stages;     ///< the k-means report of each stage
};

namespace cpu {

/// CPU trainer of residual codebooks (training contract in this file);
/// models `pqkv::Trainer` through the 4-D centroids view.
class rq_trainer {
 public:
  /// Validates `cfg`; the CPU trainer also needs bits <= 8, and
  /// max_train_points == 0 or >= 2^bits.
  explicit rq_trainer(rq_config cfg) : cfg_{std::move(cfg)}
  {
    cfg_.validate("rq_trainer");
    PQKV_EXPECTS(cfg_.bits <= 8, "rq_trainer", "bits=", cfg_.bits,
                 " > 8: the CPU trainer trains up to 8-bit stages; import wider codebooks");
    PQKV_EXPECTS(cfg_.max_train_points == 0 || cfg_.max_train_points >= cfg_.ksub(), "rq_trainer",
                 "config.max_train_points=", cfg_.max_train_points, " must be 0 or >= 2^bits=", cfg_.ksub());
  }

  [[nodiscard]] rq_config const& config() const noexcept { return cfg_; }

  /// Trains centroids [1 or heads, splits, stages, ksub, dsub] from rows
  /// [heads, tokens, dim] (float, half or bf16; any strides). With init
  /// `provided`, each stage's k-means starts from the centroids passed in.
  template <class Key, class Layout, class Accessor>
    requires KvElement<std::remove_const_t<Key>>
  rq_train_report train(::cuda::std::mdspan<Key, extents<3>, Layout, Accessor> keys,  // [heads, tokens, dim]
                        rq_centroids_view<float> centroids) const  // [1|heads, splits, stages, ksub, dsub]
  {
    return run(kv_view<std::remove_const_t<Key> const>{keys}, centroids);
  }

  /// As above with centroids seen as [1 or heads, splits * stages, ksub, dsub].
  template <class Key, class Layout, class Accessor>
    requires KvElement<std::remove_const_t<Key>>
  rq_train_report train(::cuda::std::mdspan<Key, extents<3>, Layout, Accessor> keys,
                        centroids_view<float> centroids) const
  {
    return run(kv_view<std::remove_const_t<Key> const>{keys}, as_rq_centroids(centroids, cfg_, "rq_trainer.train"));
  }

 private:
  template <class Key>
  rq_train_report run(kv_view<Key const> keys, rq_centroids_view<float> centroids) const
  {
    constexpr char const* where = "rq_trainer.train";
    index_t const heads = keys.extent(0), tokens = keys.extent(1), dim = cfg_.dim;
    PQKV_EXPECTS(keys.extent(2) == dim, where, "keys.extent(2)=", keys.extent(2), ", config.dim=", dim);
    PQKV_EXPECTS(heads > 0, where, "keys.extent(0)=", heads, ": no heads to train");
    PQKV_EXPECTS(tokens > 0, where, "keys.extent(1)=", tokens, ": no tokens to train on");
    PQKV_EXPECTS(keys.data_handle() != nullptr, where, "keys.data_handle() is null");
    check_rq_centroids(centroids, cfg_, heads, where, cfg_.init == init_method::provided);
    pqkv::detail::rq::check_finite_rows(keys, "keys", where);

    index_t const cb_heads = centroids.extent(0), rows = heads * tokens / cb_heads;
    index_t const splits = cfg_.splits, stages = cfg_.stages, ksub = cfg_.ksub(), dsub = cfg_.dsub();
    // R [cb_heads, rows, dim]: permuted rows; shared codebooks pool all heads.
    std::vector<float> r(static_cast<std::size_t>(heads * tokens * dim));
    parallel_for(heads, [&](index_t h) {
      for (index_t t = 0; t < tokens; ++t) {
        float* dst = r.data() + (h * tokens + t) * dim;
        for (index_t i = 0; i < dim; ++i) { dst[i] = to_float(keys(h, t, cfg_.channel(i))); }
      }
    });
    auto mean_sq = [&] {
      std::vector<double> per_head(static_cast<std::size_t>(heads), 0.0);
      parallel_for(heads, [&](index_t h) {
        double s = 0;
        for (index_t e = h * tokens * dim; e < (h + 1) * tokens * dim; ++e) {
          s += static_cast<double>(r[static_cast<std::size_t>(e)]) * r[static_cast<std::size_t>(e)];
        }
        per_head[static_cast<std::size_t>(h)] = s;
      });
      double s = 0;
      for (double v : per_head) { s += v; }
      return s / static_cast<double>(heads * tokens);
    };

    rq_train_report report;
    report.initial_mse = mean_sq();
    host_tensor<float, 4> stage_c(cb_heads, splits, ksub, dsub);
    view<float const, 3> const rv{r.data(), cb_heads, rows, dim};
    for (index_t st = 0; st < stages; ++st) {
      for (index_t h = 0; h < cb_heads; ++h) {
        for (index_t s = 0; s < splits; ++s) {
          for (index_t c = 0; c < ksub; ++c) {
            for (index_t i = 0; i < dsub; ++i) { stage_c.view()(h, s, c, i) = centroids(h, s, st, c, i); }
          }
        }
      }
      kmeans_trainer const km{cfg_.stage_pq(static_cast<int>(st))};
      report.stages.push_back(km.train(kv_view<float const>{rv}, stage_c.view()));
      for (index_t h = 0; h < cb_heads; ++h) {
        for (index_t s = 0; s < splits; ++s) {
          for (index_t c = 0; c < ksub; ++c) {
            for (index_t i = 0; i < dsub; ++i) { centroids(h, s, st, c, i) = stage_c.view()(h, s, c, i); }
          }
        }
      }
      // Greedy assignment and subtraction, as the encoder does it.
      index_t const chunk = 256, chunks = chunk_count(rows, chunk);
      parallel_for(cb_heads * chunks, [&](index_t w) {
        index_t const h = w / chunks, t0 = (w % chunks) * chunk;
        for (index_t t = t0; t < std::min(rows, t0 + chunk); ++t) {
          float* x = r.data() + (h * rows + t) * dim;
          for (index_t s = 0; s < splits; ++s) {
            float const* cb = &centroids(h, s, st, 0, 0);
            index_t const c = pqkv::detail::rq::nearest(x + s * dsub, cb, ksub, dsub);
            for (index_t i = 0; i < dsub; ++i) { x[s * dsub + i] = x[s * dsub + i] - cb[c * dsub + i]; }
          }
        }
      });
      report.residual_mse.push_back(mean_sq());
    }
    return report;
  }

  rq_config cfg_;
};

}  // namespace cpu

/// Copies given codebooks src [1 or heads, splits, stages, ksub, dsub] (any
/// float source laid out so) into dst of the same shape, checking shape and
/// finiteness first; nothing is written on error.
inline void import_rq_centroids(rq_config const& cfg, rq_centroids_view<float const> src,
                                rq_centroids_view<float> dst)
{
  constexpr char const* where = "import_rq_centroids";
  cfg.validate(where);
  check_rq_centroids(src, cfg, src.extent(0), where);
  check_rq_centroids(dst, cfg, src.extent(0), where, false);
  PQKV_EXPECTS(dst.extent(0) == src.extent(0), where, "dst.extent(0)=", dst.extent(0), ", src.extent(0)=",
               src.extent(0));
  std::copy_n(src.data_handle(), element_count(src), dst.data_handle());
}

/// Imports projected codebooks (VQKV / SimVQ style: each stage's codebook is
/// a frozen basis times a learned projection) by multiplying them out:
/// dst(h, s, st, c, i) = float(sum_j double(basis(h, s, st, c, j)) *
/// double(projection(h, s, st, j, i))), j ascending, in double, rounded once.
/// basis [1|heads, splits, stages, ksub, rank], projection [same heads,
/// splits, stages, rank, dsub]. Throws on a shape mismatch, a null view or a
/// non-finite input or product; nothing is written then.
inline void import_projected_rq_centroids(rq_config const& cfg, rq_centroids_view<float const> basis,
                                          rq_centroids_view<float const> projection, rq_centroids_view<float> dst)
{
  constexpr char const* where = "import_projected_rq_centroids";
  cfg.validate(where);
  index_t const heads = basis.extent(0), rank = basis.extent(4);
  PQKV_EXPECTS(heads > 0, where, "basis.extent(0)=", heads, " must be positive");
  PQKV_EXPECTS(basis.extent(1) == cfg.splits && basis.extent(2) == cfg.stages && basis.extent(3) == cfg.ksub(), where,
               "basis extents (", basis.extent(1), ", ", basis.extent(2), ", ", basis.extent(3),
               ") differ from (splits, stages, 2^bits)=(", cfg.splits, ", ", cfg.stages, ", ", cfg.ksub(), ")");
  PQKV_EXPECTS(rank > 0, where, "basis.extent(4)=", rank, " (rank) must be positive");
  PQKV_EXPECTS(projection.extent(0) == heads && projection.extent(1) == cfg.splits &&
                 projection.extent(2) == cfg.stages && projection.extent(3) == rank &&
                 projection.extent(4) == cfg.dsub(),
               where, "projection extents (", projection.extent(0), ", ", projection.extent(1), ", ",
               projection.extent(2), ", ", projection.extent(3), ", ", projection.extent(4),
               ") differ from (heads, splits, stages, rank, dsub)=(", heads, ", ", cfg.splits, ", ", cfg.stages,
               ", ", rank, ", ", cfg.dsub(), ")");
  PQKV_EXPECTS(basis.data_handle() != nullptr, where, "basis.data_handle() is null");
  PQKV_EXPECTS(projection.data_handle() != nullptr, where, "projection.data_handle() is null");
  check_rq_centroids(dst, cfg, heads, where, false);
  PQKV_EXPECTS(dst.extent(0) == heads, where, "dst.extent(0)=", dst.extent(0), ", basis.extent(0)=", heads);
  for (index_t e = 0; e < element_count(basis); ++e) {
    PQKV_EXPECTS(std::isfinite(basis.data_handle()[e]), where, "basis element ", e, " (row-major)=",
                 basis.data_handle()[e], " is not finite");
  }
  for (index_t e = 0; e < element_count(projection); ++e) {
    PQKV_EXPECTS(std::isfinite(projection.data_handle()[e]), where, "projection element ", e, " (row-major)=",
                 projection.data_handle()[e], " is not finite");
  }
  index_t const dsub = cfg.dsub(), ksub = cfg.ksub();
  std::vector<float> out(static_cast<std::size_t>(element_count(dst)));
  index_t const books = heads * cfg.splits * cfg.stages;
  cpu::parallel_for(books, [&](index_t b) {
    index_t const h = b / (cfg.splits * cfg.stages), s = b / cfg.stages % cfg.splits, st = b % cfg.stages;
    for (index_t c = 0; c < ksub; ++c) {
      for (index_t i = 0; i < dsub; ++i) {
        double acc = 0;
        for (index_t j = 0; j < rank; ++j) {
          acc += static_cast<double>(basis(h, s, st, c, j)) * static_cast<double>(projection(h, s, st, j, i));
        }
        out[static_cast<std::size_t>((b * ksub + c) * dsub + i)] = static_cast<float>(acc);
      }
    }
  });
  for (std::size_t e = 0; e < out.size(); ++e) {
    PQKV_EXPECTS(std::isfinite(out[e]), where, "product element ", e, " (row-major)=", out[e],
                 " overflows float");
  }
  std::copy(out.begin(), out.end(), dst.data_handle());
}

static_assert(Trainer<cpu::rq_trainer, float>);
#if defined(PQKV_HAS_HALF)
static_assert(Trainer<cpu::rq_trainer, __half>);
#endif
#if defined(PQKV_HAS_BF16)
static_assert(Trainer<cpu::rq_trainer, __nv_bfloat16>);
#endif

}  // namespace pqkv

// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::cpu::kmeans_trainer`: per (KV head, subspace) k-means that
/// learns PQ centroids [heads, m, ksub, dsub] from keys [heads, tokens, dim].
/// This header is the reference contract the GPU trainer follows.
///
/// Contract (every (head, subspace) pair is one independent k-means problem):
/// - Training rows. All `tokens` rows of a head, or, when
///   `0 < config.max_train_points < tokens`, `max_train_points` distinct rows
///   drawn by a partial Fisher-Yates shuffle (draw i picks
///   `random_below(seed, stream(subsample, head, 0), i, tokens - i)`), then
///   sorted ascending; every subspace of the head uses the same rows.
///   `stream(tag, head, s) = tag << 48 ^ head << 16 ^ s`, tags subsample = 1,
///   random_sample = 2, kmeans_plus_plus = 3 (`detail::kmeans::stream_id`).
/// - Fewer training rows than ksub (n < ksub), whatever `config.init`: no
///   k-means is run; centroid k is training row k mod n (every row is exactly
///   a centroid, repeated rows fill the rest). iterations = 0, converged = true.
/// - init `random_sample`: centroid k is the k-th of ksub distinct rows drawn as
///   above with stream(random_sample, head, s). `kmeans_plus_plus`: D^2
///   sampling with stream(kmeans_plus_plus, head, s), D^2 = min over chosen
///   centroids of sum_j (x_j - c_j)^2 (float, fma over channels ascending):
///   centroid 0 is row `random_below(n)` at counter 0; for centroid k, rows are
///   grouped in blocks of 16, each block's D^2 summed in double as a fixed
///   tree (`detail::kmeans::block_tree_sum`), u = `random_unit(counter k)` x
///   (block sums added in block order); the walk adds block sums until one
///   would pass u, then that block's rows one by one, and takes the first row
///   where the running sum exceeds u (rounding aside, the row whose D^2 interval
///   holds u). If all D^2 are 0, row `random_below(n)` at counter k.
///   `provided`: the centroids passed in `centroids`.
/// - Distances: d(x, c) = ||x||^2 + (||c||^2 - 2 x.c) where the bracket is
///   accumulated in float as acc = ||c||^2, acc = fma(x_j, -2 c_j, acc) over
///   channels ascending (norms likewise, fma from 0), and d is clamped at 0.
///   Assignment = lowest index among the minima of the bracket.
/// - Lloyd: an initial assignment gives objective[0]; each iteration updates
///   every centroid to the mean of its rows (double sums, rounded to float)
///   and reassigns, giving the objective of the new centroids. Empty clusters,
///   in ascending order, take the training rows farthest from their assigned
///   centroid in the last assignment (distance descending, row ascending), one
///   distinct row each; this keeps the objective non-increasing.
/// - Stopping, per problem: after iteration i, when tol > 0 and
///   prev - cur <= tol * prev (prev, cur: the problem's objectives before and
///   after it), or after max_iter iterations.
/// - Sums: rows are cut into chunks of `detail::kmeans::chunk_rows(n)` rows
///   (a function of n only); per chunk, cluster sums and the objective (sum of
///   d) add in double in row order, and chunks combine in chunk order.
/// - Determinism: the same config, keys and build give bit-identical
///   centroids for any thread count. A GPU trainer draws the same init rows
///   and applies the same rules; its float sums may differ in rounding, so it
///   is compared by tolerance.
/// - Input: keys must be finite with squared sub-vector norms below 1e37;
///   `provided` centroids must be finite. Violations throw `pqkv::error`
///   before any output is written.

#include <pqkv/codebook/codebook.hpp>
#include <pqkv/core/concepts.hpp>
#include <pqkv/core/config.hpp>
#include <pqkv/core/dtype.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/parallel.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/detail/kmeans_cpu.hpp>

#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

namespace pqkv {

/// What one `train` call did.
struct kmeans_report {
  int iterations = 0;      ///< Lloyd iterations run: the most any (head, subspace) problem ran
  double mse = 0;          ///< final objective: sum over subspaces of d(x, assigned centroid), mean over heads and training rows
  bool converged = false;  ///< every problem met the tol criterion (or had n < ksub)
  /// objective[i]: the mse after i iterations (a problem that stopped earlier
  /// counts with its final centroids); objective[0] is the init's; size iterations + 1.
  std::vector<double> objective;
};

namespace cpu {

/// CPU k-means trainer of PQ codebooks; models `pqkv::Trainer`.
class kmeans_trainer {
 public:
  /// Validates `cfg`; also requires max_train_points == 0 or >= ksub.
  explicit kmeans_trainer(pq_config const& cfg) : cfg_{cfg}
  {
    cfg.validate("kmeans_trainer");
    PQKV_EXPECTS(cfg.max_train_points == 0 || cfg.max_train_points >= cfg.ksub(), "kmeans_trainer",
                 "config.max_train_points=", cfg.max_train_points, " must be 0 or >= config.ksub()=", cfg.ksub());
  }

  [[nodiscard]] pq_config const& config() const noexcept { return cfg_; }

  /// Trains centroids [heads, m, ksub, dsub] from keys [heads, tokens, dim]
  /// (float, __half or __nv_bfloat16; any strides). With init `provided`,
  /// training starts from the centroids passed in.
  template <class Key, class Layout>
    requires KvElement<std::remove_cv_t<Key>>
  kmeans_report train(::cuda::std::mdspan<Key, extents<3>, Layout> keys, centroids_view<float> centroids) const
  {
    using element = std::remove_cv_t<Key>;
    return report(::pqkv::detail::kmeans::train<element>(cfg_, kv_view<element const>{keys}, centroids, nullptr));
  }

  /// As above, and writes the final assignment of every token as codes
  /// [heads, tokens, m] (the argmin of the contract's distance for the final
  /// centroids; with subsampling every token, trained on or not, is assigned).
  template <class Key, class Layout>
    requires KvElement<std::remove_cv_t<Key>>
  kmeans_report train(::cuda::std::mdspan<Key, extents<3>, Layout> keys, centroids_view<float> centroids,
                      codes_view<std::uint8_t> codes) const
  {
    using element = std::remove_cv_t<Key>;
    return report(::pqkv::detail::kmeans::train<element>(cfg_, kv_view<element const>{keys}, centroids, &codes));
  }

 private:
  static kmeans_report report(::pqkv::detail::kmeans::outcome&& o)
  {
    kmeans_report r;
    r.iterations = o.iterations;
    r.converged = o.converged;
    r.mse = o.objective.back();
    r.objective = std::move(o.objective);
    return r;
  }

  pq_config cfg_;
};

}  // namespace cpu

static_assert(Trainer<cpu::kmeans_trainer, float>);
#if defined(PQKV_HAS_HALF)
static_assert(Trainer<cpu::kmeans_trainer, __half>);
#endif
#if defined(PQKV_HAS_BF16)
static_assert(Trainer<cpu::kmeans_trainer, __nv_bfloat16>);
#endif

}  // namespace pqkv

// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file SALE's per-head threshold calibration: for each q head, tau starts at
/// `tau_start` (0.008) and is halved until the head's mean row L1 output error
/// of block-sparse attention against dense causal attention is <= theta; a tau
/// that would fall below `tau_floor` (1e-4) becomes 0 (the head stays dense).
///
/// Contract, per q head h: out_ref = `block_sparse_attention` with every
/// causal block kept (exact causal attention); error(tau) = mean over the
/// batch's rows of sum_d |out(tau) - out_ref| (double), out(tau) under
/// `build_mask`'s rule with tau for head h; tau_0 = tau_start, tau_{k+1} =
/// tau_k / 2 (float); the result is the first tau_k with error <= theta, or 0
/// (error 0) once tau_k < tau_floor. Block scores are computed once per head
/// and thresholded per step, which gives the same masks as `build_mask`.

#include <pqkv/core/error.hpp>
#include <pqkv/core/host_tensor.hpp>
#include <pqkv/core/parallel.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/sparse/block_sparse_attention.hpp>
#include <pqkv/sparse/sale_mask.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

namespace pqkv {

/// Start and floor of the halving search.
struct calibration_options {
  float tau_start = 0.008f;  ///< first tau tried
  float tau_floor = 1e-4f;   ///< a tau below this becomes 0 (dense)
};

/// Per q head: the calibrated tau, its mean row L1 error and its density.
struct calibration_result {
  std::vector<float> tau;
  std::vector<double> error;
  std::vector<double> density;
};

namespace cpu {

/// Calibrates tau per q head for error bound theta on one batch (q, k, v
/// packed as the estimator's cu_seqlens; the estimator must have been built
/// from the same q and k). Throws `pqkv::error` on theta negative or NaN, a
/// bad option (tau_start not finite and positive, tau_floor negative or NaN),
/// or anything `block_sparse_attention` rejects.
template <MaskEstimator E, class Q, class LQ, class AQ, class K, class LK, class AK, class V, class LV, class AV>
  requires(KvElement<std::remove_const_t<Q>> && KvElement<std::remove_const_t<K>> &&
           KvElement<std::remove_const_t<V>>)
calibration_result calibrate_tau(E const& est,
                                 ::cuda::std::mdspan<Q, extents<3>, LQ, AQ> q_in,  // [q_heads, tokens, dim]
                                 ::cuda::std::mdspan<K, extents<3>, LK, AK> k_in,  // [kv_heads, tokens, dim]
                                 ::cuda::std::mdspan<V, extents<3>, LV, AV> v_in,  // [kv_heads, tokens, dv]
                                 double theta, calibration_options const& opt = {})
{
  constexpr char const* where = "calibrate_tau";
  kv_view<std::remove_const_t<Q> const> const q{q_in};
  kv_view<std::remove_const_t<K> const> const k{k_in};
  kv_view<std::remove_const_t<V> const> const v{v_in};
  PQKV_EXPECTS(!std::isnan(theta) && theta >= 0.0, where, "theta=", theta, " must be >= 0 and not NaN");
  PQKV_EXPECTS(std::isfinite(opt.tau_start) && opt.tau_start > 0.f, where, "tau_start=", opt.tau_start,
               " must be finite and positive");
  PQKV_EXPECTS(!std::isnan(opt.tau_floor) && opt.tau_floor >= 0.f, where, "tau_floor=", opt.tau_floor,
               " must be >= 0 and not NaN");
  mask_shape const m = est.shape();
  sparse_config const cfg = est.config();
  std::span<std::int32_t const> const cu = est.cu_seqlens();
  PQKV_EXPECTS(q.extent(0) == m.q_heads && k.extent(0) == m.kv_heads, where, "q heads=", q.extent(0),
               ", kv heads=", k.extent(0), " differ from the estimator's (", m.q_heads, ", ", m.kv_heads, ")");
  index_t const tokens = q.extent(1), dv = v.extent(2);
  host_tensor<std::uint32_t, 4> dense(m.batch, m.q_heads, m.q_blocks, m.words);
  std::vector<float> zeros(static_cast<std::size_t>(m.q_heads), 0.f);
  host_tensor<float, 3> ref(m.q_heads, tokens, dv);
  float const scale = pqkv::detail::check_block_sparse(q, k, v, cu, cfg, dense.const_view(), ref.view(), where);
  build_mask(est, std::span<float const>{zeros}, dense.view());
  block_sparse_attention(q, k, v, cu, cfg, dense.const_view(), ref.view());

  calibration_result result{std::vector<float>(static_cast<std::size_t>(m.q_heads)),
                            std::vector<double>(static_cast<std::size_t>(m.q_heads)),
                            std::vector<double>(static_cast<std::size_t>(m.q_heads))};
  host_tensor<std::uint32_t, 4> mask(m.batch, m.q_heads, m.q_blocks, m.words);
  host_tensor<float, 3> out(m.q_heads, tokens, dv);
  cpu::parallel_for(m.q_heads, [&](index_t h) {
    // Scores [batch, q_blocks, k_blocks] of this head, computed once.
    std::vector<double> scores(static_cast<std::size_t>(m.batch * m.q_blocks * m.k_blocks));
    for (index_t s = 0; s < m.batch; ++s) {
      index_t const n = cu[static_cast<std::size_t>(s) + 1] - cu[static_cast<std::size_t>(s)];
      for (index_t qb = 0; qb < m.q_blocks; ++qb) {
        if (causal_blocks(cfg, n, qb) == 0) { continue; }
        est.block_scores(s, h, qb,
                         std::span<double>{scores}.subspan(static_cast<std::size_t>((s * m.q_blocks + qb) * m.k_blocks),
                                                           static_cast<std::size_t>(m.k_blocks)));
      }
    }
    std::vector<index_t> order;
    auto error_at = [&](float tau) {
      for (index_t s = 0; s < m.batch; ++s) {
        index_t const n = cu[static_cast<std::size_t>(s) + 1] - cu[static_cast<std::size_t>(s)];
        for (index_t qb = 0; qb < m.q_blocks; ++qb) {
          std::span<double const> const row{scores.data() + (s * m.q_blocks + qb) * m.k_blocks,
                                            static_cast<std::size_t>(m.k_blocks)};
          pqkv::detail::rule_row(cfg, n, qb, tau, row, &mask.view()(s, h, qb, 0), m.words, order);
        }
        pqkv::detail::block_sparse_rows(q, k, v, cu, cfg, mask.const_view(), s, h, 0, n, scale, out.view());
      }
      double sum = 0.0;
      for (index_t t = 0; t < tokens; ++t) {
        for (index_t d = 0; d < dv; ++d) {
          sum += std::fabs(static_cast<double>(out.view()(h, t, d)) - static_cast<double>(ref.view()(h, t, d)));
        }
      }
      return tokens > 0 ? sum / static_cast<double>(tokens) : 0.0;
    };
    float tau = opt.tau_start;
    double err = error_at(tau);
    while (err > theta) {
      tau /= 2.f;
      if (tau < opt.tau_floor) {
        tau = 0.f;
        err = error_at(tau);  // dense: 0 by construction
        break;
      }
      err = error_at(tau);
    }
    result.tau[static_cast<std::size_t>(h)] = tau;
    result.error[static_cast<std::size_t>(h)] = err;
  });
  // Density of the final masks of all heads together.
  build_mask(est, std::span<float const>{result.tau}, mask.view(), std::span<double>{result.density});
  return result;
}

}  // namespace cpu
}  // namespace pqkv

// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Low-bit Q and K for the SALE block-sparse mask: per-head token-mean
/// subtraction, symmetric quantization per token or per 16/32-row group into
/// int8 on SALE's 4-bit grid (codes in [-7, 7]) or an 8-bit grid ([-127, 127]),
/// and the float terms that turn the integer products back into logits.
///
/// Contract (a GPU version must give the same bits), for one sequence
/// (tokens [cu[s], cu[s+1]) of the packed rows) and one head:
/// - mean: `mean[c] = float(sum_t double(x[t][c]) / double(len))`, the double
///   sum in ascending t from 0.0 (an empty sequence has mean 0);
/// - centred row: `x'[t][c] = to_float(x[t][c]) - mean[c]` (one float subtract);
/// - groups: rows [cu[s] + g G, min(cu[s] + (g + 1) G, cu[s+1])), G = group
///   (1: per token), numbered per head in token order across sequences;
/// - `amax = max |x'|` over the group's rows and channels (float, exact);
///   `scale = amax / float(qmax)`, `inv = float(qmax) / amax` (IEEE float
///   divisions); amax = 0 gives scale = 0 and all codes 0;
/// - `code = clamp(roundf(x' * inv), -qmax, qmax)`: one float multiply, then
///   round half away from zero (C `roundf`, CUDA `roundf`; not `rintf`, not
///   `__float2int_rn`, which round half to even);
/// - integer product `dot(a, b) = sum_c int32(a[c]) * int32(b[c])`, exact in
///   int32 (|dot| <= 127^2 * 256 < 2^23), so any summation order, and the
///   s32 accumulators of INT8 (or, for codes in [-7, 7], INT4) MMA, give it;
/// - correction `corr[h][j] = fma-chain over c of (q_mean[c], x'_k[j][c])`,
///   row term `row[h][i] = fma-chain over c of (to_float(q[i][c]), k_mean[c])`,
///   where fma-chain means `acc = 0.f; for c ascending: acc = fmaf(a[c], b[c], acc)`;
/// - estimated logit `z~ = scale_attn * (fmaf(sq * sk, float(dot), corr) + row)`
///   (`sale_logit`), which estimates the exact logit scale_attn * q.k because
///   q.k = q'.k' + q_mean.k' + q.k_mean.

#include <pqkv/core/dtype.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/macros.hpp>
#include <pqkv/core/parallel.hpp>
#include <pqkv/core/views.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

namespace pqkv {

/// Integer grid of the symmetric quantizer; the value is the largest code.
enum class quant_grid : int {
  int4 = 7,    ///< SALE's 4-bit grid: codes in [-7, 7], stored in int8
  int8 = 127,  ///< 8-bit grid: codes in [-127, 127]
};

/// Largest code of `grid`.
PQKV_HD constexpr int quant_max(quant_grid grid) { return static_cast<int>(grid); }

/// How rows are quantized.
struct quant_config {
  quant_grid grid = quant_grid::int4;
  index_t group = 1;  ///< rows sharing one scale: 1 (per token), 16 or 32

  /// Throws `pqkv::error` naming the bad field.
  void validate(char const* where = "quant_config") const
  {
    PQKV_EXPECTS(grid == quant_grid::int4 || grid == quant_grid::int8, where, "grid=", static_cast<int>(grid),
                 " must be quant_grid::int4 (7) or quant_grid::int8 (127)");
    PQKV_EXPECTS(group == 1 || group == 16 || group == 32, where, "group=", group, " must be 1, 16 or 32");
  }
};

/// The code of centred value `x` with inverse step `inv` on a grid of largest
/// code `qmax` (the file's contract).
PQKV_HD std::int8_t quantize_value(float x, float inv, int qmax)
{
  float const r = ::roundf(x * inv);
  float const lim = static_cast<float>(qmax);
  return static_cast<std::int8_t>(r > lim ? lim : (r < -lim ? -lim : r));
}

/// The estimated logit from row scales, the integer product, the correction
/// and row terms (the file's contract).
PQKV_HD float sale_logit(float sq, float sk, std::int32_t dot, float corr, float row, float scale)
{
  return scale * (::fmaf(sq * sk, static_cast<float>(dot), corr) + row);
}

namespace detail {

/// Checks cu_seqlens: at least 2 entries, cu[0] = 0, non-decreasing, last = tokens.
inline void check_cu_seqlens(std::span<std::int32_t const> cu, index_t tokens, char const* where)
{
  PQKV_EXPECTS(cu.size() >= 2, where, "cu_seqlens.size()=", cu.size(), " must be batch + 1 >= 2");
  PQKV_EXPECTS(cu[0] == 0, where, "cu_seqlens[0]=", cu[0], " must be 0");
  for (std::size_t s = 1; s < cu.size(); ++s) {
    PQKV_EXPECTS(cu[s] >= cu[s - 1], where, "cu_seqlens[", s, "]=", cu[s], " is below cu_seqlens[", s - 1,
                 "]=", cu[s - 1]);
  }
  PQKV_EXPECTS(cu.back() == tokens, where, "cu_seqlens.back()=", cu.back(), ", tokens=", tokens);
}

/// Throws unless x [heads, tokens, dim] is non-null (when not empty) and
/// finite; `name` is how the message calls x.
template <class T>
void check_finite_values(kv_view<T const> x, char const* name, char const* where)
{
  PQKV_EXPECTS(x.data_handle() != nullptr || element_count(x) == 0, where, name, ".data_handle() is null");
  cpu::parallel_for(x.extent(0), [&](index_t h) {
    for (index_t t = 0; t < x.extent(1); ++t) {
      for (index_t c = 0; c < x.extent(2); ++c) {
        float const v = to_float(x(h, t, c));
        PQKV_EXPECTS(std::isfinite(v), where, name, "(", h, ", ", t, ", ", c, ")=", v, " is not finite");
      }
    }
  });
}

}  // namespace detail

/// Scale groups per head for packed sequences `cu_seqlens` and group size
/// `group`: sum over sequences of ceil(len / group).
[[nodiscard]] inline index_t quant_group_count(std::span<std::int32_t const> cu_seqlens, index_t group)
{
  PQKV_EXPECTS(group > 0, "quant_group_count", "group=", group, " must be positive");
  index_t n = 0;
  for (std::size_t s = 1; s < cu_seqlens.size(); ++s) {
    index_t const len = std::max<index_t>(0, cu_seqlens[s] - cu_seqlens[s - 1]);
    n += (len + group - 1) / group;
  }
  return n;
}

/// First scale group of sequence `s` (groups of earlier sequences before it).
[[nodiscard]] inline index_t quant_group_offset(std::span<std::int32_t const> cu_seqlens, index_t group,
                                                std::size_t s)
{
  return quant_group_count(cu_seqlens.first(s + 1), group);
}

namespace cpu {

/// Centres each sequence's rows of x [heads, tokens, dim] on their per-head
/// token mean and quantizes them (the file's contract): codes [heads, tokens,
/// dim] int8, scales [heads, quant_group_count(cu_seqlens, cfg.group)] and
/// means [batch, heads, dim]. Sequences are the token ranges of cu_seqlens
/// (batch + 1 ascending offsets, 0 first, tokens last). Throws `pqkv::error`
/// on a bad config, cu_seqlens, shape, null view or a non-finite x.
template <class T, class L, class A>
  requires KvElement<std::remove_const_t<T>>
void center_quantize(::cuda::std::mdspan<T, extents<3>, L, A> x_in,  // [heads, tokens, dim]
                     std::span<std::int32_t const> cu_seqlens,        // [batch + 1]
                     quant_config const& cfg,
                     view<std::int8_t, 3> codes,                      // [heads, tokens, dim]
                     view<float, 2> scales,                           // [heads, groups]
                     view<float, 3> means)                            // [batch, heads, dim]
{
  constexpr char const* where = "center_quantize";
  kv_view<std::remove_const_t<T> const> const x{x_in};
  cfg.validate(where);
  index_t const heads = x.extent(0), tokens = x.extent(1), dim = x.extent(2);
  pqkv::detail::check_cu_seqlens(cu_seqlens, tokens, where);
  auto const batch = static_cast<index_t>(cu_seqlens.size()) - 1;
  index_t const groups = quant_group_count(cu_seqlens, cfg.group);
  PQKV_EXPECTS(codes.extent(0) == heads && codes.extent(1) == tokens && codes.extent(2) == dim, where,
               "codes extents (", codes.extent(0), ", ", codes.extent(1), ", ", codes.extent(2),
               ") differ from x's (", heads, ", ", tokens, ", ", dim, ")");
  PQKV_EXPECTS(scales.extent(0) == heads && scales.extent(1) >= groups, where, "scales extents (", scales.extent(0),
               ", ", scales.extent(1), ") are smaller than (heads, quant_group_count)=(", heads, ", ", groups, ")");
  PQKV_EXPECTS(means.extent(0) == batch && means.extent(1) == heads && means.extent(2) == dim, where,
               "means extents (", means.extent(0), ", ", means.extent(1), ", ", means.extent(2),
               ") differ from (batch, heads, dim)=(", batch, ", ", heads, ", ", dim, ")");
  PQKV_EXPECTS(codes.data_handle() != nullptr || element_count(codes) == 0, where, "codes.data_handle() is null");
  PQKV_EXPECTS(scales.data_handle() != nullptr || element_count(scales) == 0, where, "scales.data_handle() is null");
  PQKV_EXPECTS(means.data_handle() != nullptr || element_count(means) == 0, where, "means.data_handle() is null");
  pqkv::detail::check_finite_values(x, "x", where);
  int const qmax = quant_max(cfg.grid);
  index_t const G = cfg.group;
  cpu::parallel_for(heads * batch, [&](index_t job) {
    index_t const h = job / batch, s = job % batch;
    index_t const t0 = cu_seqlens[static_cast<std::size_t>(s)], t1 = cu_seqlens[static_cast<std::size_t>(s) + 1];
    std::vector<double> sum(static_cast<std::size_t>(dim), 0.0);  // per channel, ascending t
    for (index_t t = t0; t < t1; ++t) {
      for (index_t c = 0; c < dim; ++c) { sum[static_cast<std::size_t>(c)] += static_cast<double>(to_float(x(h, t, c))); }
    }
    for (index_t c = 0; c < dim; ++c) {
      means(s, h, c) = t1 > t0 ? static_cast<float>(sum[static_cast<std::size_t>(c)] / static_cast<double>(t1 - t0)) : 0.f;
    }
    index_t g = quant_group_offset(cu_seqlens, G, static_cast<std::size_t>(s));
    for (index_t r0 = t0; r0 < t1; r0 += G, ++g) {
      index_t const r1 = std::min(r0 + G, t1);
      float amax = 0.f;
      for (index_t t = r0; t < r1; ++t) {
        for (index_t c = 0; c < dim; ++c) { amax = std::max(amax, std::fabs(to_float(x(h, t, c)) - means(s, h, c))); }
      }
      float const scale = amax / static_cast<float>(qmax);
      float const inv = amax > 0.f ? static_cast<float>(qmax) / amax : 0.f;
      scales(h, g) = scale;
      for (index_t t = r0; t < r1; ++t) {
        for (index_t c = 0; c < dim; ++c) {
          codes(h, t, c) = quantize_value(to_float(x(h, t, c)) - means(s, h, c), inv, qmax);
        }
      }
    }
  });
}

/// The exact integer product of two code rows of length n (the contract).
[[nodiscard]] inline std::int32_t int_dot(std::int8_t const* a, std::int8_t const* b, index_t n) noexcept
{
  // 16 lanes of fixed length so an -O2 build vectorizes it; integer sums are
  // exact, so the lane split does not change the result.
  std::int32_t lane[16] = {};
  index_t c = 0;
  for (; c + 16 <= n; c += 16) {
    for (int l = 0; l < 16; ++l) { lane[l] += static_cast<std::int32_t>(a[c + l]) * static_cast<std::int32_t>(b[c + l]); }
  }
  std::int32_t acc = 0;
  for (; c < n; ++c) { acc += static_cast<std::int32_t>(a[c]) * static_cast<std::int32_t>(b[c]); }
  for (std::int32_t x : lane) { acc += x; }
  return acc;
}

/// The correction corr [q_heads, tokens] = q_mean . k'_j and the row term
/// row [q_heads, tokens] = q_i . k_mean of every q head h (KV head h / (q_heads
/// / kv_heads)), from the means `center_quantize` wrote (the file's contract).
/// Throws `pqkv::error` on a shape mismatch or bad cu_seqlens.
template <class Q, class LQ, class AQ, class K, class LK, class AK>
  requires(KvElement<std::remove_const_t<Q>> && KvElement<std::remove_const_t<K>>)
void sale_corrections(::cuda::std::mdspan<Q, extents<3>, LQ, AQ> q_in,  // [q_heads, tokens, dim]
                      ::cuda::std::mdspan<K, extents<3>, LK, AK> k_in,  // [kv_heads, tokens, dim]
                      std::span<std::int32_t const> cu_seqlens,          // [batch + 1]
                      view<float const, 3> q_means,                      // [batch, q_heads, dim]
                      view<float const, 3> k_means,                      // [batch, kv_heads, dim]
                      view<float, 2> corr,                               // [q_heads, tokens]
                      view<float, 2> row)                                // [q_heads, tokens]
{
  constexpr char const* where = "sale_corrections";
  kv_view<std::remove_const_t<Q> const> const q{q_in};
  kv_view<std::remove_const_t<K> const> const k{k_in};
  index_t const qh = q.extent(0), kvh = k.extent(0), tokens = q.extent(1), dim = q.extent(2);
  PQKV_EXPECTS(kvh > 0 && qh > 0 && qh % kvh == 0, where, "q heads=", qh, " is not a positive multiple of kv heads=",
               kvh);
  PQKV_EXPECTS(k.extent(1) == tokens && k.extent(2) == dim, where, "k extents (", k.extent(1), ", ", k.extent(2),
               ") differ from q's (", tokens, ", ", dim, ")");
  pqkv::detail::check_cu_seqlens(cu_seqlens, tokens, where);
  auto const batch = static_cast<index_t>(cu_seqlens.size()) - 1;
  PQKV_EXPECTS(q_means.extent(0) == batch && q_means.extent(1) == qh && q_means.extent(2) == dim, where,
               "q_means extents differ from (batch, q_heads, dim)=(", batch, ", ", qh, ", ", dim, ")");
  PQKV_EXPECTS(k_means.extent(0) == batch && k_means.extent(1) == kvh && k_means.extent(2) == dim, where,
               "k_means extents differ from (batch, kv_heads, dim)=(", batch, ", ", kvh, ", ", dim, ")");
  PQKV_EXPECTS(corr.extent(0) == qh && corr.extent(1) == tokens, where, "corr extents (", corr.extent(0), ", ",
               corr.extent(1), ") differ from (q_heads, tokens)=(", qh, ", ", tokens, ")");
  PQKV_EXPECTS(row.extent(0) == qh && row.extent(1) == tokens, where, "row extents (", row.extent(0), ", ",
               row.extent(1), ") differ from (q_heads, tokens)=(", qh, ", ", tokens, ")");
  index_t const r = qh / kvh;
  cpu::parallel_for(qh * batch, [&](index_t job) {
    index_t const h = job / batch, s = job % batch, g = h / r;
    for (index_t t = cu_seqlens[static_cast<std::size_t>(s)]; t < cu_seqlens[static_cast<std::size_t>(s) + 1]; ++t) {
      float c_acc = 0.f, r_acc = 0.f;
      for (index_t c = 0; c < dim; ++c) {
        c_acc = ::fmaf(q_means(s, h, c), to_float(k(g, t, c)) - k_means(s, g, c), c_acc);
        r_acc = ::fmaf(to_float(q(h, t, c)), k_means(s, g, c), r_acc);
      }
      corr(h, t) = c_acc;
      row(h, t) = r_acc;
    }
  });
}

}  // namespace cpu
}  // namespace pqkv

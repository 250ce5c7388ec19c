// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Block-sparse causal prefill masks (SALE): for every (sequence, q
/// head, q block) the key blocks an attention kernel must visit, estimated from
/// low-bit Q and K, as a bit mask, FlashInfer BSR, FlexAttention BlockMask
/// and SpargeAttn LUT tensors.
///
/// Blocks. Sequence s holds packed tokens [cu[s], cu[s+1]), length n. Query
/// block qb holds rows [qb Bq, min((qb+1) Bq, n)), key block kb keys
/// [kb Bk, min((kb+1) Bk, n)) (positions within the sequence). With q_end =
/// min((qb+1) Bq, n), key block kb is causal iff kb Bk < q_end, and forced
/// (always kept, `forced_block`) iff causal and (kb Bk < sink or (kb+1) Bk >
/// q_end - local): the sink blocks and the local window ending at the block's
/// last row. Padding (qb Bq >= n) has no key block.
///
/// Row statistics. Row i of q head h (KV head g = h / (q_heads / kv_heads))
/// over F_i, the keys j <= i of its q block's forced key blocks, ascending:
/// `s_ij = scale * fma-chain(q_i, k_j)` (float, as attend/dense.hpp),
/// `m_i = max s_ij` (float), `l_i = sum exp(double(s_ij) - double(m_i))`
/// (double, ascending j), `lse_i = double(m_i) + log(l_i)` (-inf if F_i is
/// empty, which only sink = 0 with local < Bq allows).
///
/// SALE rule. The block score of a non-forced causal key block is
/// `max over rows i, keys j <= i of (double(z~_ij) - lse_i)`, the log of the
/// largest relative score exp(z~_ij - m_i) / l_i in the block (z~ from
/// sparse/quantize.hpp's `sale_logit`); the block is kept iff score >=
/// log(double(tau_h)), i.e. z~_ij >= m_i + ln(tau_h l_i) for some i, j. tau_h
/// = 0 keeps every causal block of head h without estimating; tau_h = +inf
/// keeps the forced blocks only. With a cap (`max_blocks` >= 0) at most that
/// many non-forced blocks stay per (sequence, head, q block): those with the
/// highest scores, ties to the lower block index.
///
/// A GPU version must give the same quantized values (quantize.hpp) and the
/// same masks except for blocks whose score lies within 1e-4 of log(tau_h)
/// (m_i, l_i may round differently there).

#include <pqkv/attend/dense.hpp>
#include <pqkv/core/dtype.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/host_tensor.hpp>
#include <pqkv/core/macros.hpp>
#include <pqkv/core/parallel.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/sparse/quantize.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <numeric>
#include <span>
#include <type_traits>
#include <vector>

namespace pqkv {

/// Block geometry and rule options of a block-sparse prefill mask.
struct sparse_config {
  index_t block_q = 64;    ///< Bq: rows per q block, 16, 32, 64 or 128
  index_t block_k = 32;    ///< Bk: keys per key block, a positive multiple of 16
  index_t sink = 32;       ///< the first `sink` keys' blocks are always kept
  index_t local = 128;     ///< keys before each q block's end whose blocks are always kept (>= Bk)
  index_t max_blocks = -1; ///< cap on kept non-forced blocks per q block row; -1: none
  float scale = 0.f;       ///< logit scale; 0 means 1 / sqrt(dim)

  /// Throws `pqkv::error` naming the bad field and its value.
  void validate(char const* where = "sparse_config") const
  {
    PQKV_EXPECTS(block_q == 16 || block_q == 32 || block_q == 64 || block_q == 128, where, "block_q=", block_q,
                 " must be 16, 32, 64 or 128");
    PQKV_EXPECTS(block_k > 0 && block_k % 16 == 0, where, "block_k=", block_k,
                 " must be a positive multiple of 16");
    PQKV_EXPECTS(sink >= 0, where, "sink=", sink, " must be >= 0");
    PQKV_EXPECTS(local >= block_k, where, "local=", local, " must be >= block_k=", block_k);
    PQKV_EXPECTS(max_blocks >= -1, where, "max_blocks=", max_blocks, " must be -1 (no cap) or >= 0");
    PQKV_EXPECTS(std::isfinite(scale) && scale >= 0.f, where, "scale=", scale,
                 " must be finite and >= 0 (0: 1/sqrt(dim))");
  }
};

/// Extents of the masks of one batch: `batch` sequences of at most `max_len`
/// tokens, `q_blocks` x `k_blocks` blocks, `words` = ceil(k_blocks / 32).
struct mask_shape {
  index_t batch = 0, q_heads = 0, kv_heads = 0, max_len = 0;
  index_t q_blocks = 0, k_blocks = 0, words = 0;
  [[nodiscard]] bool operator==(mask_shape const&) const = default;
};

/// The mask shape of packed sequences `cu_seqlens` [batch + 1] with the given
/// heads and block sizes. Throws `pqkv::error` on bad cu_seqlens (it must start
/// at 0 and not decrease), config or heads.
[[nodiscard]] inline mask_shape make_mask_shape(std::span<std::int32_t const> cu_seqlens, index_t q_heads,
                                                index_t kv_heads, sparse_config const& cfg)
{
  constexpr char const* where = "make_mask_shape";
  cfg.validate(where);
  PQKV_EXPECTS(kv_heads > 0 && q_heads > 0 && q_heads % kv_heads == 0, where, "q_heads=", q_heads,
               " is not a positive multiple of kv_heads=", kv_heads);
  PQKV_EXPECTS(!cu_seqlens.empty(), where, "cu_seqlens is empty; it needs batch + 1 >= 2 entries");
  pqkv::detail::check_cu_seqlens(cu_seqlens, cu_seqlens.back(), where);
  mask_shape m;
  m.batch = static_cast<index_t>(cu_seqlens.size()) - 1;
  m.q_heads = q_heads;
  m.kv_heads = kv_heads;
  for (std::size_t s = 1; s < cu_seqlens.size(); ++s) {
    m.max_len = std::max<index_t>(m.max_len, cu_seqlens[s] - cu_seqlens[s - 1]);
  }
  m.q_blocks = (m.max_len + cfg.block_q - 1) / cfg.block_q;
  m.k_blocks = (m.max_len + cfg.block_k - 1) / cfg.block_k;
  m.words = (m.k_blocks + 31) / 32;
  return m;
}

/// Elements (uint32 words) of the bit mask [batch, q_heads, q_blocks, words].
[[nodiscard]] constexpr index_t bitmask_size(mask_shape const& m) noexcept
{
  return m.batch * m.q_heads * m.q_blocks * m.words;
}

/// Entries of the BSR row pointer: one row per (sequence, q head, q block), + 1.
[[nodiscard]] constexpr index_t bsr_indptr_size(mask_shape const& m) noexcept
{
  return m.batch * m.q_heads * m.q_blocks + 1;
}

/// Number of causal key blocks of q block qb in a sequence of n tokens (0 for padding).
PQKV_HD constexpr index_t causal_blocks(sparse_config const& cfg, index_t n, index_t qb) noexcept
{
  index_t const q0 = qb * cfg.block_q;
  if (q0 >= n) { return 0; }
  index_t const q_end = q0 + cfg.block_q < n ? q0 + cfg.block_q : n;
  return (q_end - 1) / cfg.block_k + 1;
}

/// Whether key block kb is always kept for q block qb of a sequence of n tokens.
PQKV_HD constexpr bool forced_block(sparse_config const& cfg, index_t n, index_t qb, index_t kb) noexcept
{
  if (kb >= causal_blocks(cfg, n, qb)) { return false; }
  index_t const q_end = (qb + 1) * cfg.block_q < n ? (qb + 1) * cfg.block_q : n;
  return kb * cfg.block_k < cfg.sink || (kb + 1) * cfg.block_k > q_end - cfg.local;
}

/// Causal blocks of every (sequence, q head), summed: the most BSR indices a mask can have.
[[nodiscard]] inline index_t bsr_indices_capacity(mask_shape const& m, std::span<std::int32_t const> cu_seqlens,
                                                  sparse_config const& cfg)
{
  index_t total = 0;
  for (std::size_t s = 1; s < cu_seqlens.size(); ++s) {
    index_t const n = cu_seqlens[s] - cu_seqlens[s - 1];
    for (index_t qb = 0; qb < m.q_blocks; ++qb) { total += causal_blocks(cfg, n, qb); }
  }
  return total * m.q_heads;
}

/// FlexAttention block counts at consumer block sizes (cq, ck): q blocks
/// ceil(max_len / cq) and key blocks ceil(max_len / ck).
struct block_mask_shape {
  index_t batch = 0, q_heads = 0, q_blocks = 0, k_blocks = 0;
};

/// The BlockMask extents for consumer blocks cq x ck; cq must be a multiple
/// of block_q and ck of block_k (consumer blocks are unions of mask blocks).
[[nodiscard]] inline block_mask_shape make_block_mask_shape(mask_shape const& m, sparse_config const& cfg, index_t cq,
                                                            index_t ck)
{
  constexpr char const* where = "make_block_mask_shape";
  PQKV_EXPECTS(cq > 0 && cq % cfg.block_q == 0, where, "consumer block_q=", cq,
               " must be a positive multiple of block_q=", cfg.block_q);
  PQKV_EXPECTS(ck > 0 && ck % cfg.block_k == 0, where, "consumer block_k=", ck,
               " must be a positive multiple of block_k=", cfg.block_k);
  return {m.batch, m.q_heads, (m.max_len + cq - 1) / cq, (m.max_len + ck - 1) / ck};
}

/// Elements of a SpargeAttn LUT [batch, q_heads, Q, K] at the consumer blocks
/// of `b` (`make_block_mask_shape`); FlexAttention's kv_indices has as many.
[[nodiscard]] constexpr index_t sparge_lut_size(block_mask_shape const& b) noexcept
{
  return b.batch * b.q_heads * b.q_blocks * b.k_blocks;
}

/// Elements of a SpargeAttn valid_block_num [batch, q_heads, Q] (as kv_num_blocks).
[[nodiscard]] constexpr index_t sparge_valid_size(block_mask_shape const& b) noexcept
{
  return b.batch * b.q_heads * b.q_blocks;
}

/// A block-score producer for `cpu::build_mask`. `shape()`, `config()` and
/// `cu_seqlens()` tell what it was built for; `block_scores(s, h, qb, scores)`
/// writes, for every non-forced causal key block kb of (sequence s, q head h,
/// q block qb), a log relative score into scores[kb] (scores has shape().k_blocks
/// entries; other entries are ignored). A block is kept iff its score >=
/// log(tau_h). Models: `cpu::sale_estimator`, `cpu::mean_pool_estimator`.
template <class E>
concept MaskEstimator = requires(E const& e, index_t i, std::span<double> scores) {
  { e.shape() } -> std::convertible_to<mask_shape>;
  { e.config() } -> std::convertible_to<sparse_config>;
  { e.cu_seqlens() } -> std::convertible_to<std::span<std::int32_t const>>;
  e.block_scores(i, i, i, scores);
};

namespace detail {

/// Throws unless head_dim is 64, 128 or 256.
inline void check_head_dim(index_t dim, char const* where)
{
  PQKV_EXPECTS(dim == 64 || dim == 128 || dim == 256, where, "head_dim=", dim, " must be 64, 128 or 256");
}

/// Checks q [q_heads, tokens, dim] and k [kv_heads, tokens, dim] of one packed
/// batch: same element type, GQA heads, head_dim, cu_seqlens, finite values.
template <class Qe, class Ke>
void check_prefill_qk(kv_view<Qe const> q, kv_view<Ke const> k, std::span<std::int32_t const> cu, char const* where)
{
  PQKV_EXPECTS((std::is_same_v<Qe, Ke>), where, "q dtype=", dtype_traits<Qe>::name, " differs from k dtype=",
               dtype_traits<Ke>::name);
  PQKV_EXPECTS(k.extent(0) > 0 && q.extent(0) > 0 && q.extent(0) % k.extent(0) == 0, where, "q heads=",
               q.extent(0), " is not a positive multiple of kv heads=", k.extent(0));
  check_head_dim(q.extent(2), where);
  PQKV_EXPECTS(k.extent(2) == q.extent(2), where, "k head_dim=", k.extent(2), ", q head_dim=", q.extent(2));
  PQKV_EXPECTS(k.extent(1) == q.extent(1), where, "k tokens=", k.extent(1), ", q tokens=", q.extent(1));
  check_cu_seqlens(cu, q.extent(1), where);
  check_finite_values(q, "q", where);
  check_finite_values(k, "k", where);
}

/// lse of the exact logits of query row `qrow` (a dim-vector of float) over
/// the forced keys j <= last of q block qb of the sequence at token t0 with n
/// tokens (the file's contract). Keys index k(g, t0 + j, .).
template <class Ke, class Row>
double forced_lse(Row const& qrow, kv_view<Ke const> k, index_t g, index_t t0, index_t n, index_t qb, index_t last,
                  sparse_config const& cfg, float scale, std::vector<float>& s)
{
  index_t const dim = k.extent(2);
  s.clear();
  float m = -std::numeric_limits<float>::infinity();
  for (index_t kb = 0; kb * cfg.block_k <= last; ++kb) {
    if (!forced_block(cfg, n, qb, kb)) { continue; }
    index_t const j1 = std::min((kb + 1) * cfg.block_k - 1, last);
    for (index_t j = kb * cfg.block_k; j <= j1; ++j) {
      float dot = 0.f;
      for (index_t c = 0; c < dim; ++c) { dot = std::fma(qrow(c), to_float(k(g, t0 + j, c)), dot); }
      float const x = scale * dot;
      s.push_back(x);
      m = x > m ? x : m;
    }
  }
  if (s.empty()) { return -std::numeric_limits<double>::infinity(); }
  double l = 0.0;
  for (float x : s) { l += std::exp(static_cast<double>(x) - static_cast<double>(m)); }
  return static_cast<double>(m) + std::log(l);
}

}  // namespace detail

namespace cpu {

/// SALE's estimator: Q and K centred and quantized at construction
/// (sparse/quantize.hpp), row statistics over the forced blocks exact; block
/// scores from the integer products. Owns its data, so the inputs may go away.
class sale_estimator {
 public:
  /// q [q_heads, tokens, dim], k [kv_heads, tokens, dim] packed by cu_seqlens
  /// [batch + 1]. Throws `pqkv::error` on a bad config, head_dim not 64, 128 or
  /// 256, q/k dtype mismatch, q heads not a multiple of KV heads, bad
  /// cu_seqlens, or a non-finite value.
  template <class Q, class LQ, class AQ, class K, class LK, class AK>
    requires(KvElement<std::remove_const_t<Q>> && KvElement<std::remove_const_t<K>>)
  sale_estimator(::cuda::std::mdspan<Q, extents<3>, LQ, AQ> q_in,  // [q_heads, tokens, dim]
                 ::cuda::std::mdspan<K, extents<3>, LK, AK> k_in,  // [kv_heads, tokens, dim]
                 std::span<std::int32_t const> cu_seqlens,          // [batch + 1]
                 sparse_config const& cfg, quant_config const& qcfg = {})
      : cfg_(cfg), qcfg_(qcfg), cu_(cu_seqlens.begin(), cu_seqlens.end())
  {
    constexpr char const* where = "sale_estimator";
    using Qe = std::remove_const_t<Q>;
    using Ke = std::remove_const_t<K>;
    kv_view<Qe const> const q{q_in};
    kv_view<Ke const> const k{k_in};
    cfg.validate(where);
    qcfg.validate(where);
    pqkv::detail::check_prefill_qk(q, k, cu_seqlens, where);
    shape_ = make_mask_shape(cu_seqlens, q.extent(0), k.extent(0), cfg);
    index_t const qh = q.extent(0), kvh = k.extent(0), tokens = q.extent(1), dim = q.extent(2);
    scale_ = pqkv::detail::attention_scale(cfg.scale, dim, where);
    index_t const groups = quant_group_count(cu_seqlens, qcfg.group);
    q_codes_ = host_tensor<std::int8_t, 3>(qh, tokens, dim);
    k_codes_ = host_tensor<std::int8_t, 3>(kvh, tokens, dim);
    q_scales_ = host_tensor<float, 2>(qh, groups);
    k_scales_ = host_tensor<float, 2>(kvh, groups);
    q_means_ = host_tensor<float, 3>(shape_.batch, qh, dim);
    k_means_ = host_tensor<float, 3>(shape_.batch, kvh, dim);
    corr_ = host_tensor<float, 2>(qh, tokens);
    row_ = host_tensor<float, 2>(qh, tokens);
    lse_ = host_tensor<double, 2>(qh, tokens);
    center_quantize(q, cu_seqlens, qcfg, q_codes_.view(), q_scales_.view(), q_means_.view());
    center_quantize(k, cu_seqlens, qcfg, k_codes_.view(), k_scales_.view(), k_means_.view());
    sale_corrections(q, k, cu_seqlens, q_means_.const_view(), k_means_.const_view(), corr_.view(), row_.view());
    q_row_scale_ = host_tensor<float, 2>(qh, tokens);
    k_row_scale_ = host_tensor<float, 2>(kvh, tokens);
    for (std::size_t s = 0; s + 1 < cu_.size(); ++s) {
      index_t const g0 = quant_group_offset(cu_seqlens, qcfg.group, s);
      for (index_t t = cu_[s]; t < cu_[s + 1]; ++t) {
        index_t const g = g0 + (t - cu_[s]) / qcfg.group;
        for (index_t h = 0; h < qh; ++h) { q_row_scale_.view()(h, t) = q_scales_.view()(h, g); }
        for (index_t h = 0; h < kvh; ++h) { k_row_scale_.view()(h, t) = k_scales_.view()(h, g); }
      }
    }
    index_t const r = qh / kvh;
    cpu::parallel_for(qh * shape_.batch, [&](index_t job) {
      index_t const h = job / shape_.batch, s = job % shape_.batch;
      index_t const t0 = cu_[static_cast<std::size_t>(s)], n = cu_[static_cast<std::size_t>(s) + 1] - t0;
      std::vector<float> buf;
      for (index_t i = 0; i < n; ++i) {
        auto qrow = [&](index_t c) { return to_float(q(h, t0 + i, c)); };
        lse_.view()(h, t0 + i) =
            pqkv::detail::forced_lse(qrow, k, h / r, t0, n, i / cfg_.block_q, i, cfg_, scale_, buf);
      }
    });
  }

  [[nodiscard]] mask_shape shape() const noexcept { return shape_; }
  [[nodiscard]] sparse_config const& config() const noexcept { return cfg_; }
  [[nodiscard]] quant_config const& quantization() const noexcept { return qcfg_; }
  [[nodiscard]] std::span<std::int32_t const> cu_seqlens() const noexcept { return cu_; }
  [[nodiscard]] float scale() const noexcept { return scale_; }

  /// Quantized rows and their terms, as `center_quantize` / `sale_corrections` wrote them.
  [[nodiscard]] view<std::int8_t const, 3> q_codes() const noexcept { return q_codes_.const_view(); }  // [q_heads, tokens, dim]
  [[nodiscard]] view<std::int8_t const, 3> k_codes() const noexcept { return k_codes_.const_view(); }  // [kv_heads, tokens, dim]
  [[nodiscard]] view<float const, 2> q_scales() const noexcept { return q_scales_.const_view(); }     // [q_heads, groups]
  [[nodiscard]] view<float const, 2> k_scales() const noexcept { return k_scales_.const_view(); }     // [kv_heads, groups]
  [[nodiscard]] view<float const, 2> corrections() const noexcept { return corr_.const_view(); }      // [q_heads, tokens]
  [[nodiscard]] view<float const, 2> row_terms() const noexcept { return row_.const_view(); }         // [q_heads, tokens]
  /// lse_i of every row over its forced keys [q_heads, tokens] (the file's contract).
  [[nodiscard]] view<double const, 2> row_lse() const noexcept { return lse_.const_view(); }

  /// The estimated logit z~ of q head h, packed rows i and j (same sequence).
  [[nodiscard]] float logit(index_t h, index_t i, index_t j) const noexcept
  {
    index_t const g = h / (shape_.q_heads / shape_.kv_heads), dim = q_codes_.extent(2);
    std::int32_t const dot = int_dot(&q_codes_.view()(h, i, 0), &k_codes_.view()(g, j, 0), dim);
    return sale_logit(q_row_scale_.view()(h, i), k_row_scale_.view()(g, j), dot, corr_.view()(h, j),
                      row_.view()(h, i), scale_);
  }

  /// Scores of the non-forced causal key blocks of (s, h, qb) (the file's contract).
  void block_scores(index_t s, index_t h, index_t qb, std::span<double> scores) const
  {
    index_t const t0 = cu_[static_cast<std::size_t>(s)], n = cu_[static_cast<std::size_t>(s) + 1] - t0;
    index_t const nk = causal_blocks(cfg_, n, qb), q0 = qb * cfg_.block_q, q1 = std::min(q0 + cfg_.block_q, n);
    index_t const g = h / (shape_.q_heads / shape_.kv_heads), dim = q_codes_.extent(2);
    auto const qc = q_codes_.const_view();
    auto const kc = k_codes_.const_view();
    for (index_t kb = 0; kb < nk; ++kb) {
      if (forced_block(cfg_, n, qb, kb)) { continue; }
      double best = -std::numeric_limits<double>::infinity();
      index_t const k0 = kb * cfg_.block_k, k1 = std::min(k0 + cfg_.block_k, n);
      for (index_t i = std::max(q0, k0); i < q1; ++i) {  // rows before k0 see no key of the block
        std::int8_t const* qp = &qc(h, t0 + i, 0);
        float const sq = q_row_scale_.view()(h, t0 + i), rr = row_.view()(h, t0 + i);
        float zmax = -std::numeric_limits<float>::infinity();
        for (index_t j = k0; j < k1 && j <= i; ++j) {
          std::int32_t const dot = int_dot(qp, &kc(g, t0 + j, 0), dim);
          float const z = sale_logit(sq, k_row_scale_.view()(g, t0 + j), dot, corr_.view()(h, t0 + j), rr, scale_);
          zmax = z > zmax ? z : zmax;
        }
        // max_j (double(z_j) - lse) = double(max_j z_j) - lse: subtracting a constant is monotone.
        best = std::max(best, static_cast<double>(zmax) - lse_.view()(h, t0 + i));
      }
      scores[static_cast<std::size_t>(kb)] = best;
    }
  }

 private:
  sparse_config cfg_;
  quant_config qcfg_;
  std::vector<std::int32_t> cu_;
  mask_shape shape_;
  float scale_ = 0.f;
  host_tensor<std::int8_t, 3> q_codes_, k_codes_;
  host_tensor<float, 2> q_scales_, k_scales_, corr_, row_;
  host_tensor<float, 2> q_row_scale_, k_row_scale_;  // each row's group scale [heads, tokens]
  host_tensor<float, 3> q_means_, k_means_;
  host_tensor<double, 2> lse_;
};

/// The mean-pooled estimator (the baseline SALE is compared with): block
/// score = double(scale * fma-chain(qbar, kbar)) - lse(qbar), with qbar the
/// mean of the q block's rows, kbar the mean of the key block's keys (float of
/// an ascending double sum), lse(qbar) the exact lse of qbar over the forced
/// keys j <= the block's last row. Its scores rank blocks, but are not
/// element-wise relative scores: compare estimators at equal density.
class mean_pool_estimator {
 public:
  /// Same arguments and checks as `sale_estimator` (no quantization).
  template <class Q, class LQ, class AQ, class K, class LK, class AK>
    requires(KvElement<std::remove_const_t<Q>> && KvElement<std::remove_const_t<K>>)
  mean_pool_estimator(::cuda::std::mdspan<Q, extents<3>, LQ, AQ> q_in,  // [q_heads, tokens, dim]
                      ::cuda::std::mdspan<K, extents<3>, LK, AK> k_in,  // [kv_heads, tokens, dim]
                      std::span<std::int32_t const> cu_seqlens,          // [batch + 1]
                      sparse_config const& cfg)
      : cfg_(cfg), cu_(cu_seqlens.begin(), cu_seqlens.end())
  {
    constexpr char const* where = "mean_pool_estimator";
    using Qe = std::remove_const_t<Q>;
    using Ke = std::remove_const_t<K>;
    kv_view<Qe const> const q{q_in};
    kv_view<Ke const> const k{k_in};
    cfg.validate(where);
    pqkv::detail::check_prefill_qk(q, k, cu_seqlens, where);
    shape_ = make_mask_shape(cu_seqlens, q.extent(0), k.extent(0), cfg);
    index_t const dim = q.extent(2), r = shape_.q_heads / shape_.kv_heads;
    scale_ = pqkv::detail::attention_scale(cfg.scale, dim, where);
    qbar_ = host_tensor<float, 4>(shape_.batch, shape_.q_heads, shape_.q_blocks, dim);
    kbar_ = host_tensor<float, 4>(shape_.batch, shape_.kv_heads, shape_.k_blocks, dim);
    lse_ = host_tensor<double, 3>(shape_.batch, shape_.q_heads, shape_.q_blocks);
    auto pool = [dim](auto const& x, index_t h, index_t a, index_t b, float* out) {
      for (index_t c = 0; c < dim; ++c) {
        double sum = 0.0;
        for (index_t t = a; t < b; ++t) { sum += static_cast<double>(to_float(x(h, t, c))); }
        out[c] = static_cast<float>(sum / static_cast<double>(b - a));
      }
    };
    cpu::parallel_for(shape_.batch, [&](index_t s) {
      index_t const t0 = cu_[static_cast<std::size_t>(s)], n = cu_[static_cast<std::size_t>(s) + 1] - t0;
      for (index_t g = 0; g < shape_.kv_heads; ++g) {
        for (index_t kb = 0; kb * cfg_.block_k < n; ++kb) {
          pool(k, g, t0 + kb * cfg_.block_k, t0 + std::min((kb + 1) * cfg_.block_k, n), &kbar_.view()(s, g, kb, 0));
        }
      }
      std::vector<float> buf;
      for (index_t h = 0; h < shape_.q_heads; ++h) {
        for (index_t qb = 0; qb * cfg_.block_q < n; ++qb) {
          index_t const q1 = std::min((qb + 1) * cfg_.block_q, n);
          float* qbar = &qbar_.view()(s, h, qb, 0);
          pool(q, h, t0 + qb * cfg_.block_q, t0 + q1, qbar);
          auto row = [qbar](index_t c) { return qbar[c]; };
          lse_.view()(s, h, qb) = pqkv::detail::forced_lse(row, k, h / r, t0, n, qb, q1 - 1, cfg_, scale_, buf);
        }
      }
    });
  }

  [[nodiscard]] mask_shape shape() const noexcept { return shape_; }
  [[nodiscard]] sparse_config const& config() const noexcept { return cfg_; }
  [[nodiscard]] std::span<std::int32_t const> cu_seqlens() const noexcept { return cu_; }

  /// Scores of the non-forced causal key blocks of (s, h, qb).
  void block_scores(index_t s, index_t h, index_t qb, std::span<double> scores) const
  {
    index_t const n = cu_[static_cast<std::size_t>(s) + 1] - cu_[static_cast<std::size_t>(s)];
    index_t const nk = causal_blocks(cfg_, n, qb), dim = qbar_.extent(3);
    index_t const g = h / (shape_.q_heads / shape_.kv_heads);
    for (index_t kb = 0; kb < nk; ++kb) {
      if (forced_block(cfg_, n, qb, kb)) { continue; }
      float dot = 0.f;
      for (index_t c = 0; c < dim; ++c) { dot = std::fma(qbar_.view()(s, h, qb, c), kbar_.view()(s, g, kb, c), dot); }
      scores[static_cast<std::size_t>(kb)] = static_cast<double>(scale_ * dot) - lse_.view()(s, h, qb);
    }
  }

 private:
  sparse_config cfg_;
  std::vector<std::int32_t> cu_;
  mask_shape shape_;
  float scale_ = 0.f;
  host_tensor<float, 4> qbar_, kbar_;
  host_tensor<double, 3> lse_;
};

static_assert(MaskEstimator<sale_estimator> && MaskEstimator<mean_pool_estimator>);

}  // namespace cpu

namespace detail {

/// Throws unless taus has one entry per q head, each >= 0 and not NaN.
inline void check_taus(std::span<float const> taus, index_t q_heads, char const* where)
{
  PQKV_EXPECTS(static_cast<index_t>(taus.size()) == q_heads, where, "tau.size()=", taus.size(), ", q_heads=",
               q_heads);
  for (std::size_t h = 0; h < taus.size(); ++h) {
    PQKV_EXPECTS(!std::isnan(taus[h]) && taus[h] >= 0.f, where, "tau[", h, "]=", taus[h],
                 " must be >= 0 and not NaN");
  }
}

/// Writes the mask words of one (sequence of n tokens, q block) from its
/// scores (the rule and cap of the file's contract). `order` is scratch.
inline void rule_row(sparse_config const& cfg, index_t n, index_t qb, float tau, std::span<double const> scores,
                     std::uint32_t* words, index_t nwords, std::vector<index_t>& order)
{
  std::fill(words, words + nwords, 0u);
  index_t const nk = causal_blocks(cfg, n, qb);
  auto set = [words](index_t kb) { words[kb / 32] |= std::uint32_t{1} << (kb % 32); };
  if (tau == 0.f) {
    for (index_t kb = 0; kb < nk; ++kb) { set(kb); }
    return;
  }
  double const log_tau = std::log(static_cast<double>(tau));
  order.clear();
  for (index_t kb = 0; kb < nk; ++kb) {
    if (forced_block(cfg, n, qb, kb)) {
      set(kb);
    } else if (scores[static_cast<std::size_t>(kb)] >= log_tau) {
      order.push_back(kb);
    }
  }
  if (cfg.max_blocks >= 0 && static_cast<index_t>(order.size()) > cfg.max_blocks) {
    std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t b) {
      return scores[static_cast<std::size_t>(a)] > scores[static_cast<std::size_t>(b)];
    });
    order.resize(static_cast<std::size_t>(cfg.max_blocks));
  }
  for (index_t kb : order) { set(kb); }
}

/// Throws unless the bit mask view matches `m` and is not null.
inline void check_bitmask(view<std::uint32_t const, 4> bitmask, mask_shape const& m, char const* where)
{
  PQKV_EXPECTS(bitmask.extent(0) == m.batch && bitmask.extent(1) == m.q_heads && bitmask.extent(2) == m.q_blocks &&
                   bitmask.extent(3) == m.words,
               where, "bitmask extents (", bitmask.extent(0), ", ", bitmask.extent(1), ", ", bitmask.extent(2), ", ",
               bitmask.extent(3), ") differ from (batch, q_heads, q_blocks, words)=(", m.batch, ", ", m.q_heads,
               ", ", m.q_blocks, ", ", m.words, "), bitmask_size=", bitmask_size(m));
  PQKV_EXPECTS(bitmask.data_handle() != nullptr || bitmask_size(m) == 0, where, "bitmask.data_handle() is null");
}

/// Checks the arguments of a consumer-block conversion (BlockMask or
/// SpargeAttn LUT, CPU or GPU) and returns its shape; `num_name` and
/// `idx_name` name the count [batch, q_heads, Q] and index [.., K] outputs.
inline block_mask_shape check_block_mask_args(view<std::uint32_t const, 4> bitmask, mask_shape const& m,
                                              sparse_config const& cfg, index_t cq, index_t ck,
                                              view<std::int32_t, 3> kv_num_blocks, view<std::int32_t, 4> kv_indices,
                                              char const* where, char const* num_name = "kv_num_blocks",
                                              char const* idx_name = "kv_indices")
{
  pqkv::detail::check_bitmask(bitmask, m, where);
  block_mask_shape const b = make_block_mask_shape(m, cfg, cq, ck);
  PQKV_EXPECTS(kv_num_blocks.extent(0) == b.batch && kv_num_blocks.extent(1) == b.q_heads &&
                   kv_num_blocks.extent(2) == b.q_blocks,
               where, num_name, " extents (", kv_num_blocks.extent(0), ", ", kv_num_blocks.extent(1), ", ",
               kv_num_blocks.extent(2), ") differ from (", b.batch, ", ", b.q_heads, ", ", b.q_blocks, ")");
  PQKV_EXPECTS(kv_indices.extent(0) == b.batch && kv_indices.extent(1) == b.q_heads &&
                   kv_indices.extent(2) == b.q_blocks && kv_indices.extent(3) == b.k_blocks,
               where, idx_name, " extents (", kv_indices.extent(0), ", ", kv_indices.extent(1), ", ",
               kv_indices.extent(2), ", ", kv_indices.extent(3), ") differ from (", b.batch, ", ", b.q_heads, ", ",
               b.q_blocks, ", ", b.k_blocks, ")");
  PQKV_EXPECTS((kv_num_blocks.data_handle() != nullptr || element_count(kv_num_blocks) == 0) &&
                   (kv_indices.data_handle() != nullptr || element_count(kv_indices) == 0),
               where, num_name, " or ", idx_name, " data_handle() is null");
  return b;
}

}  // namespace detail

namespace cpu {

/// Whether bit kb of row (s, h, qb) is set.
[[nodiscard]] inline bool mask_bit(view<std::uint32_t const, 4> bitmask, index_t s, index_t h, index_t qb,
                                   index_t kb) noexcept
{
  return ((bitmask(s, h, qb, kb / 32) >> (kb % 32)) & 1u) != 0;
}

/// Kept causal blocks / causal blocks of each q head, over all sequences,
/// into density [q_heads] (1 where a head has no causal block).
inline void mask_density(view<std::uint32_t const, 4> bitmask, mask_shape const& m,
                         std::span<std::int32_t const> cu_seqlens, sparse_config const& cfg,
                         std::span<double> density)  // [q_heads]
{
  constexpr char const* where = "mask_density";
  pqkv::detail::check_bitmask(bitmask, m, where);
  PQKV_EXPECTS(static_cast<index_t>(cu_seqlens.size()) == m.batch + 1, where, "cu_seqlens.size()=",
               cu_seqlens.size(), ", batch + 1=", m.batch + 1);
  PQKV_EXPECTS(static_cast<index_t>(density.size()) >= m.q_heads, where, "density.size()=", density.size(),
               " is smaller than q_heads=", m.q_heads);
  for (index_t h = 0; h < m.q_heads; ++h) {
    double kept = 0, causal = 0;
    for (index_t s = 0; s < m.batch; ++s) {
      index_t const n = cu_seqlens[static_cast<std::size_t>(s) + 1] - cu_seqlens[static_cast<std::size_t>(s)];
      for (index_t qb = 0; qb < m.q_blocks; ++qb) {
        index_t const nk = causal_blocks(cfg, n, qb);
        causal += static_cast<double>(nk);
        for (index_t kb = 0; kb < nk; ++kb) { kept += mask_bit(bitmask, s, h, qb, kb) ? 1.0 : 0.0; }
      }
    }
    density[static_cast<std::size_t>(h)] = causal > 0 ? kept / causal : 1.0;
  }
}

/// Builds the bit mask [batch, q_heads, q_blocks, words] of the estimator's
/// batch with per-head thresholds tau [q_heads] (the file's rule): bit kb % 32
/// of word kb / 32 is block kb; bits of non-causal blocks, of padding rows and
/// past k_blocks are 0. density, when not empty, gets [q_heads] kept / causal
/// blocks. Throws `pqkv::error` on a tau that is negative or NaN, a tau count
/// other than q_heads, or a bitmask (or density) smaller than the shape says.
template <MaskEstimator E>
void build_mask(E const& est, std::span<float const> tau,  // [q_heads]
                view<std::uint32_t, 4> bitmask,             // [batch, q_heads, q_blocks, words]
                std::span<double> density = {})             // [q_heads] or empty
{
  constexpr char const* where = "build_mask";
  mask_shape const m = est.shape();
  sparse_config const cfg = est.config();
  std::span<std::int32_t const> const cu = est.cu_seqlens();
  pqkv::detail::check_taus(tau, m.q_heads, where);
  pqkv::detail::check_bitmask(as_const(bitmask), m, where);
  PQKV_EXPECTS(density.empty() || static_cast<index_t>(density.size()) >= m.q_heads, where, "density.size()=",
               density.size(), " is smaller than q_heads=", m.q_heads);
  cpu::parallel_for(m.batch * m.q_heads, [&](index_t job) {
    index_t const s = job / m.q_heads, h = job % m.q_heads;
    index_t const n = cu[static_cast<std::size_t>(s) + 1] - cu[static_cast<std::size_t>(s)];
    std::vector<double> scores(static_cast<std::size_t>(m.k_blocks));
    std::vector<index_t> order;
    for (index_t qb = 0; qb < m.q_blocks; ++qb) {
      if (tau[static_cast<std::size_t>(h)] != 0.f && causal_blocks(cfg, n, qb) > 0) {
        est.block_scores(s, h, qb, scores);
      }
      pqkv::detail::rule_row(cfg, n, qb, tau[static_cast<std::size_t>(h)], scores, &bitmask(s, h, qb, 0), m.words, order);
    }
  });
  if (!density.empty()) { mask_density(as_const(bitmask), m, cu, cfg, density); }
}

/// The bit mask as FlashInfer-style BSR: block row r = (s q_heads + h)
/// q_blocks + qb (padding rows are empty), indices of its set key blocks
/// ascending; indptr [bsr_indptr_size(m)], indices [>= the set-bit count;
/// `bsr_indices_capacity` bounds it]. Returns the number of indices written
/// (= indptr.back()). Throws `pqkv::error` if an output is too small.
inline index_t bitmask_to_bsr(view<std::uint32_t const, 4> bitmask, mask_shape const& m,
                              std::span<std::int32_t> indptr, std::span<std::int32_t> indices)
{
  constexpr char const* where = "bitmask_to_bsr";
  pqkv::detail::check_bitmask(bitmask, m, where);
  PQKV_EXPECTS(static_cast<index_t>(indptr.size()) >= bsr_indptr_size(m), where, "indptr.size()=", indptr.size(),
               " is smaller than bsr_indptr_size=", bsr_indptr_size(m));
  index_t nnz = 0;
  for (index_t r = 0; r < bsr_indptr_size(m) - 1; ++r) {
    index_t const qb = r % m.q_blocks, h = (r / m.q_blocks) % m.q_heads, s = r / (m.q_blocks * m.q_heads);
    for (index_t w = 0; w < m.words; ++w) { nnz += std::popcount(bitmask(s, h, qb, w)); }
  }
  PQKV_EXPECTS(static_cast<index_t>(indices.size()) >= nnz, where, "indices.size()=", indices.size(),
               " is smaller than the mask's ", nnz, " set blocks");
  index_t at = 0;
  indptr[0] = 0;
  for (index_t r = 0; r < bsr_indptr_size(m) - 1; ++r) {
    index_t const qb = r % m.q_blocks, h = (r / m.q_blocks) % m.q_heads, s = r / (m.q_blocks * m.q_heads);
    for (index_t kb = 0; kb < m.k_blocks; ++kb) {
      if (mask_bit(bitmask, s, h, qb, kb)) { indices[static_cast<std::size_t>(at++)] = static_cast<std::int32_t>(kb); }
    }
    indptr[static_cast<std::size_t>(r) + 1] = static_cast<std::int32_t>(at);
  }
  return at;
}

}  // namespace cpu

namespace detail {

/// Writes the consumer-block rows of shape b (blocks fq x fk mask blocks,
/// OR-reduced) into num [batch, q_heads, Q] and idx [batch, q_heads, Q, K]:
/// each row's set consumer blocks ascending, or with `deltas` the steps
/// between them (the first from block 0), then 0-padded.
inline void consumer_block_rows(view<std::uint32_t const, 4> bitmask, mask_shape const& m, block_mask_shape const& b,
                                index_t fq, index_t fk, bool deltas, view<std::int32_t, 3> num,
                                view<std::int32_t, 4> idx)
{
  std::vector<char> any(static_cast<std::size_t>(b.k_blocks));
  for (index_t s = 0; s < b.batch; ++s) {
    for (index_t h = 0; h < b.q_heads; ++h) {
      for (index_t Q = 0; Q < b.q_blocks; ++Q) {
        std::fill(any.begin(), any.end(), char{0});
        for (index_t qb = Q * fq; qb < std::min((Q + 1) * fq, m.q_blocks); ++qb) {
          for (index_t kb = 0; kb < m.k_blocks; ++kb) {
            if (cpu::mask_bit(bitmask, s, h, qb, kb)) { any[static_cast<std::size_t>(kb / fk)] = 1; }
          }
        }
        std::int32_t cnt = 0, last = 0;
        for (index_t K = 0; K < b.k_blocks; ++K) {
          if (any[static_cast<std::size_t>(K)] == 0) { continue; }
          idx(s, h, Q, cnt++) = static_cast<std::int32_t>(deltas ? K - last : K);
          last = static_cast<std::int32_t>(K);
        }
        num(s, h, Q) = cnt;
        for (index_t K = cnt; K < b.k_blocks; ++K) { idx(s, h, Q, K) = 0; }
      }
    }
  }
}

}  // namespace detail

namespace cpu {

/// The bit mask OR-reduced to consumer blocks cq x ck (multiples of block_q,
/// block_k) as FlexAttention `BlockMask` tensors: kv_num_blocks [batch,
/// q_heads, Q] and kv_indices [batch, q_heads, Q, K] (`make_block_mask_shape`),
/// each row's set consumer blocks ascending, then 0-padded (a valid index, so
/// gathers past kv_num_blocks stay in bounds). Throws `pqkv::error` on bad
/// consumer sizes or output extents that differ from that shape.
inline void bitmask_to_block_mask(view<std::uint32_t const, 4> bitmask, mask_shape const& m,
                                  sparse_config const& cfg, index_t cq, index_t ck,
                                  view<std::int32_t, 3> kv_num_blocks,  // [batch, q_heads, Q]
                                  view<std::int32_t, 4> kv_indices)     // [batch, q_heads, Q, K]
{
  constexpr char const* where = "bitmask_to_block_mask";
  block_mask_shape const b =
    pqkv::detail::check_block_mask_args(bitmask, m, cfg, cq, ck, kv_num_blocks, kv_indices, where);
  pqkv::detail::consumer_block_rows(bitmask, m, b, cq / cfg.block_q, ck / cfg.block_k, false, kv_num_blocks,
                                    kv_indices);
}

/// The bit mask OR-reduced to consumer blocks cq x ck (multiples of block_q,
/// block_k) as the look-up table SpargeAttn's block-sparse SageAttention
/// kernels read: valid_block_num [batch, q_heads, Q] int32, the kept consumer
/// key blocks of each row, and lut [batch, q_heads, Q, K] int32 (shape of
/// `make_block_mask_shape`, sizes `sparge_valid_size`, `sparge_lut_size`),
/// whose row holds, for the kept blocks k_0 < k_1 < ... ascending, k_0 then
/// the steps k_j - k_{j-1}, then 0 to the end of the row. A kernel starts at
/// lut[0] and adds lut[j] before its j-th step. Pick cq x ck as the kernel's
/// CTA tile: 64 x 128 for SageAttention2 on Hopper (sm90), 128 x 64 on sm80
/// / sm89. Its kernels are not varlen: sequences are padded to max_len, and a
/// row with valid_block_num 0 (padding, an empty sequence) is skipped without
/// writing its output rows. Throws `pqkv::error` on bad consumer sizes or
/// output extents that differ from that shape.
//
// The encoding is SpargeAttn's (github.com/thu-ml/SpargeAttn, read at commit
// bfd980b): spas_sage_attn/utils.py, block_map_lut_triton, turns a bool block
// map [B, H, Q, K] into int32 tensors of these shapes with delta steps and a
// zero-filled tail; csrc/qattn/qk_int_sv_f8_cuda_sm90.cuh (and the sm80 / sm89
// kernels) read valid_block_num[b, h, q], offset lut by that row times
// ceil(kv_len / CTA_K), and accumulate the steps; the .cu dispatchers set
// CTA_Q x CTA_K to 64 x 128 on sm90 and 128 x 64 elsewhere.
inline void bitmask_to_sparge_lut(view<std::uint32_t const, 4> bitmask, mask_shape const& m,
                                  sparse_config const& cfg, index_t cq, index_t ck,
                                  view<std::int32_t, 3> valid_block_num,  // [batch, q_heads, Q]
                                  view<std::int32_t, 4> lut)              // [batch, q_heads, Q, K]
{
  constexpr char const* where = "bitmask_to_sparge_lut";
  block_mask_shape const b = pqkv::detail::check_block_mask_args(bitmask, m, cfg, cq, ck, valid_block_num, lut,
                                                                  where, "valid_block_num", "lut");
  pqkv::detail::consumer_block_rows(bitmask, m, b, cq / cfg.block_q, ck / cfg.block_k, true, valid_block_num, lut);
}

}  // namespace cpu
}  // namespace pqkv

// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::cpu::code_attention`: one decode step of attention read
/// straight from residual K and V codes, never rebuilding K or V. Keys enter
/// through a lookup table of q against every codeword, values through a
/// histogram of softmax weights per (value stage, codeword) and one final
/// (stages * 2^bits) x dsub product per split. Output plus log-sum-exp, so the
/// caller merges it with its exact sink / local-window attention.
///
/// Contract (the float evaluation order a GPU kernel follows; its own
/// reduction order may differ, so compare by tolerance), for q head h, KV head
/// g = h / (q_heads / kv_heads), codebook head hc = 0 if shared else g:
/// 1. scale: as `attention_dense` (0 means float(1 / sqrt(double(dim)))).
/// 2. LUT: qp_i = q(h, kperm[i]); for code n = s * stages_k + st and codeword c,
///    `lut[n][c] = 0.f; for i ascending: lut[n][c] = fmaf(qp[s * dsub_k + i], Ck(hc, s, st, c, i), lut[n][c]);`
/// 3. logit of token t: `a = 0.f; for n ascending: a += lut[n][kcode(g, t, n)]; logit = scale * a;`
///    (a equals q . reconstructed key up to rounding).
/// 4. Online softmax over tokens [0, length) in tiles of `code_attention_tile`
///    tokens, ascending: m_tile = max of the tile's logits; m' = max(m, m_tile);
///    alpha = expf(m - m') (m = -inf, l = 0, hist = 0 at the start); l *= alpha;
///    every hist entry *= alpha (skipped when alpha == 1); then per token t of
///    the tile, ascending: p = expf(logit_t - m'); l += p; for value code n
///    ascending: hist[n][vcode(g, t, n)] += p. Then m = m'.
/// 5. Output: for value split s and channel i,
///    `acc = 0.f; for st ascending, c ascending: acc = fmaf(hist[s * stages_v + st][c], Cv(hc, s, st, c, i), acc);`
///    `out(h, vperm[s * dsub_v + i]) = acc / l;` lse(h) = m + logf(l).
///    (hist entries that are 0 add exactly nothing, so a kernel may skip them.)
/// 5'. length == 0: out(h, :) = 0, lse(h) = -inf (contributes nothing to a merge).
/// Inputs are checked before anything is written: shapes, nulls, code types,
/// codes < 2^bits, finite q and centroids, 0 <= length <= capacity.

#include <pqkv/attend/dense.hpp>
#include <pqkv/codebook/residual.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/parallel.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/encode/residual.hpp>
#include <pqkv/score/lut.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <type_traits>
#include <vector>

namespace pqkv {

/// Tokens per online-softmax tile of the code-attention contract.
inline constexpr index_t code_attention_tile = 64;

/// Bytes of the fp32 key LUT of one GQA group: q heads per KV head x
/// splits * stages x 2^bits x 4. What decides whether a GPU kernel keeps it
/// in shared memory or splits stages across blocks.
[[nodiscard]] inline index_t code_attention_lut_bytes(rq_config const& key_cfg, index_t q_per_kv) noexcept
{
  return q_per_kv * key_cfg.codes_per_row() * key_cfg.ksub() * index_t{sizeof(float)};
}

/// Bytes of the fp32 value histogram of one q head: splits * stages x 2^bits x 4.
[[nodiscard]] inline index_t code_attention_hist_bytes(rq_config const& value_cfg) noexcept
{
  return value_cfg.codes_per_row() * value_cfg.ksub() * index_t{sizeof(float)};
}

namespace detail::rq {

/// Step 2 of the contract for q head h: lut[n * ksub + c] for code n = s *
/// stages + st and codeword c of codebook head hc, each entry `lut_entry`'s fma
/// chain (score/lut.hpp) over the split's permuted query channels. qp is
/// scratch [dim] (it receives the permuted query); lut is [splits * stages, ksub].
/// Shared with `cpu::rq_scorer`, so scorer and attention see the same logits.
inline void key_lut(query_view<float const> q, index_t h, rq_config const& cfg,
                    rq_centroids_view<float const> centroids, index_t hc, float* qp, float* lut)
{
  index_t const dim = cfg.dim, stages = cfg.stages, ksub = cfg.ksub(), dsub = cfg.dsub();
  for (index_t i = 0; i < dim; ++i) { qp[i] = q(h, cfg.channel(i)); }
  for (index_t s = 0; s < cfg.splits; ++s) {
    for (index_t st = 0; st < stages; ++st) {
      float* row = lut + (s * stages + st) * ksub;
      for (index_t c = 0; c < ksub; ++c) { row[c] = lut_entry(qp + s * dsub, &centroids(hc, s, st, c, 0), dsub); }
    }
  }
}

/// Step 3 of the contract for one token: `a = 0.f; a += lut[n][row[n]]` over
/// the n_codes codes ascending, then `scale * a` (each operation rounded).
template <class Code>
[[nodiscard]] inline float key_logit(float const* lut, Code const* row, index_t n_codes, index_t ksub,
                                     float scale) noexcept
{
  float a = 0.f;
  for (index_t n = 0; n < n_codes; ++n) { a += lut[n * ksub + row[n]]; }
  return scale * a;
}

}  // namespace detail::rq

namespace cpu {

/// Attention of queries [q_heads, dim] over tokens [0, length) of residual
/// key codes and value codes (the file's contract). Codes are uint8 or
/// uint16 views [kv_heads, capacity, splits * stages]; centroids are [1 or
/// kv_heads, splits, stages, 2^bits, dsub]. out [q_heads, value dim]; lse
/// [q_heads] or empty. Throws `pqkv::error` naming the argument on any bad input.
template <class KCode, class VCode>
  requires(RqCode<std::remove_const_t<KCode>> && RqCode<std::remove_const_t<VCode>>)
void code_attention(query_view<float const> q,                     // [q_heads, dim]
                    rq_config const& key_cfg,
                    rq_centroids_view<float const> key_centroids,  // [1|kv_heads, splits, stages, ksub, dsub]
                    view<KCode, 3> key_codes,                      // [kv_heads, capacity, splits * stages]
                    rq_config const& value_cfg,
                    rq_centroids_view<float const> value_centroids,  // [1|kv_heads, splits, stages, ksub, dsub]
                    view<VCode, 3> value_codes,                      // [kv_heads, capacity, splits * stages]
                    index_t length,
                    view<float, 2> out,                            // [q_heads, value dim]
                    float scale = 0.f, std::span<float> lse = {})  // lse: [q_heads] or empty
{
  constexpr char const* where = "code_attention";
  using kcode = std::remove_const_t<KCode>;
  using vcode = std::remove_const_t<VCode>;
  key_cfg.validate(where);
  value_cfg.validate(where);
  index_t const kv_heads = key_codes.extent(0), capacity = key_codes.extent(1), q_heads = q.extent(0);
  index_t const dim = key_cfg.dim, dv = value_cfg.dim;
  PQKV_EXPECTS(kv_heads > 0, where, "key_codes.extent(0)=", kv_heads, " must be positive");
  PQKV_EXPECTS(q_heads > 0 && q_heads % kv_heads == 0, where, "q.extent(0)=", q_heads,
               " is not a positive multiple of kv_heads=", kv_heads);
  PQKV_EXPECTS(q.extent(1) == dim, where, "q.extent(1)=", q.extent(1), ", key_cfg.dim=", dim);
  PQKV_EXPECTS(q.data_handle() != nullptr, where, "q.data_handle() is null");
  pqkv::detail::rq::check_code_type<kcode>(key_cfg.bits, "code_attention (key_codes)");
  pqkv::detail::rq::check_code_type<vcode>(value_cfg.bits, "code_attention (value_codes)");
  PQKV_EXPECTS(key_codes.extent(2) == key_cfg.codes_per_row(), where, "key_codes.extent(2)=", key_codes.extent(2),
               ", key_cfg.splits * key_cfg.stages=", key_cfg.codes_per_row());
  PQKV_EXPECTS(value_codes.extent(0) == kv_heads && value_codes.extent(1) == capacity, where,
               "value_codes extents (", value_codes.extent(0), ", ", value_codes.extent(1),
               ") differ from key_codes' (", kv_heads, ", ", capacity, ")");
  PQKV_EXPECTS(value_codes.extent(2) == value_cfg.codes_per_row(), where, "value_codes.extent(2)=",
               value_codes.extent(2), ", value_cfg.splits * value_cfg.stages=", value_cfg.codes_per_row());
  PQKV_EXPECTS(key_codes.data_handle() != nullptr || element_count(key_codes) == 0, where,
               "key_codes.data_handle() is null");
  PQKV_EXPECTS(value_codes.data_handle() != nullptr || element_count(value_codes) == 0, where,
               "value_codes.data_handle() is null");
  PQKV_EXPECTS(length >= 0 && length <= capacity, where, "length=", length, " is outside [0, capacity=", capacity,
               "]");
  PQKV_EXPECTS(out.extent(0) == q_heads && out.extent(1) == dv, where, "out extents (", out.extent(0), ", ",
               out.extent(1), ") differ from (q_heads, value_cfg.dim)=(", q_heads, ", ", dv, ")");
  PQKV_EXPECTS(out.data_handle() != nullptr, where, "out.data_handle() is null");
  PQKV_EXPECTS(lse.empty() || static_cast<index_t>(lse.size()) == q_heads, where, "lse.size()=", lse.size(),
               ", q_heads=", q_heads);
  check_rq_centroids(key_centroids, key_cfg, kv_heads, "code_attention (key_centroids)");
  check_rq_centroids(value_centroids, value_cfg, kv_heads, "code_attention (value_centroids)");
  for (index_t h = 0; h < q_heads; ++h) {
    for (index_t d = 0; d < dim; ++d) {
      PQKV_EXPECTS(std::isfinite(q(h, d)), where, "q(", h, ", ", d, ")=", q(h, d), " is not finite");
    }
  }
  auto const kc = as_const(key_codes);
  auto const vc = as_const(value_codes);
  pqkv::detail::rq::check_code_values(kc, 0, length, key_cfg.ksub(), "code_attention (key_codes)");
  pqkv::detail::rq::check_code_values(vc, 0, length, value_cfg.ksub(), "code_attention (value_codes)");
  float const sc = pqkv::detail::attention_scale(scale, dim, where);

  index_t const r = q_heads / kv_heads;
  index_t const nk = key_cfg.codes_per_row(), ksub_k = key_cfg.ksub();
  index_t const nv = value_cfg.codes_per_row(), ksub_v = value_cfg.ksub(), dsub_v = value_cfg.dsub();
  index_t const stages_v = value_cfg.stages;
  parallel_for(q_heads, [&](index_t h) {
    index_t const g = h / r;
    index_t const hk = key_centroids.extent(0) == 1 ? 0 : g, hv = value_centroids.extent(0) == 1 ? 0 : g;
    if (length == 0) {
      for (index_t d = 0; d < dv; ++d) { out(h, d) = 0.f; }
      if (!lse.empty()) { lse[static_cast<std::size_t>(h)] = -std::numeric_limits<float>::infinity(); }
      return;
    }
    std::vector<float> qp(static_cast<std::size_t>(dim));
    std::vector<float> lut(static_cast<std::size_t>(nk * ksub_k));  // [splits * stages, ksub]
    pqkv::detail::rq::key_lut(q, h, key_cfg, key_centroids, hk, qp.data(), lut.data());
    std::vector<float> hist(static_cast<std::size_t>(nv * ksub_v), 0.f);  // [splits * stages, ksub]
    float m = -std::numeric_limits<float>::infinity(), l = 0.f;
    float logits[code_attention_tile];
    for (index_t t0 = 0; t0 < length; t0 += code_attention_tile) {
      index_t const cnt = std::min(code_attention_tile, length - t0);
      float m_tile = -std::numeric_limits<float>::infinity();
      for (index_t k = 0; k < cnt; ++k) {
        logits[k] = pqkv::detail::rq::key_logit(lut.data(), &kc(g, t0 + k, 0), nk, ksub_k, sc);
        m_tile = std::max(m_tile, logits[k]);
      }
      float const m_new = std::max(m, m_tile);
      float const alpha = std::exp(m - m_new);
      l *= alpha;
      if (alpha != 1.f) {
        for (float& x : hist) { x *= alpha; }
      }
      for (index_t k = 0; k < cnt; ++k) {
        float const p = std::exp(logits[k] - m_new);
        l += p;
        for (index_t n = 0; n < nv; ++n) { hist[static_cast<std::size_t>(n * ksub_v + vc(g, t0 + k, n))] += p; }
      }
      m = m_new;
    }
    // Channels in the inner loop (contiguous codewords); each channel's chain
    // still runs over (st, c) ascending as the contract says.
    std::vector<float> acc_v(static_cast<std::size_t>(dsub_v));
    float* const acc = acc_v.data();
    for (index_t s = 0; s < value_cfg.splits; ++s) {
      std::fill(acc_v.begin(), acc_v.end(), 0.f);
      for (index_t st = 0; st < stages_v; ++st) {
        float const* hrow = hist.data() + (s * stages_v + st) * ksub_v;
        for (index_t c = 0; c < ksub_v; ++c) {
          float const w = hrow[c];
          float const* cw = &value_centroids(hv, s, st, c, 0);
          for (index_t i = 0; i < dsub_v; ++i) { acc[i] = std::fma(w, cw[i], acc[i]); }
        }
      }
      for (index_t i = 0; i < dsub_v; ++i) { out(h, value_cfg.channel(s * dsub_v + i)) = acc[i] / l; }
    }
    if (!lse.empty()) { lse[static_cast<std::size_t>(h)] = m + std::log(l); }
  });
}

}  // namespace cpu
}  // namespace pqkv

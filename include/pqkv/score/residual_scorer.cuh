// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::gpu::rq_scorer`: the GPU counterpart of `cpu::rq_scorer`
/// (score/residual_scorer.hpp) for a batch of sequences. It scores residual
/// (VQKV-style) key codes through the key LUT and selects the top-k, and no
/// key row is ever rebuilt.
///
/// It runs `gpu::adc_topk`'s kernels. A row of splits * stages one-byte codes
/// is scored as m = splits * stages PQ codes, whose LUT row j holds
/// qp_split . C(split, stage, c), with split = j / stages and stage =
/// j % stages (qp: the query in the config's channel order). The contract is
/// the CPU scorer's, steps 1-7, per (sequence, KV head), and so are the
/// results:
/// - `gqa::sum`, `gqa::max`: the same selection and scores, bit for bit (the
///   LUT is the contract's fma chain; logits are summed in code order and
///   scaled, each operation rounded).
/// - `gqa::softmax_sum`: as `gpu::adc_topk`; scores may differ by a few ulp,
///   and selections may differ at near-ties only.
///
/// Calls behave like `gpu::adc_topk`'s:
/// - lengths are read on the device, the caller provides the workspace
///   (`workspace_bytes()`), and nothing is allocated or synchronized, so a
///   call can be captured in a CUDA graph;
/// - out[b][g] gets the selected token indices ascending, then -1;
/// - valid_counts[b][g] gets the number selected.
///
/// Layouts (row-major, device memory):
/// - queries [batch, q_heads, dim]: float, __half or __nv_bfloat16;
/// - codes [batch, kv_heads, capacity, splits * stages]: uint8, or a
///   `paged_codes` pool [pages, kv_heads, P, splits * stages] behind a block
///   table (the same results bit for bit);
/// - centroids [1|kv_heads, splits, stages, 2^bits, dsub]: float; extent 0
///   of 1 means one codebook shared by all KV heads.
///
/// Limits, checked at construction: bits <= 8 (one-byte codes); dim <= 512;
/// dsub <= 256; q_heads / kv_heads <= 8; and the group's LUT, splits *
/// stages * 2^bits * group floats, fits in one block's shared memory. For
/// 8-bit codes and a group of 4 that allows up to 56 codes a row.
///
/// Not checked (they live in device memory): queries and centroids must be
/// finite, and codes < 2^bits. A larger code is read modulo 2^bits, so memory
/// stays safe, but the scores are then not the reference's.

#include <pqkv/codebook/residual.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/detail/adc_topk_engine.cuh>
#include <pqkv/detail/channel_map.cuh>
#include <pqkv/score/adc_topk.cuh>
#include <pqkv/score/gqa.hpp>
#include <pqkv/score/lut.hpp>
#include <pqkv/score/paged_codes.hpp>

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <utility>

namespace pqkv::gpu {

/// Residual-code scoring + GQA aggregation + top-k on the GPU (the file's
/// contract). Built once per configuration; each call is one decode step.
/// Calls are const. It lives on the device current at construction, and
/// calls from another device throw.
template <GqaAggregation Aggregation = gqa::softmax_sum>
class rq_scorer {
 public:
  /// Validates key_cfg, the head counts, params and limits against the
  /// current device, and raises the kernels' shared-memory limits. Throws
  /// `pqkv::error` naming the first bad argument.
  rq_scorer(rq_config key_cfg, index_t q_heads, index_t kv_heads, selection_params const& params,
            adc_limits const& limits, Aggregation agg = {})
    : cfg_{validated(std::move(key_cfg), q_heads, kv_heads)},
      kv_heads_{kv_heads},
      channels_{pqkv::detail::rq_gpu::make_channel_map(cfg_)},
      engine_{layout_of(cfg_, q_heads, kv_heads), params, limits, agg, where}
  {
  }

  [[nodiscard]] rq_config const& config() const noexcept { return cfg_; }
  [[nodiscard]] selection_params const& params() const noexcept { return engine_.params(); }
  [[nodiscard]] adc_limits const& limits() const noexcept { return engine_.limits(); }
  /// The logit scale in use (params.scale, or 1/sqrt(dim) when that is 0).
  [[nodiscard]] float scale() const noexcept { return engine_.scale(); }
  /// The device the scorer was built on (calls must run there).
  [[nodiscard]] int device() const noexcept { return engine_.device(); }
  /// Bytes of scratch a call needs (16-byte aligned start).
  [[nodiscard]] std::size_t workspace_bytes() const noexcept { return engine_.workspace_bytes(); }

  /// Selects up to k tokens per (sequence, KV head). Throws `pqkv::error`
  /// before any launch on a shape mismatch, a batch or capacity over the
  /// limits, k > out.extent(2), a null or misaligned pointer, or a workspace
  /// that is too small.
  template <class Queries>
    requires AdcQueryView<Queries>
  void operator()(Queries queries,                               // [batch, q_heads, dim]
                  view<std::uint8_t const, 4> codes,             // [batch, kv_heads, capacity, splits * stages]
                  rq_centroids_view<float const> centroids,      // [1|kv_heads, splits, stages, 2^bits, dsub]
                  std::span<std::int32_t const> seq_lens,        // [batch]
                  view<std::int32_t, 3> out,                     // [batch, kv_heads, >= k]; ascending, -1 padded
                  view<std::int32_t, 2> valid_counts,            // [batch, kv_heads]
                  std::span<std::byte> workspace,                // workspace_bytes()
                  cudaStream_t stream) const
  {
    call(pqkv::as_const(queries), code_source{codes, {}}, centroids, seq_lens, out, valid_counts, {}, workspace,
         stream);
  }

  /// As above, and scores[b][g][i] gets the aggregated score of token
  /// out[b][g][i] (-inf where out is -1), as `gpu::adc_topk` gives it.
  template <class Queries>
    requires AdcQueryView<Queries>
  void operator()(Queries queries,                               // [batch, q_heads, dim]
                  view<std::uint8_t const, 4> codes,             // [batch, kv_heads, capacity, splits * stages]
                  rq_centroids_view<float const> centroids,      // [1|kv_heads, splits, stages, 2^bits, dsub]
                  std::span<std::int32_t const> seq_lens,        // [batch]
                  view<std::int32_t, 3> out,                     // [batch, kv_heads, >= k]
                  view<std::int32_t, 2> valid_counts,            // [batch, kv_heads]
                  view<float, 3> scores,                         // [batch, kv_heads, out.extent(2)]
                  std::span<std::byte> workspace,                // workspace_bytes()
                  cudaStream_t stream) const
  {
    PQKV_EXPECTS(scores.data_handle() != nullptr || element_count(scores) == 0, where, "scores.data_handle() is null");
    call(pqkv::as_const(queries), code_source{codes, {}}, centroids, seq_lens, out, valid_counts, scores, workspace,
         stream);
  }

  /// Codes in an engine's paged layout (`paged_codes`, score/paged_codes.hpp):
  /// token t of sequence b, head g is pool[block_table[b][t / P]][g][t % P],
  /// a row of splits * stages codes. The contiguous call's results, bit for bit.
  template <class Queries>
    requires AdcQueryView<Queries>
  void operator()(Queries queries,                               // [batch, q_heads, dim]
                  paged_codes const& codes,                      // pool [pages, kv_heads, P, splits * stages]
                  rq_centroids_view<float const> centroids,      // [1|kv_heads, splits, stages, 2^bits, dsub]
                  std::span<std::int32_t const> seq_lens,        // [batch]
                  view<std::int32_t, 3> out,                     // [batch, kv_heads, >= k]
                  view<std::int32_t, 2> valid_counts,            // [batch, kv_heads]
                  view<float, 3> scores,                         // [batch, kv_heads, out.extent(2)] or {}
                  std::span<std::byte> workspace,                // workspace_bytes()
                  cudaStream_t stream) const
  {
    PQKV_EXPECTS(scores.data_handle() != nullptr || element_count(scores) == 0, where, "scores.data_handle() is null");
    call(pqkv::as_const(queries), code_source{{}, &codes}, centroids, seq_lens, out, valid_counts, scores, workspace,
         stream);
  }

 private:
  static constexpr char const* where = "gpu::rq_scorer";
  using code_source = pqkv::detail::adc_gpu::code_source;

  static rq_config validated(rq_config cfg, index_t q_heads, index_t kv_heads)
  {
    cfg.validate(where);
    PQKV_EXPECTS(cfg.bits <= 8, where, "key_cfg.bits=", cfg.bits, " exceeds 8 (the GPU scorer reads uint8 codes)");
    PQKV_EXPECTS(cfg.dim <= pqkv::detail::rq_gpu::max_dim, where, "key_cfg.dim=", cfg.dim, " exceeds ",
                 pqkv::detail::rq_gpu::max_dim);
    PQKV_EXPECTS(cfg.dsub() <= pqkv::detail::max_lut_dsub, where, "key_cfg.dim / splits=", cfg.dsub(), " exceeds ",
                 pqkv::detail::max_lut_dsub);
    PQKV_EXPECTS(kv_heads > 0, where, "kv_heads=", kv_heads, " must be positive");
    PQKV_EXPECTS(q_heads > 0 && q_heads % kv_heads == 0, where, "q_heads=", q_heads,
                 " is not a positive multiple of kv_heads=", kv_heads);
    return cfg;
  }

  static pqkv::detail::adc_gpu::code_layout layout_of(rq_config const& cfg, index_t q_heads, index_t kv_heads)
  {
    return {.q_heads = q_heads, .kv_heads = kv_heads, .dim = cfg.dim, .m = cfg.codes_per_row(),
            .dsub = cfg.dsub(), .ksub = cfg.ksub(), .stages = cfg.stages};
  }

  template <class Query>
  void call(view<Query const, 3> queries, code_source const& codes, rq_centroids_view<float const> centroids,
            std::span<std::int32_t const> seq_lens, view<std::int32_t, 3> out, view<std::int32_t, 2> valid_counts,
            view<float, 3> scores, std::span<std::byte> workspace, cudaStream_t stream) const
  {
    // Device memory: shapes only, never the values.
    check_rq_centroids(centroids, cfg_, kv_heads_, where, false);
    engine_.run(queries, codes, centroids.data_handle(),
                centroids.extent(0) == 1, channels_, seq_lens, out, valid_counts, scores, workspace, stream, where);
  }

  rq_config cfg_;
  index_t kv_heads_;
  pqkv::detail::rq_gpu::channel_map channels_;
  pqkv::detail::adc_gpu::engine<Aggregation> engine_;
};

}  // namespace pqkv::gpu

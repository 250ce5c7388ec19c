// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::gpu::adc_topk`: the fused GPU PQ scorer of a decode step for a
/// batch of sequences. It follows the contract of `pqkv::cpu::adc_topk`
/// (score/adc_topk.hpp) and selects the same tokens:
/// - `gqa::sum`, `gqa::max`: the same logits, scores and selection, bit for bit
///   (the LUT is the contract's fma chain; the logit and aggregation steps are
///   rounded one by one with `__fadd_rn` / `__fmul_rn`).
/// - `gqa::softmax_sum`: the per-q-head max is exact; Z is summed in double in
///   another order and `expf` may differ from the host's by an ulp, so scores
///   may differ by a few ulp and selections may differ at near-ties only.
///
/// Per call, for every sequence b and KV head g: the candidates are the tokens
/// [sink, n_b - window) with n_b = seq_lens[b] read on the device (clamped to
/// [0, capacity]); k is clamped to their count on the device; out[b][g] gets
/// the selected token indices ascending, then -1; valid_counts[b][g] the
/// number selected.
///
/// Memory and ordering: the caller owns everything. The call allocates
/// nothing, never synchronizes and never reads device memory on the host, so
/// it can be captured in a CUDA graph and replayed while seq_lens grows. It is
/// one launch: each (sequence, KV head) row is scored by a cluster of blocks
/// that keep the LUT, the scores and the radix histograms in (distributed)
/// shared memory. Rows too long for shared memory keep one 32-bit rank key per
/// token and, for softmax policies, the r logits of every token in
/// `workspace` (`workspace_bytes()`). A workspace must not be shared by calls
/// that may run concurrently.
///
/// Determinism: the same inputs give the same outputs on the same device and
/// cluster size (every reduction has a fixed order).
///
/// Layouts (row-major): queries [batch, q_heads, dim] float, __half or
/// __nv_bfloat16 (widened to float exactly: the CPU reference on the widened
/// queries is the contract); codes [batch, kv_heads, capacity, m] uint8
/// (capacity is the codes' token extent, at most `limits.max_tokens`), or a
/// `paged_codes` (score/paged_codes.hpp: a page pool behind a block table,
/// capacity = max_pages_per_seq * page_size; the same results bit for bit);
/// centroids [kv_heads, m, ksub, dsub] float, one codebook per KV head shared
/// by the batch's sequences. Optional output: scores [batch, kv_heads,
/// out_k], the aggregated score of each selected token in the order of out,
/// -inf for padding.
///
/// Not checked (they live in device memory): queries and centroids must be
/// finite, and codes < ksub (a larger code is read modulo ksub, so memory
/// stays safe but the scores are then not the reference's); with paged
/// codes, the block-table entries of the pages below seq_lens[b] must lie in
/// [0, num_pages) (others are clamped to the last page: again memory-safe,
/// not the reference's scores).

#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/device_check.cuh>
#include <pqkv/core/error.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/detail/adc_topk_engine.cuh>
#include <pqkv/score/adc_topk.hpp>
#include <pqkv/score/gqa.hpp>
#include <pqkv/score/paged_codes.hpp>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <bit>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <type_traits>

namespace pqkv::gpu {

/// A query element type the scorer reads: float, __half or __nv_bfloat16
/// (widened to float, exactly, when the LUT is built).
template <class T>
concept AdcQueryElement = std::same_as<T, float> || std::same_as<T, __half> || std::same_as<T, __nv_bfloat16>;

/// A row-major [batch, q_heads, dim] view of queries of such a type.
template <class V>
concept AdcQueryView = std::same_as<V, view<typename V::element_type, 3>> &&
                       AdcQueryElement<std::remove_const_t<typename V::element_type>>;

/// Fused LUT + ADC scoring + GQA aggregation + top-k on the GPU, for a batch
/// of sequences (the file's contract). Built once per shape; each call is one
/// decode step, stream-ordered and graph-capturable. Calls are const; the
/// object may be shared by threads that give each call its own workspace.
/// Lives on the device current at construction; calls from another device
/// throw.
template <GqaAggregation Aggregation = gqa::softmax_sum>
class adc_topk {
 public:
  /// Validates the shape, params and limits against the current device (the
  /// group's LUT must fit in one block's shared memory; q_heads / kv_heads
  /// <= 8) and raises the kernels' shared-memory limit (a host call, once, so
  /// that calls stay capturable); throws `pqkv::error`. Calls must run on the
  /// device that was current here.
  adc_topk(adc_shape const& shape, selection_params const& params, adc_limits const& limits, Aggregation agg = {})
    : shape_{validated(shape)}, engine_{layout_of(shape_), params, limits, agg, "gpu::adc_topk"}
  {
  }

  [[nodiscard]] adc_shape const& shape() const noexcept { return shape_; }
  [[nodiscard]] selection_params const& params() const noexcept { return engine_.params(); }
  [[nodiscard]] adc_limits const& limits() const noexcept { return engine_.limits(); }
  /// The logit scale in use (params.scale, or 1/sqrt(dim) when that is 0).
  [[nodiscard]] float scale() const noexcept { return engine_.scale(); }
  /// The device the selector was built on (calls must run there).
  [[nodiscard]] int device() const noexcept { return engine_.device(); }
  /// Bytes of scratch a call needs (16-byte aligned start).
  [[nodiscard]] std::size_t workspace_bytes() const noexcept { return engine_.workspace_bytes(); }
  /// Candidate tokens one block of the score kernel takes (the split of each row).
  [[nodiscard]] index_t chunk_tokens() const noexcept { return engine_.chunk_tokens(); }
  /// Blocks that select one row in a call over `batch` sequences: the largest
  /// cluster size within limits.max_cluster such that rows * size <= SMs and
  /// all rows' clusters run at once.
  [[nodiscard]] int cluster_blocks(index_t batch) const noexcept { return engine_.cluster_blocks(batch); }
  /// How many clusters of `size` blocks (1..16) the device runs at once with
  /// the select kernel's largest shared-memory use (0: none fits).
  [[nodiscard]] int active_clusters(int size) const noexcept { return engine_.active_clusters(size); }

  /// Selects up to k tokens per (sequence, KV head); see the file's contract.
  /// Queries are float, __half or __nv_bfloat16 (any constness).
  /// Throws `pqkv::error` before any launch on a shape mismatch, a batch or
  /// capacity over the limits, k > out.extent(2), a null or misaligned
  /// pointer, or a workspace that is too small.
  template <class Queries>
    requires AdcQueryView<Queries>
  void operator()(Queries queries,                           // [batch, q_heads, dim], device
                  view<std::uint8_t const, 4> codes,         // [batch, kv_heads, capacity, m], device
                  centroids_view<float const> centroids,     // [kv_heads, m, ksub, dsub], device
                  std::span<std::int32_t const> seq_lens,    // [batch], device
                  view<std::int32_t, 3> out,                 // [batch, kv_heads, >= k], device; ascending, -1 padded
                  view<std::int32_t, 2> valid_counts,        // [batch, kv_heads], device
                  std::span<std::byte> workspace,            // workspace_bytes(), device
                  cudaStream_t stream) const
  {
    call(pqkv::as_const(queries), code_source{codes, {}}, centroids, seq_lens, out, valid_counts, {}, workspace, stream);
  }

  /// As above, and scores[b][g][i] gets the aggregated score of token
  /// out[b][g][i] (-inf where out is -1). For gqa::sum and gqa::max it is the
  /// CPU reference's score bit for bit (-0.0 reads back as +0.0); for
  /// softmax policies it is the GPU's own softmax score (a few ulp from the
  /// CPU's).
  template <class Queries>
    requires AdcQueryView<Queries>
  void operator()(Queries queries,                           // [batch, q_heads, dim], device
                  view<std::uint8_t const, 4> codes,         // [batch, kv_heads, capacity, m], device
                  centroids_view<float const> centroids,     // [kv_heads, m, ksub, dsub], device
                  std::span<std::int32_t const> seq_lens,    // [batch], device
                  view<std::int32_t, 3> out,                 // [batch, kv_heads, >= k], device
                  view<std::int32_t, 2> valid_counts,        // [batch, kv_heads], device
                  view<float, 3> scores,                     // [batch, kv_heads, out.extent(2)], device
                  std::span<std::byte> workspace,            // workspace_bytes(), device
                  cudaStream_t stream) const
  {
    PQKV_EXPECTS(scores.data_handle() != nullptr || element_count(scores) == 0, "gpu::adc_topk",
                 "scores.data_handle() is null");
    call(pqkv::as_const(queries), code_source{codes, {}}, centroids, seq_lens, out, valid_counts, scores, workspace,
         stream);
  }

  /// Selects from codes in an engine's paged layout (`paged_codes`): token t
  /// of sequence b, head g is pool[block_table[b][t / P]][g][t % P]; the
  /// capacity is max_pages_per_seq * P. Selections and scores are those of
  /// the contiguous call on the same codes, bit for bit.
  template <class Queries>
    requires AdcQueryView<Queries>
  void operator()(Queries queries,                           // [batch, q_heads, dim], device
                  paged_codes const& codes,                  // pool [pages, kv_heads, P, m], table [batch, pages/seq]
                  centroids_view<float const> centroids,     // [kv_heads, m, ksub, dsub], device
                  std::span<std::int32_t const> seq_lens,    // [batch], device
                  view<std::int32_t, 3> out,                 // [batch, kv_heads, >= k], device
                  view<std::int32_t, 2> valid_counts,        // [batch, kv_heads], device
                  std::span<std::byte> workspace,            // workspace_bytes(), device
                  cudaStream_t stream) const
  {
    call(pqkv::as_const(queries), code_source{{}, &codes}, centroids, seq_lens, out, valid_counts, {}, workspace, stream);
  }

  /// Paged codes with the scores output (see the overloads above).
  template <class Queries>
    requires AdcQueryView<Queries>
  void operator()(Queries queries,                           // [batch, q_heads, dim], device
                  paged_codes const& codes,                  // pool [pages, kv_heads, P, m], table [batch, pages/seq]
                  centroids_view<float const> centroids,     // [kv_heads, m, ksub, dsub], device
                  std::span<std::int32_t const> seq_lens,    // [batch], device
                  view<std::int32_t, 3> out,                 // [batch, kv_heads, >= k], device
                  view<std::int32_t, 2> valid_counts,        // [batch, kv_heads], device
                  view<float, 3> scores,                     // [batch, kv_heads, out.extent(2)], device
                  std::span<std::byte> workspace,            // workspace_bytes(), device
                  cudaStream_t stream) const
  {
    PQKV_EXPECTS(scores.data_handle() != nullptr || element_count(scores) == 0, "gpu::adc_topk",
                 "scores.data_handle() is null");
    call(pqkv::as_const(queries), code_source{{}, &codes}, centroids, seq_lens, out, valid_counts, scores, workspace,
         stream);
  }

 private:
  using code_source = pqkv::detail::adc_gpu::code_source;

  static adc_shape const& validated(adc_shape const& shape)
  {
    constexpr char const* where = "gpu::adc_topk";
    shape.validate(where);
    return shape;
  }

  static pqkv::detail::adc_gpu::code_layout layout_of(adc_shape const& shape)
  {
    return {.q_heads = shape.q_heads, .kv_heads = shape.kv_heads, .dim = shape.dim, .m = shape.m,
            .dsub = shape.dsub(), .ksub = shape.ksub(), .stages = 1};
  }

  template <class Query>
  void call(view<Query const, 3> queries, code_source const& src, centroids_view<float const> centroids,
            std::span<std::int32_t const> seq_lens, view<std::int32_t, 3> out, view<std::int32_t, 2> valid_counts,
            view<float, 3> scores, std::span<std::byte> workspace, cudaStream_t stream) const
  {
    constexpr char const* where = "gpu::adc_topk";
    check_centroids(centroids, shape_.config(), shape_.kv_heads, where);
    engine_.run(queries, src, centroids.data_handle(), false, pqkv::detail::adc_gpu::identity_channels{}, seq_lens,
                out, valid_counts, scores, workspace, stream, where);
  }

  adc_shape shape_;
  pqkv::detail::adc_gpu::engine<Aggregation> engine_;
};

}  // namespace pqkv::gpu

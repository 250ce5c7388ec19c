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
#include <pqkv/detail/adc_topk_kernels.cuh>
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

/// The largest batch and sequence capacity one `adc_topk` serves (they size
/// the workspace), and tuning.
struct adc_limits {
  index_t max_batch = 1;          ///< sequences per call
  index_t max_tokens = 131072;    ///< codes.extent(2) (token capacity) per call
  /// Tuning: blocks per SM that a full batch's split of the tokens into
  /// chunks aims for in the score kernel.
  int blocks_per_sm = 4;
  /// Tuning: most blocks in the cluster that selects one row (1..16; the
  /// device may allow less).
  int max_cluster = 16;
  /// Tuning: the select kernel keeps a block's keys in shared memory when
  /// its slice fits (else, and when false, in the workspace).
  bool shared_store = true;

  /// Throws `pqkv::error` naming the first field out of range.
  void validate(char const* where = "adc_limits") const
  {
    PQKV_EXPECTS(max_batch > 0, where, "limits.max_batch=", max_batch, " must be positive");
    PQKV_EXPECTS(max_tokens > 0, where, "limits.max_tokens=", max_tokens, " must be positive");
    PQKV_EXPECTS(max_tokens <= index_t{std::numeric_limits<std::int32_t>::max()}, where, "limits.max_tokens=",
                 max_tokens, " exceeds the int32 token range");
    PQKV_EXPECTS(blocks_per_sm > 0 && blocks_per_sm <= 64, where, "limits.blocks_per_sm=", blocks_per_sm,
                 " is outside [1, 64]");
    PQKV_EXPECTS(max_cluster >= 1 && max_cluster <= 16, where, "limits.max_cluster=", max_cluster,
                 " is outside [1, 16]");
  }
};

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
    : shape_{shape}, params_{params}, limits_{limits}, agg_{agg}
  {
    constexpr char const* where = "gpu::adc_topk";
    shape_.validate(where);
    params_.validate(where);
    limits_.validate(where);
    namespace kern = pqkv::detail::adc_gpu;
    PQKV_EXPECTS(shape_.group() <= kern::max_group, where, "q_heads / kv_heads=", shape_.group(), " exceeds ",
                 kern::max_group);
    PQKV_EXPECTS(limits_.max_batch * shape_.kv_heads <= 65535, where, "limits.max_batch * kv_heads=",
                 limits_.max_batch * shape_.kv_heads, " exceeds 65535 rows");
    scale_ = params_.resolved_scale(shape_.dim);

    int smem_optin = 0;
    PQKV_CUDA_TRY(cudaGetDevice(&device_));
    PQKV_CUDA_TRY(cudaDeviceGetAttribute(&sms_, cudaDevAttrMultiProcessorCount, device_));
    PQKV_CUDA_TRY(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device_));
    // The score kernel holds one row's LUT in shared memory.
    std::size_t const lut_bytes = static_cast<std::size_t>(shape_.m) * shape_.ksub() * shape_.group() * sizeof(float);
    PQKV_EXPECTS(lut_bytes + 1024 <= static_cast<std::size_t>(smem_optin), where, "the group's LUT (m=", shape_.m,
                 ", ksub=", shape_.ksub(), ", q_heads / kv_heads=", shape_.group(), ") needs ", lut_bytes,
                 " bytes of shared memory; the device allows ", smem_optin);
    auto const select_max = static_cast<std::size_t>(smem_optin - kern::select_static_smem<Aggregation>());
    kern::prepare_kernels<Aggregation>(static_cast<int>(lut_bytes), static_cast<int>(select_max));
    max_store_tokens_ = static_cast<index_t>((select_max - kern::select_smem::bytes(0)) / sizeof(std::uint32_t));
    active_clusters_[1] = std::numeric_limits<int>::max();
    for (int c = 2; c <= limits_.max_cluster; ++c) {
      active_clusters_[c] = kern::active_clusters<Aggregation>(c, select_max);
    }

    // Split each row's tokens for the score kernel so that a full batch
    // gives a few blocks per SM.
    index_t const rows = limits_.max_batch * shape_.kv_heads;
    index_t const target_blocks = static_cast<index_t>(sms_) * limits_.blocks_per_sm;
    index_t const chunks_per_row = target_blocks / rows > 1 ? target_blocks / rows : 1;
    index_t chunk = (limits_.max_tokens + chunks_per_row - 1) / chunks_per_row;
    chunk = (chunk + 1023) / 1024 * 1024;
    chunk_tokens_ = chunk;
    max_chunks_ = (limits_.max_tokens + chunk_tokens_ - 1) / chunk_tokens_;
    layout_ = kern::workspace_layout::make(rows, static_cast<int>(shape_.group()), static_cast<int>(shape_.m),
                                           static_cast<int>(shape_.ksub()), limits_.max_tokens, max_chunks_,
                                           Aggregation::needs_softmax);
  }

  [[nodiscard]] adc_shape const& shape() const noexcept { return shape_; }
  [[nodiscard]] selection_params const& params() const noexcept { return params_; }
  [[nodiscard]] adc_limits const& limits() const noexcept { return limits_; }
  /// The logit scale in use (params.scale, or 1/sqrt(dim) when that is 0).
  [[nodiscard]] float scale() const noexcept { return scale_; }
  /// The device the selector was built on (calls must run there).
  [[nodiscard]] int device() const noexcept { return device_; }
  /// Bytes of scratch a call needs (16-byte aligned start).
  [[nodiscard]] std::size_t workspace_bytes() const noexcept { return layout_.total; }
  /// Candidate tokens one block of the score kernel takes (the split of each row).
  [[nodiscard]] index_t chunk_tokens() const noexcept { return chunk_tokens_; }
  /// Blocks that select one row in a call over `batch` sequences: the largest
  /// cluster size within limits.max_cluster such that rows * size <= SMs and
  /// all rows' clusters run at once.
  [[nodiscard]] int cluster_blocks(index_t batch) const noexcept
  {
    index_t const rows = batch * shape_.kv_heads;
    auto const budget = static_cast<index_t>(sms_);
    int best = 1;
    for (int c = 2; c <= limits_.max_cluster; ++c) {
      if (rows * c <= budget && rows <= active_clusters_[c]) { best = c; }
    }
    return best;
  }
  /// How many clusters of `size` blocks (1..16) the device runs at once with
  /// the select kernel's largest shared-memory use (0: none fits).
  [[nodiscard]] int active_clusters(int size) const noexcept
  {
    return size >= 1 && size <= limits_.max_cluster ? active_clusters_[size] : 0;
  }

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
  /// Contiguous codes, or (paged != null) paged ones.
  struct code_source {
    view<std::uint8_t const, 4> contiguous;
    paged_codes const* paged = nullptr;
  };

  /// Validates the codes against the shape and batch; returns their capacity.
  index_t check_codes(code_source const& src, index_t batch, char const* where) const
  {
    // The score kernel reads a token's m code bytes as one vector when m is a
    // power of two up to 32: every byte offset of a row must keep that alignment.
    bool const vector_m = shape_.m == 1 || shape_.m == 2 || shape_.m == 4 || shape_.m == 8 || shape_.m == 16 ||
                          shape_.m == 32;
    auto const code_align = vector_m ? static_cast<std::uintptr_t>(shape_.m <= 16 ? shape_.m : 16) : 1u;
    index_t capacity = 0;
    if (src.paged == nullptr) {
      auto const& codes = src.contiguous;
      PQKV_EXPECTS(codes.extent(0) == batch, where, "codes.extent(0)=", codes.extent(0), ", batch=", batch);
      PQKV_EXPECTS(codes.extent(1) == shape_.kv_heads, where, "codes.extent(1)=", codes.extent(1),
                   ", shape.kv_heads=", shape_.kv_heads);
      PQKV_EXPECTS(codes.extent(3) == shape_.m, where, "codes.extent(3)=", codes.extent(3), ", shape.m=", shape_.m);
      capacity = codes.extent(2);
      PQKV_EXPECTS(capacity <= limits_.max_tokens, where, "codes.extent(2)=", capacity,
                   " exceeds limits.max_tokens=", limits_.max_tokens);
      if (batch > 0) {
        PQKV_EXPECTS(codes.data_handle() != nullptr || capacity == 0, where, "codes.data_handle() is null");
        PQKV_EXPECTS(reinterpret_cast<std::uintptr_t>(codes.data_handle()) % code_align == 0, where,
                     "codes.data_handle() is not aligned to ", code_align, " bytes (m=", shape_.m, ")");
      }
      return capacity;
    }
    auto const& pool = src.paged->pool;
    auto const& table = src.paged->block_table;
    PQKV_EXPECTS(pool.extent(1) == shape_.kv_heads, where, "codes.pool.extent(1)=", pool.extent(1),
                 ", shape.kv_heads=", shape_.kv_heads);
    PQKV_EXPECTS(pool.extent(3) == shape_.m, where, "codes.pool.extent(3)=", pool.extent(3), ", shape.m=", shape_.m);
    PQKV_EXPECTS(pool.extent(2) > 0, where, "codes.pool.extent(2) (page_size)=", pool.extent(2),
                 " must be positive");
    PQKV_EXPECTS(pool.stride(3) == 1 || shape_.m == 1, where, "codes.pool.stride(3)=", pool.stride(3),
                 " must be 1 (a token's m codes are contiguous)");
    PQKV_EXPECTS(table.extent(0) == batch, where, "codes.block_table.extent(0)=", table.extent(0), ", batch=",
                 batch);
    capacity = src.paged->capacity();
    PQKV_EXPECTS(capacity <= limits_.max_tokens, where, "codes.block_table.extent(1)=", table.extent(1),
                 " * page_size=", pool.extent(2), " = ", capacity, " exceeds limits.max_tokens=", limits_.max_tokens);
    if (batch == 0 || capacity == 0) { return capacity; }
    PQKV_EXPECTS(pool.extent(0) > 0, where, "codes.pool.extent(0) (num_pages)=", pool.extent(0),
                 " must be positive");
    PQKV_EXPECTS(pool.extent(0) - 1 <= index_t{std::numeric_limits<std::int32_t>::max()}, where,
                 "codes.pool.extent(0) (num_pages)=", pool.extent(0), " exceeds the int32 page range");
    PQKV_EXPECTS(pool.data_handle() != nullptr, where, "codes.pool.data_handle() is null");
    PQKV_EXPECTS(table.data_handle() != nullptr, where, "codes.block_table.data_handle() is null");
    PQKV_EXPECTS(reinterpret_cast<std::uintptr_t>(pool.data_handle()) % code_align == 0, where,
                 "codes.pool.data_handle() is not aligned to ", code_align, " bytes (m=", shape_.m, ")");
    for (std::size_t d = 0; d < 3; ++d) {
      PQKV_EXPECTS(static_cast<std::uintptr_t>(pool.stride(d)) % code_align == 0, where, "codes.pool.stride(", d,
                   ")=", pool.stride(d), " is not a multiple of ", code_align, " bytes (m=", shape_.m, ")");
    }
    return capacity;
  }

  template <class Query>
  void call(view<Query const, 3> queries, code_source const& src, centroids_view<float const> centroids,
            std::span<std::int32_t const> seq_lens, view<std::int32_t, 3> out, view<std::int32_t, 2> valid_counts,
            view<float, 3> scores, std::span<std::byte> workspace, cudaStream_t stream) const
  {
    constexpr char const* where = "gpu::adc_topk";
    pqkv::detail::gpu_check::expect_current_device(device_, where);
    namespace kern = pqkv::detail::adc_gpu;
    index_t const batch = queries.extent(0);
    PQKV_EXPECTS(batch <= limits_.max_batch, where, "queries.extent(0)=", batch, " exceeds limits.max_batch=",
                 limits_.max_batch);
    PQKV_EXPECTS(queries.extent(1) == shape_.q_heads, where, "queries.extent(1)=", queries.extent(1),
                 ", shape.q_heads=", shape_.q_heads);
    PQKV_EXPECTS(queries.extent(2) == shape_.dim, where, "queries.extent(2)=", queries.extent(2), ", shape.dim=",
                 shape_.dim);
    index_t const capacity = check_codes(src, batch, where);
    check_centroids(centroids, shape_.config(), shape_.kv_heads, where);
    PQKV_EXPECTS(static_cast<index_t>(seq_lens.size()) == batch, where, "seq_lens.size()=", seq_lens.size(),
                 ", batch=", batch);
    PQKV_EXPECTS(out.extent(0) == batch && out.extent(1) == shape_.kv_heads, where, "out extents (", out.extent(0),
                 ", ", out.extent(1), ", ", out.extent(2), ") differ from (batch, kv_heads, k)=(", batch, ", ",
                 shape_.kv_heads, ", ", params_.k, ")");
    PQKV_EXPECTS(params_.k <= out.extent(2), where, "params.k=", params_.k, " exceeds out.extent(2)=", out.extent(2));
    PQKV_EXPECTS(out.extent(2) <= index_t{std::numeric_limits<std::int32_t>::max()}, where, "out.extent(2)=",
                 out.extent(2), " exceeds the int32 range");
    PQKV_EXPECTS(valid_counts.extent(0) == batch && valid_counts.extent(1) == shape_.kv_heads, where,
                 "valid_counts extents (", valid_counts.extent(0), ", ", valid_counts.extent(1),
                 ") differ from (batch, kv_heads)=(", batch, ", ", shape_.kv_heads, ")");
    bool const want_scores = scores.data_handle() != nullptr;
    if (want_scores) {
      PQKV_EXPECTS(scores.extent(0) == out.extent(0) && scores.extent(1) == out.extent(1) &&
                     scores.extent(2) == out.extent(2),
                   where, "scores extents (", scores.extent(0), ", ", scores.extent(1), ", ", scores.extent(2),
                   ") differ from out's (", out.extent(0), ", ", out.extent(1), ", ", out.extent(2), ")");
    }
    if (batch == 0) { return; }
    PQKV_EXPECTS(queries.data_handle() != nullptr, where, "queries.data_handle() is null");
    PQKV_EXPECTS(seq_lens.data() != nullptr, where, "seq_lens.data() is null");
    PQKV_EXPECTS(out.data_handle() != nullptr || out.extent(2) == 0, where, "out.data_handle() is null");
    PQKV_EXPECTS(valid_counts.data_handle() != nullptr, where, "valid_counts.data_handle() is null");
    PQKV_EXPECTS(workspace.size() >= layout_.total, where, "workspace.size()=", workspace.size(), " < workspace_bytes()=",
                 layout_.total);
    PQKV_EXPECTS(workspace.data() != nullptr, where, "workspace.data() is null");
    PQKV_EXPECTS(reinterpret_cast<std::uintptr_t>(workspace.data()) % 16 == 0, where,
                 "workspace.data() is not 16-byte aligned");
    if (capacity == 0) {
      // No token can be a candidate: only the padding and zero counts remain.
      PQKV_CUDA_TRY(cudaMemsetAsync(valid_counts.data_handle(), 0,
                                    static_cast<std::size_t>(batch * shape_.kv_heads) * sizeof(std::int32_t),
                                    stream));
      if (out.extent(2) > 0) {
        PQKV_CUDA_TRY(cudaMemsetAsync(out.data_handle(), 0xFF,
                                      static_cast<std::size_t>(element_count(out)) * sizeof(std::int32_t), stream));
      }
      if (want_scores) {
        kern::fill_async(scores.data_handle(), static_cast<std::size_t>(element_count(scores)),
                         -std::numeric_limits<float>::infinity(), stream);
      }
      return;
    }

    std::byte* ws = workspace.data();
    kern::args a{};
    a.q = queries.data_handle();
    a.centroids = centroids.data_handle();
    a.seq_lens = seq_lens.data();
    a.out = out.data_handle();
    a.valid = valid_counts.data_handle();
    a.scores = want_scores ? scores.data_handle() : nullptr;
    if (src.paged == nullptr) {
      a.codes = src.contiguous.data_handle();
    } else {
      auto const& pool = src.paged->pool;
      a.codes = pool.data_handle();
      a.block_table = src.paged->block_table.data_handle();
      a.table_pages = src.paged->max_pages_per_seq();
      a.page_stride = pool.stride(0);
      a.head_stride = pool.stride(1);
      a.token_stride = pool.stride(2);
      a.last_page = static_cast<std::uint32_t>(pool.extent(0) - 1);
      a.page_size = static_cast<int>(pool.extent(2));
      a.page_shift = std::has_single_bit(static_cast<std::uint64_t>(a.page_size))
                       ? std::countr_zero(static_cast<std::uint64_t>(a.page_size))
                       : -1;
    }
    a.lut = reinterpret_cast<float*>(ws + layout_.lut);
    a.keys = reinterpret_cast<std::uint32_t*>(ws + layout_.keys);
    a.hist = reinterpret_cast<std::uint32_t*>(ws + layout_.hist);
    a.logits = reinterpret_cast<float*>(ws + layout_.logits);
    a.part_max = reinterpret_cast<float*>(ws + layout_.part_max);
    a.part_sum = reinterpret_cast<double*>(ws + layout_.part_sum);
    a.capacity = capacity;
    a.sink = params_.sink;
    a.window = params_.window;
    a.q_heads = static_cast<int>(shape_.q_heads);
    a.kv_heads = static_cast<int>(shape_.kv_heads);
    a.r = static_cast<int>(shape_.group());
    a.dim = static_cast<int>(shape_.dim);
    a.m = static_cast<int>(shape_.m);
    a.dsub = static_cast<int>(shape_.dsub());
    a.ksub = static_cast<int>(shape_.ksub());
    a.k = static_cast<int>(params_.k);
    a.out_k = static_cast<int>(out.extent(2));
    a.chunk_tokens = static_cast<int>(chunk_tokens_);
    a.max_chunks = static_cast<int>(max_chunks_);
    a.scale = scale_;
    // A select block's slice is at most ceil(capacity / cluster) tokens; its
    // keys stay in shared memory when that bound fits.
    int const cluster = cluster_blocks(batch);
    index_t const slice = (capacity + cluster - 1) / cluster;
    a.store_tokens = limits_.shared_store && slice <= max_store_tokens_ ? static_cast<int>(slice) : 0;
    auto const chunks = static_cast<int>((capacity + chunk_tokens_ - 1) / chunk_tokens_);
    kern::launch<Query>(a, agg_, static_cast<unsigned>(batch * shape_.kv_heads), chunks, cluster, stream);
  }

  adc_shape shape_;
  selection_params params_;
  adc_limits limits_;
  Aggregation agg_;
  float scale_ = 1.f;
  int device_ = 0;  // current at construction: kernel limits, SMs and cluster occupancy are its own
  int sms_ = 132;
  int active_clusters_[17] = {};  ///< [c]: clusters of c blocks that run at once
  index_t max_store_tokens_ = 0;
  index_t chunk_tokens_ = 1024;
  index_t max_chunks_ = 1;
  pqkv::detail::adc_gpu::workspace_layout layout_{};
};

}  // namespace pqkv::gpu

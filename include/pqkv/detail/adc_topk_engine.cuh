// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file The engine behind `pqkv::gpu::adc_topk` (score/adc_topk.cuh) and
/// `pqkv::gpu::rq_scorer` (score/residual_scorer.cuh): sizing (score chunks,
/// select clusters, workspace), the checks every call shares, and the
/// launch. Each facade validates its own codebook and describes its codes as
/// a `code_layout`. Users never name this header.

#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/device_check.cuh>
#include <pqkv/core/error.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/detail/adc_topk_kernels.cuh>
#include <pqkv/score/adc_topk.hpp>
#include <pqkv/score/paged_codes.hpp>

#include <cuda_runtime_api.h>

#include <bit>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>

namespace pqkv::gpu {

/// The largest batch and sequence capacity one GPU scorer serves (they size
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

}  // namespace pqkv::gpu

namespace pqkv::detail::adc_gpu {

/// A scorer's codes as the kernels see them: m one-byte codes a token, code
/// j's LUT row built from dsub query channels (split j / stages, stage j %
/// stages; PQ: stages 1, one subspace a code).
struct code_layout {
  index_t q_heads = 0, kv_heads = 0, dim = 0;
  index_t m = 0;     ///< codes per token
  index_t dsub = 0;  ///< query channels per code
  index_t ksub = 0;  ///< LUT entries per code
  int stages = 1;
  [[nodiscard]] index_t group() const noexcept { return kv_heads > 0 ? q_heads / kv_heads : 0; }
};

/// Contiguous codes, or (paged != null) paged ones.
struct code_source {
  view<std::uint8_t const, 4> contiguous;
  paged_codes const* paged = nullptr;
};

/// Sizes, checks and launches one scorer's calls (see the file comment).
template <class Aggregation>
class engine {
 public:
  /// Validates params, limits and the group size against the current
  /// device (the group's LUT must fit in one block's shared memory) and
  /// raises the kernels' shared-memory limits; throws `pqkv::error` naming
  /// `where`.
  engine(code_layout const& codes, selection_params const& params, ::pqkv::gpu::adc_limits const& limits, Aggregation agg,
         char const* where)
    : codes_{codes}, params_{params}, limits_{limits}, agg_{agg}
  {
    params_.validate(where);
    limits_.validate(where);
    PQKV_EXPECTS(codes_.group() <= max_group, where, "q_heads / kv_heads=", codes_.group(), " exceeds ",
                 max_group);
    PQKV_EXPECTS(limits_.max_batch * codes_.kv_heads <= 65535, where, "limits.max_batch * kv_heads=",
                 limits_.max_batch * codes_.kv_heads, " exceeds 65535 rows");
    scale_ = params_.resolved_scale(codes_.dim);

    int smem_optin = 0;
    PQKV_CUDA_TRY(cudaGetDevice(&device_));
    PQKV_CUDA_TRY(cudaDeviceGetAttribute(&sms_, cudaDevAttrMultiProcessorCount, device_));
    PQKV_CUDA_TRY(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device_));
    // The score kernel holds one row's LUT in shared memory.
    std::size_t const lut_bytes = static_cast<std::size_t>(codes_.m) * codes_.ksub * codes_.group() * sizeof(float);
    PQKV_EXPECTS(lut_bytes + 1024 <= static_cast<std::size_t>(smem_optin), where, "the group's LUT (m=", codes_.m,
                 ", ksub=", codes_.ksub, ", q_heads / kv_heads=", codes_.group(), ") needs ", lut_bytes,
                 " bytes of shared memory; the device allows ", smem_optin);
    auto const select_max = static_cast<std::size_t>(smem_optin - select_static_smem<Aggregation>());
    prepare_kernels<Aggregation>(static_cast<int>(lut_bytes), static_cast<int>(select_max));
    max_store_tokens_ = static_cast<index_t>((select_max - select_smem::bytes(0)) / sizeof(std::uint32_t));
    active_clusters_[1] = std::numeric_limits<int>::max();
    for (int c = 2; c <= limits_.max_cluster; ++c) {
      active_clusters_[c] = adc_gpu::active_clusters<Aggregation>(c, select_max);
    }

    // Split each row's tokens for the score kernel so that a full batch
    // gives a few blocks per SM.
    index_t const rows = limits_.max_batch * codes_.kv_heads;
    index_t const target_blocks = static_cast<index_t>(sms_) * limits_.blocks_per_sm;
    index_t const chunks_per_row = target_blocks / rows > 1 ? target_blocks / rows : 1;
    index_t chunk = (limits_.max_tokens + chunks_per_row - 1) / chunks_per_row;
    chunk = (chunk + 1023) / 1024 * 1024;
    chunk_tokens_ = chunk;
    max_chunks_ = (limits_.max_tokens + chunk_tokens_ - 1) / chunk_tokens_;
    ws_ = workspace_layout::make(rows, static_cast<int>(codes_.group()), static_cast<int>(codes_.m),
                                 static_cast<int>(codes_.ksub), limits_.max_tokens, max_chunks_,
                                 Aggregation::needs_softmax);
  }

  [[nodiscard]] selection_params const& params() const noexcept { return params_; }
  [[nodiscard]] ::pqkv::gpu::adc_limits const& limits() const noexcept { return limits_; }
  /// The logit scale in use (params.scale, or 1/sqrt(dim) when that is 0).
  [[nodiscard]] float scale() const noexcept { return scale_; }
  /// The device the selector was built on (calls must run there).
  [[nodiscard]] int device() const noexcept { return device_; }
  /// Bytes of scratch a call needs (16-byte aligned start).
  [[nodiscard]] std::size_t workspace_bytes() const noexcept { return ws_.total; }
  /// Candidate tokens one block of the score kernel takes (the split of each row).
  [[nodiscard]] index_t chunk_tokens() const noexcept { return chunk_tokens_; }
  /// Blocks that select one row in a call over `batch` sequences: the largest
  /// cluster size within limits.max_cluster such that rows * size <= SMs and
  /// all rows' clusters run at once.
  [[nodiscard]] int cluster_blocks(index_t batch) const noexcept
  {
    index_t const rows = batch * codes_.kv_heads;
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

  /// Validates the codes against the shape and batch; returns their capacity.
  index_t check_codes(code_source const& src, index_t batch, char const* where) const
  {
    // The score kernel reads a token's m code bytes as one vector when m is a
    // power of two up to 32: every byte offset of a row must keep that alignment.
    bool const vector_m = codes_.m == 1 || codes_.m == 2 || codes_.m == 4 || codes_.m == 8 || codes_.m == 16 ||
                          codes_.m == 32;
    auto const code_align = vector_m ? static_cast<std::uintptr_t>(codes_.m <= 16 ? codes_.m : 16) : 1u;
    index_t capacity = 0;
    if (src.paged == nullptr) {
      auto const& codes = src.contiguous;
      PQKV_EXPECTS(codes.extent(0) == batch, where, "codes.extent(0)=", codes.extent(0), ", batch=", batch);
      PQKV_EXPECTS(codes.extent(1) == codes_.kv_heads, where, "codes.extent(1)=", codes.extent(1),
                   ", kv_heads=", codes_.kv_heads);
      PQKV_EXPECTS(codes.extent(3) == codes_.m, where, "codes.extent(3)=", codes.extent(3), ", m=", codes_.m);
      capacity = codes.extent(2);
      PQKV_EXPECTS(capacity <= limits_.max_tokens, where, "codes.extent(2)=", capacity,
                   " exceeds limits.max_tokens=", limits_.max_tokens);
      if (batch > 0) {
        PQKV_EXPECTS(codes.data_handle() != nullptr || capacity == 0, where, "codes.data_handle() is null");
        PQKV_EXPECTS(reinterpret_cast<std::uintptr_t>(codes.data_handle()) % code_align == 0, where,
                     "codes.data_handle() is not aligned to ", code_align, " bytes (m=", codes_.m, ")");
      }
      return capacity;
    }
    auto const& pool = src.paged->pool;
    auto const& table = src.paged->block_table;
    PQKV_EXPECTS(pool.extent(1) == codes_.kv_heads, where, "codes.pool.extent(1)=", pool.extent(1),
                 ", kv_heads=", codes_.kv_heads);
    PQKV_EXPECTS(pool.extent(3) == codes_.m, where, "codes.pool.extent(3)=", pool.extent(3), ", m=", codes_.m);
    PQKV_EXPECTS(pool.extent(2) > 0, where, "codes.pool.extent(2) (page_size)=", pool.extent(2),
                 " must be positive");
    PQKV_EXPECTS(pool.stride(3) == 1 || codes_.m == 1, where, "codes.pool.stride(3)=", pool.stride(3),
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
                 "codes.pool.data_handle() is not aligned to ", code_align, " bytes (m=", codes_.m, ")");
    for (std::size_t d = 0; d < 3; ++d) {
      PQKV_EXPECTS(static_cast<std::uintptr_t>(pool.stride(d)) % code_align == 0, where, "codes.pool.stride(", d,
                   ")=", pool.stride(d), " is not a multiple of ", code_align, " bytes (m=", codes_.m, ")");
    }
    return capacity;
  }

  /// Checks everything but the centroids (the facade's job) and launches.
  /// `centroids` is the device codebook in the facade's layout;
  /// `shared_codebook`: one codebook for all KV heads.
  template <class Query, class Channels>
  void run(view<Query const, 3> queries, code_source const& src, float const* centroids, bool shared_codebook,
           Channels const& channels, std::span<std::int32_t const> seq_lens, view<std::int32_t, 3> out,
           view<std::int32_t, 2> valid_counts, view<float, 3> scores, std::span<std::byte> workspace,
           cudaStream_t stream, char const* where) const
  {
    pqkv::detail::gpu_check::expect_current_device(device_, where);
    index_t const batch = queries.extent(0);
    PQKV_EXPECTS(batch <= limits_.max_batch, where, "queries.extent(0)=", batch, " exceeds limits.max_batch=",
                 limits_.max_batch);
    PQKV_EXPECTS(queries.extent(1) == codes_.q_heads, where, "queries.extent(1)=", queries.extent(1),
                 ", q_heads=", codes_.q_heads);
    PQKV_EXPECTS(queries.extent(2) == codes_.dim, where, "queries.extent(2)=", queries.extent(2), ", dim=",
                 codes_.dim);
    index_t const capacity = check_codes(src, batch, where);
    PQKV_EXPECTS(static_cast<index_t>(seq_lens.size()) == batch, where, "seq_lens.size()=", seq_lens.size(),
                 ", batch=", batch);
    PQKV_EXPECTS(centroids != nullptr, where, "centroids.data_handle() is null");
    PQKV_EXPECTS(out.extent(0) == batch && out.extent(1) == codes_.kv_heads, where, "out extents (", out.extent(0),
                 ", ", out.extent(1), ", ", out.extent(2), ") differ from (batch, kv_heads, k)=(", batch, ", ",
                 codes_.kv_heads, ", ", params_.k, ")");
    PQKV_EXPECTS(params_.k <= out.extent(2), where, "params.k=", params_.k, " exceeds out.extent(2)=", out.extent(2));
    PQKV_EXPECTS(out.extent(2) <= index_t{std::numeric_limits<std::int32_t>::max()}, where, "out.extent(2)=",
                 out.extent(2), " exceeds the int32 range");
    PQKV_EXPECTS(valid_counts.extent(0) == batch && valid_counts.extent(1) == codes_.kv_heads, where,
                 "valid_counts extents (", valid_counts.extent(0), ", ", valid_counts.extent(1),
                 ") differ from (batch, kv_heads)=(", batch, ", ", codes_.kv_heads, ")");
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
    PQKV_EXPECTS(workspace.size() >= ws_.total, where, "workspace.size()=", workspace.size(), " < workspace_bytes()=",
                 ws_.total);
    PQKV_EXPECTS(workspace.data() != nullptr, where, "workspace.data() is null");
    PQKV_EXPECTS(reinterpret_cast<std::uintptr_t>(workspace.data()) % 16 == 0, where,
                 "workspace.data() is not 16-byte aligned");
    if (capacity == 0) {
      // No token can be a candidate: only the padding and zero counts remain.
      PQKV_CUDA_TRY(cudaMemsetAsync(valid_counts.data_handle(), 0,
                                    static_cast<std::size_t>(batch * codes_.kv_heads) * sizeof(std::int32_t),
                                    stream));
      if (out.extent(2) > 0) {
        PQKV_CUDA_TRY(cudaMemsetAsync(out.data_handle(), 0xFF,
                                      static_cast<std::size_t>(element_count(out)) * sizeof(std::int32_t), stream));
      }
      if (want_scores) {
        fill_async(scores.data_handle(), static_cast<std::size_t>(element_count(scores)),
                         -std::numeric_limits<float>::infinity(), stream);
      }
      return;
    }

    std::byte* ws = workspace.data();
    args a{};
    a.q = queries.data_handle();
    a.centroids = centroids;
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
    a.lut = reinterpret_cast<float*>(ws + ws_.lut);
    a.keys = reinterpret_cast<std::uint32_t*>(ws + ws_.keys);
    a.hist = reinterpret_cast<std::uint32_t*>(ws + ws_.hist);
    a.logits = reinterpret_cast<float*>(ws + ws_.logits);
    a.part_max = reinterpret_cast<float*>(ws + ws_.part_max);
    a.part_sum = reinterpret_cast<double*>(ws + ws_.part_sum);
    a.capacity = capacity;
    a.sink = params_.sink;
    a.window = params_.window;
    a.q_heads = static_cast<int>(codes_.q_heads);
    a.kv_heads = static_cast<int>(codes_.kv_heads);
    a.r = static_cast<int>(codes_.group());
    a.dim = static_cast<int>(codes_.dim);
    a.m = static_cast<int>(codes_.m);
    a.dsub = static_cast<int>(codes_.dsub);
    a.ksub = static_cast<int>(codes_.ksub);
    a.stages = codes_.stages;
    a.shared_codebook = shared_codebook;
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
    launch<Query>(a, agg_, channels, static_cast<unsigned>(batch * codes_.kv_heads), chunks, cluster, stream);
  }

 private:
  code_layout codes_;
  selection_params params_;
  ::pqkv::gpu::adc_limits limits_;
  Aggregation agg_;
  float scale_ = 1.f;
  int device_ = 0;  // current at construction: kernel limits, SMs and cluster occupancy are its own
  int sms_ = 132;
  int active_clusters_[17] = {};  ///< [c]: clusters of c blocks that run at once
  index_t max_store_tokens_ = 0;
  index_t chunk_tokens_ = 1024;
  index_t max_chunks_ = 1;
  workspace_layout ws_{};
};

}  // namespace pqkv::detail::adc_gpu

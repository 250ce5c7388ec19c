// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::gpu::rq_trainer`: residual codebooks trained stage by stage
/// on the GPU, the training contract of `pqkv::cpu::rq_trainer`
/// (codebook/residual.hpp) with the GPU k-means.
///
/// Contract: R = the permuted rows as float (all KV heads pooled, head-major,
/// when the codebooks are shared). For each stage st: `gpu::kmeans_trainer`
/// with `stage_pq(st)` on R gives the stage's codebooks of all splits; every
/// row of R is then encoded greedily by `gpu::rq_encoder`'s rule (the CPU's,
/// bit for bit) and the chosen codeword subtracted in float. So:
/// - With the same stage centroids, the codes and residuals are the CPU's bit
///   for bit: with `max_iter` 0 (centroids = the init rows, drawn as the CPU
///   draws them) the whole run is the CPU's.
/// - With Lloyd iterations, the GPU k-means' fixed-point cluster sums round
///   differently from the CPU's double sums, so centroids differ by rounding
///   and the residual norms agree within a fraction of a percent (the tests
///   require 1%).
/// - The mean squared residual norm after each stage is summed in double in a
///   fixed order (independent of the device); runs are deterministic.
///
/// Memory and ordering: the caller owns keys, centroids and a workspace of
/// `workspace_bytes()` (sized by the limits). It holds R (heads x tokens x
/// dim floats), one stage's codebooks and codes, the k-means workspace and
/// the per-stage reports. A call allocates nothing and never synchronizes; it
/// can be captured in a CUDA graph. `report()` reads the last call's report
/// back (and synchronizes the stream).
///
/// Supported: bits 1..8, dsub = dim / splits in {4, 8, 16, 32, 64, 128}
/// (the GPU k-means and encoder), heads x tokens < 2^31. Keys are not checked
/// for NaN/Inf (device memory).

#include <pqkv/codebook/kmeans.cuh>
#include <pqkv/codebook/residual.hpp>
#include <pqkv/core/concepts.hpp>
#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/device_check.cuh>
#include <pqkv/core/dtype.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/detail/residual_train_kernels.cuh>
#include <pqkv/encode/encode.cuh>
#include <pqkv/encode/residual.cuh>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <type_traits>
#include <vector>

namespace pqkv::gpu {

namespace detail_rq_train {

/// Byte offsets of a call's workspace regions.
struct layout {
  std::size_t hdr = 0, r = 0, stage_c = 0, codes = 0, partial = 0, mse = 0, rep_hdr = 0, rep_hist = 0,
              rep_iters = 0, rep_active = 0, kmeans = 0, total = 0;

  /// For keys [heads, tokens, dim] and centroids of cb_heads (1 or heads).
  static layout make(rq_config const& cfg, index_t heads, index_t tokens, index_t cb_heads)
  {
    namespace kdet = detail_kmeans;
    auto const rows = static_cast<std::size_t>(heads * tokens), dim = static_cast<std::size_t>(cfg.dim),
               splits = static_cast<std::size_t>(cfg.splits), ksub = static_cast<std::size_t>(cfg.ksub()),
               dsub = static_cast<std::size_t>(cfg.dsub()), stages = static_cast<std::size_t>(cfg.stages),
               problems = static_cast<std::size_t>(cb_heads) * splits,
               iters = static_cast<std::size_t>(cfg.max_iter) + 1;
    layout l;
    std::size_t at = 0;
    auto take = [&](std::size_t& off, std::size_t bytes) {
      off = at;
      at += kdet::up(bytes);
    };
    take(l.hdr, sizeof(pqkv::detail::rq_train::header));
    take(l.r, rows * dim * sizeof(float));
    take(l.stage_c, static_cast<std::size_t>(cb_heads) * splits * ksub * dsub * sizeof(float));
    take(l.codes, rows * splits);
    take(l.partial, pqkv::detail::rq_train::max_blocks * sizeof(double));
    take(l.mse, (stages + 1) * sizeof(double));
    take(l.rep_hdr, stages * sizeof(pqkv::detail::kmeans_gpu::header));
    take(l.rep_hist, stages * problems * iters * sizeof(double));
    take(l.rep_iters, stages * problems * sizeof(int));
    take(l.rep_active, stages * problems * sizeof(int));
    take(l.kmeans, kmeans_workspace_size(cfg.stage_pq(0), cb_heads, heads * tokens / cb_heads));
    l.total = at;
    return l;
  }
};

}  // namespace detail_rq_train

/// GPU trainer of residual codebooks (the file's contract); models
/// `pqkv::Trainer<rq_trainer, Key, std::span<std::byte>, cudaStream_t>`
/// through the 4-D centroids view. Lives on the device current at
/// construction.
class rq_trainer {
 public:
  /// Validates `config` (bits <= 8, max_train_points 0 or >= 2^bits, a dsub
  /// the kernels are built for) and `limits` (keys [max_heads, max_tokens]
  /// at most; max_heads x max_tokens < 2^31); throws `pqkv::error`.
  rq_trainer(rq_config config, kmeans_limits const& limits, assign_tuning const& tuning = {})
    : cfg_{std::move(config)}, limits_{limits}, encoder_{stage_encoder_config(cfg_)}
  {
    constexpr char const* where = "gpu::rq_trainer";
    limits_.validate(where);
    PQKV_EXPECTS(cfg_.bits <= 8, where, "bits=", cfg_.bits,
                 " > 8: the GPU trainer trains up to 8-bit stages; import wider codebooks");
    PQKV_EXPECTS(cfg_.max_train_points == 0 || cfg_.max_train_points >= cfg_.ksub(), where,
                 "config.max_train_points=", cfg_.max_train_points, " must be 0 or >= 2^bits=", cfg_.ksub());
    PQKV_EXPECTS(limits_.max_heads * limits_.max_tokens <= index_t{std::numeric_limits<std::int32_t>::max()}, where,
                 "limits.max_heads * limits.max_tokens=", limits_.max_heads * limits_.max_tokens,
                 " exceeds the int32 row range");
    // One k-means per stage (its seed is seed + stage); its limits admit the
    // pooled rows of a shared codebook.
    kmeans_limits const pooled{limits_.max_heads, limits_.max_heads * limits_.max_tokens};
    stage_kmeans_.reserve(static_cast<std::size_t>(cfg_.stages));
    for (int st = 0; st < cfg_.stages; ++st) { stage_kmeans_.emplace_back(cfg_.stage_pq(st), pooled, tuning); }
    PQKV_CUDA_TRY(cudaGetDevice(&device_));
    workspace_bytes_ = std::max(detail_rq_train::layout::make(cfg_, limits_.max_heads, limits_.max_tokens, 1).total,
                                detail_rq_train::layout::make(cfg_, limits_.max_heads, limits_.max_tokens,
                                                              limits_.max_heads)
                                  .total);
  }

  [[nodiscard]] rq_config const& config() const noexcept { return cfg_; }
  [[nodiscard]] kmeans_limits const& limits() const noexcept { return limits_; }
  /// The device the trainer was built on (calls must run there).
  [[nodiscard]] int device() const noexcept { return device_; }
  /// Bytes of workspace a call up to the limits needs (256-byte aligned start).
  [[nodiscard]] std::size_t workspace_bytes() const noexcept { return workspace_bytes_; }

  /// Trains centroids [1 or heads, splits, stages, ksub, dsub] (device) from
  /// keys [heads, tokens, dim] (device; float, half or bf16, any strides).
  /// With init `provided`, each stage starts from the centroids passed in.
  /// Throws `pqkv::error` before any launch on a shape mismatch, a layer over
  /// the limits, a null or host pointer, or a small or misaligned workspace.
  template <class Key, class Layout, class Accessor>
    requires KvElement<std::remove_cv_t<Key>>
  void train(::cuda::std::mdspan<Key, extents<3>, Layout, Accessor> keys, rq_centroids_view<float> centroids,
             std::span<std::byte> workspace, cudaStream_t stream) const
  {
    using element = std::remove_cv_t<Key>;
    run<element>(kv_view<element const>{keys}, centroids, workspace, stream);
  }

  /// As above with centroids seen as [1 or heads, splits * stages, ksub, dsub].
  template <class Key, class Layout, class Accessor>
    requires KvElement<std::remove_cv_t<Key>>
  void train(::cuda::std::mdspan<Key, extents<3>, Layout, Accessor> keys, centroids_view<float> centroids,
             std::span<std::byte> workspace, cudaStream_t stream) const
  {
    train(keys, as_rq_centroids(centroids, cfg_, "gpu::rq_trainer.train"), workspace, stream);
  }

  /// The report of the last `train` that used `workspace` (as the CPU
  /// trainer's): reads it back and synchronizes `stream`. Not for a graph.
  [[nodiscard]] rq_train_report report(std::span<std::byte const> workspace, cudaStream_t stream) const
  {
    constexpr char const* where = "gpu::rq_trainer.report";
    pqkv::detail::gpu_check::expect_current_device(device_, where);
    PQKV_EXPECTS(workspace.size() >= sizeof(pqkv::detail::rq_train::header) && workspace.data() != nullptr, where,
                 "workspace is too small or null");
    pqkv::detail::rq_train::header hdr{};
    PQKV_CUDA_TRY(cudaMemcpyAsync(&hdr, workspace.data(), sizeof(hdr), cudaMemcpyDeviceToHost, stream));
    PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
    PQKV_EXPECTS(hdr.magic == pqkv::detail::rq_train::header_magic && hdr.stages == cfg_.stages &&
                   hdr.max_iter == cfg_.max_iter && hdr.heads > 0 && hdr.heads <= limits_.max_heads &&
                   hdr.tokens > 0 && hdr.tokens <= limits_.max_tokens &&
                   (hdr.cb_heads == 1 || hdr.cb_heads == hdr.heads),
                 where, "workspace holds no train result of this trainer");
    auto const l = detail_rq_train::layout::make(cfg_, hdr.heads, hdr.tokens, hdr.cb_heads);
    PQKV_EXPECTS(workspace.size() >= l.total, where, "workspace.size()=", workspace.size(), " < the ", l.total,
                 " bytes the last call used");
    auto const stages = static_cast<std::size_t>(cfg_.stages);
    index_t const problems = hdr.cb_heads * cfg_.splits;
    auto const per_stage = static_cast<std::size_t>(problems);
    auto const hist_per_stage = per_stage * static_cast<std::size_t>(cfg_.max_iter + 1);
    std::vector<double> mse(stages + 1), hist(stages * hist_per_stage);
    std::vector<pqkv::detail::kmeans_gpu::header> khdr(stages);
    std::vector<int> iters(stages * per_stage), active(stages * per_stage);
    auto read = [&](auto& dst, std::size_t off) {
      PQKV_CUDA_TRY(cudaMemcpyAsync(dst.data(), workspace.data() + off, dst.size() * sizeof(dst[0]),
                                    cudaMemcpyDeviceToHost, stream));
    };
    read(mse, l.mse);
    read(hist, l.rep_hist);
    read(khdr, l.rep_hdr);
    read(iters, l.rep_iters);
    read(active, l.rep_active);
    PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
    rq_train_report r;
    r.initial_mse = mse[0];
    r.residual_mse.assign(mse.begin() + 1, mse.end());
    for (std::size_t st = 0; st < stages; ++st) {
      r.stages.push_back(detail_kmeans::assemble_report(
        khdr[st], problems, std::span<double const>{hist}.subspan(st * hist_per_stage, hist_per_stage),
        std::span<int const>{iters}.subspan(st * per_stage, per_stage),
        std::span<int const>{active}.subspan(st * per_stage, per_stage)));
    }
    return r;
  }

 private:
  /// One stage's greedy encoder: the rows are permuted already.
  static rq_config stage_encoder_config(rq_config cfg)
  {
    cfg.validate("gpu::rq_trainer");
    cfg.permutation.clear();
    cfg.stages = 1;
    cfg.beam = 1;
    return cfg;
  }

  template <class Key>
  void run(kv_view<Key const> keys, rq_centroids_view<float> centroids, std::span<std::byte> workspace,
           cudaStream_t stream) const
  {
    constexpr char const* where = "gpu::rq_trainer.train";
    namespace kern = pqkv::detail::rq_train;
    pqkv::detail::gpu_check::expect_current_device(device_, where);
    // ---- validation: everything before any launch ----
    index_t const heads = keys.extent(0), tokens = keys.extent(1), dim = cfg_.dim;
    PQKV_EXPECTS(keys.extent(2) == dim, where, "keys.extent(2)=", keys.extent(2), ", config.dim=", dim);
    PQKV_EXPECTS(heads > 0, where, "keys.extent(0)=", heads, ": no heads to train");
    PQKV_EXPECTS(tokens > 0, where, "keys.extent(1)=", tokens, ": no tokens to train on");
    PQKV_EXPECTS(heads <= limits_.max_heads, where, "keys.extent(0)=", heads, " exceeds limits.max_heads=",
                 limits_.max_heads);
    PQKV_EXPECTS(tokens <= limits_.max_tokens, where, "keys.extent(1)=", tokens, " exceeds limits.max_tokens=",
                 limits_.max_tokens);
    check_rq_centroids(centroids, cfg_, heads, where, false);  // device memory: finiteness is not checked
    PQKV_EXPECTS(keys.data_handle() != nullptr, where, "keys.data_handle() is null");
    index_t const cb_heads = centroids.extent(0), rows = heads * tokens / cb_heads;
    auto const l = detail_rq_train::layout::make(cfg_, heads, tokens, cb_heads);
    detail_kmeans::check_workspace(workspace, l.total, workspace_bytes_, where);
    using pqkv::detail::gpu_check::expect_device_pointer;
    expect_device_pointer(keys.data_handle(), where, "keys.data_handle()");
    expect_device_pointer(centroids.data_handle(), where, "centroids.data_handle()");
    expect_device_pointer(workspace.data(), where, "workspace.data()");
    pqkv::detail::rq_gpu::expect_aligned(centroids.data_handle(), 16, where, "centroids.data_handle()");

    // ---- launches ----
    std::byte* const ws = workspace.data();
    auto* const r = reinterpret_cast<float*>(ws + l.r);
    auto* const stage_c = reinterpret_cast<float*>(ws + l.stage_c);
    auto* const codes = reinterpret_cast<std::uint8_t*>(ws + l.codes);
    auto* const partial = reinterpret_cast<double*>(ws + l.partial);
    auto* const mse = reinterpret_cast<double*>(ws + l.mse);
    index_t const splits = cfg_.splits, stages = cfg_.stages, ksub = cfg_.ksub(), dsub = cfg_.dsub();
    index_t const elements = heads * tokens * dim;
    int const blocks = kern::blocks_for(elements);
    kern::header const hdr{heads, tokens, cb_heads, cfg_.stages, cfg_.max_iter, kern::header_magic};
    kern::permute_kernel<Key><<<blocks, kern::threads, 0, stream>>>(
      keys.data_handle(), keys.stride(0), keys.stride(1), keys.stride(2), tokens, static_cast<int>(dim),
      pqkv::detail::rq_gpu::make_channel_map(cfg_), elements, r, partial, hdr,
      reinterpret_cast<kern::header*>(ws + l.hdr));
    PQKV_CUDA_CHECK_LAST();
    kern::finish_mean_kernel<><<<1, kern::threads, 0, stream>>>(partial, blocks, heads * tokens, mse);
    PQKV_CUDA_CHECK_LAST();

    // The stage's codebooks of every (codebook head, split) are rows of
    // `book` floats, `stages` books apart in the 5-D centroids.
    std::size_t const book = static_cast<std::size_t>(ksub * dsub) * sizeof(float);
    auto const book_rows = static_cast<std::size_t>(cb_heads * splits);
    view<float const, 3> const residual{r, cb_heads, rows, dim};
    centroids_view<float> const stage_view{stage_c, cb_heads, splits, ksub, dsub};
    rq_centroids_view<float const> const stage_rq{stage_c, cb_heads, splits, index_t{1}, ksub, dsub};
    view<std::uint8_t, 3> const stage_codes{codes, cb_heads, rows, splits};
    for (index_t st = 0; st < stages; ++st) {
      std::byte* const slice = reinterpret_cast<std::byte*>(centroids.data_handle()) + st * book;
      if (cfg_.init == init_method::provided) {
        PQKV_CUDA_TRY(cudaMemcpy2DAsync(stage_c, book, slice, stages * book, book, book_rows,
                                        cudaMemcpyDeviceToDevice, stream));
      }
      auto const& km = stage_kmeans_[static_cast<std::size_t>(st)];
      km.train(residual, stage_view, workspace.subspan(l.kmeans), stream);
      PQKV_CUDA_TRY(cudaMemcpy2DAsync(slice, stages * book, stage_c, book, book, book_rows,
                                      cudaMemcpyDeviceToDevice, stream));
      save_stage_report(ws, l, st, cb_heads, rows, stream);
      encoder_.encode(residual, stage_rq, stage_codes, stream);
      kern::subtract_kernel<><<<blocks, kern::threads, 0, stream>>>(
        r, codes, centroids.data_handle(), rows, static_cast<int>(dim), static_cast<int>(splits),
        static_cast<int>(stages), static_cast<int>(st), static_cast<int>(ksub), static_cast<int>(dsub), elements,
        partial);
      PQKV_CUDA_CHECK_LAST();
      kern::finish_mean_kernel<><<<1, kern::threads, 0, stream>>>(partial, blocks, heads * tokens, mse + st + 1);
      PQKV_CUDA_CHECK_LAST();
    }
  }

  /// Copies what stage st's k-means (on [cb_heads, rows, dim]) left for its
  /// report into the stage's report slots, device to device.
  void save_stage_report(std::byte* ws, detail_rq_train::layout const& l, index_t st, index_t cb_heads, index_t rows,
                         cudaStream_t stream) const
  {
    auto const km = detail_kmeans::layout::make(cfg_.stage_pq(static_cast<int>(st)), cb_heads, rows);
    auto const problems = static_cast<std::size_t>(cb_heads * cfg_.splits);
    std::size_t const hdr_bytes = sizeof(pqkv::detail::kmeans_gpu::header);
    std::size_t const hist_bytes = problems * static_cast<std::size_t>(cfg_.max_iter + 1) * sizeof(double);
    std::size_t const flag_bytes = problems * sizeof(int);
    auto const at = static_cast<std::size_t>(st);
    auto copy = [&](std::size_t dst, std::size_t src, std::size_t bytes) {
      PQKV_CUDA_TRY(cudaMemcpyAsync(ws + dst, ws + l.kmeans + src, bytes, cudaMemcpyDeviceToDevice, stream));
    };
    copy(l.rep_hdr + at * hdr_bytes, km.hdr, hdr_bytes);
    copy(l.rep_hist + at * hist_bytes, km.hist, hist_bytes);
    copy(l.rep_iters + at * flag_bytes, km.iters, flag_bytes);
    copy(l.rep_active + at * flag_bytes, km.active, flag_bytes);
  }

  rq_config cfg_;
  kmeans_limits limits_;
  rq_encoder encoder_;
  std::vector<kmeans_trainer> stage_kmeans_;
  int device_ = 0;
  std::size_t workspace_bytes_ = 0;
};

static_assert(Trainer<rq_trainer, float, std::span<std::byte>, cudaStream_t>);
#if defined(PQKV_HAS_HALF)
static_assert(Trainer<rq_trainer, __half, std::span<std::byte>, cudaStream_t>);
#endif
#if defined(PQKV_HAS_BF16)
static_assert(Trainer<rq_trainer, __nv_bfloat16, std::span<std::byte>, cudaStream_t>);
#endif

}  // namespace pqkv::gpu

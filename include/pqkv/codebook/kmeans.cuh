// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::gpu::kmeans_trainer`: batched k-means on the GPU over every
/// (KV head, subspace) problem of a layer in one stream-ordered call
/// sequence, learning centroids [heads, m, ksub, dsub] from keys
/// [heads, tokens, dim] (float, __half or __nv_bfloat16; any strides).
///
/// Contract: that of `pqkv::cpu::kmeans_trainer` (codebook/kmeans.hpp), with
/// these differences, all of rounding:
/// - The same training rows (the subsample draw), the same init rows for
///   `random_sample`, `kmeans_plus_plus` and n < ksub (the centroids are then
///   bit-identical to the CPU's), `provided` init, the same distance (the
///   gemm-form float chain, clamped at 0), so for the same centroids the
///   assignment is the CPU's bit for bit, with the lowest index winning ties.
/// - `kmeans_plus_plus` reproduces the reference's D^2 sampling exactly: the
///   same RNG stream and counters, D^2 by the same exact-form fma chain, the
///   same fixed-tree double sums of groups of 16 rows, their running sum in
///   group order (the one sequential step, done by one thread per problem),
///   the same walk and fallbacks. The picks equal the CPU's for every seed
///   and input. It costs ksub - 1 launches, each a pass over all training
///   rows (memory-bound: about ksub x n x dim x 4 bytes read per head) plus
///   n / 16 dependent double additions per problem; for long prefills train
///   on a subsample (`max_train_points`) or use `random_sample`.
/// - Cluster sums are fixed-point integers: each key channel of a head is
///   scaled by a power of two that puts its largest |x| below 2^17 and
///   rounded to an integer (so a sum's error is at most n * 2^-18 of that
///   channel's largest |x|, against double sums on the CPU); the mean is
///   computed in double and rounded to float. Integer sums make the result
///   independent of block and atomic order: the same inputs and config give
///   bit-identical centroids on the same device.
/// - The objective is summed in double per block and then over blocks in
///   block order (the CPU's chunk order differs), so objectives match the
///   CPU's to about 1e-12 relative for equal centroids; after several
///   iterations centroids differ by rounding and the MSE agrees within a
///   fraction of a percent (the tests require 1%).
/// - Empty clusters take the farthest rows as on the CPU (distance
///   descending, row ascending, clusters ascending).
/// - Tolerance: the same per-problem test, evaluated on the device; a
///   problem that stops keeps its centroids, and its later kernels exit at
///   once. The host always enqueues max_iter iterations (no host round trip).
/// - Keys live in device memory and are not checked for NaN/Inf (the CPU
///   trainer checks them): non-finite keys give unspecified centroids.
///
/// Memory and ordering: the caller owns keys, centroids and a workspace of
/// `workspace_bytes()` (sized by the limits; `kmeans_workspace_size` gives
/// it without building a trainer). A call allocates nothing and never
/// synchronizes; it can be captured in a CUDA graph. `report()` is the one
/// call that reads results back to the host (and synchronizes the stream).
/// The output centroids double as the working centroids during training.
///
/// Assignment engine: `assign_tuning` (encode/encode.cuh). The tensor-core
/// path (dsub >= 16, ksub >= 32 under `automatic`) gives the same assignment
/// as the FP32 one (candidates under an error bound, re-checked with the
/// gemm-form chain; detail/assign_tc_kernels.cuh).
///
/// Supported shapes: dsub = dim / m in {4, 8, 16, 32, 64, 128}, nbits 1..8,
/// dim <= 4096. With `max_train_points`, the draw of the training rows is
/// the reference's sequential shuffle, done by one GPU thread per head: it
/// costs a few microseconds per row drawn. `kmeans_plus_plus` takes up to
/// 65535 x 1024 training rows and adds heads x m x ceil(n / 16) doubles to the
/// workspace.

#include <pqkv/codebook/codebook.hpp>
#include <pqkv/codebook/kmeans.hpp>
#include <pqkv/core/concepts.hpp>
#include <pqkv/core/config.hpp>
#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/device_check.cuh>
#include <pqkv/core/dtype.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/detail/kmeans_gpu_kernels.cuh>
#include <pqkv/encode/encode.cuh>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <type_traits>
#include <vector>

namespace pqkv::gpu {

/// The largest layer one `kmeans_trainer` serves; they size the workspace.
struct kmeans_limits {
  index_t max_heads = 8;         ///< keys.extent(0) per call
  index_t max_tokens = 131072;   ///< keys.extent(1) per call

  /// Throws `pqkv::error` naming the first field out of range.
  void validate(char const* where = "kmeans_limits") const
  {
    PQKV_EXPECTS(max_heads > 0, where, "limits.max_heads=", max_heads, " must be positive");
    PQKV_EXPECTS(max_tokens > 0, where, "limits.max_tokens=", max_tokens, " must be positive");
    PQKV_EXPECTS(max_tokens <= index_t{std::numeric_limits<std::int32_t>::max()}, where, "limits.max_tokens=",
                 max_tokens, " exceeds the int32 row range");
  }
};

namespace detail_kmeans {

inline constexpr std::size_t align = 256;

[[nodiscard]] constexpr std::size_t up(std::size_t x) noexcept { return (x + align - 1) / align * align; }

/// Byte offsets of the workspace regions for (heads, tokens) and a config.
struct layout {
  std::size_t hdr = 0, xp = 0, xn = 0, dist = 0, assign = 0, sums = 0, counts = 0, amax = 0, part_obj = 0,
              hist = 0, iters = 0, active = 0, rows = 0, perm = 0, flags = 0, kpp_sum = 0, kpp_pick = 0,
              kpp_ticket = 0, total = 0;

  static layout make(pq_config const& cfg, index_t heads, index_t tokens)
  {
    auto const n = static_cast<std::size_t>(
      (cfg.max_train_points > 0 && cfg.max_train_points < tokens) ? cfg.max_train_points : tokens);
    bool const sub = cfg.max_train_points > 0 && cfg.max_train_points < tokens;
    auto const P = static_cast<std::size_t>(heads * cfg.m), dsub = static_cast<std::size_t>(cfg.dsub()),
               ksub = static_cast<std::size_t>(cfg.ksub()), h = static_cast<std::size_t>(heads),
               t = static_cast<std::size_t>(tokens);
    std::size_t const bpp_max = (n + pqkv::detail::nearest_gpu::bm - 1) / pqkv::detail::nearest_gpu::bm;
    layout l;
    std::size_t at = 0;
    auto take = [&](std::size_t& off, std::size_t bytes) {
      off = at;
      at += up(bytes);
    };
    take(l.hdr, sizeof(pqkv::detail::kmeans_gpu::header));
    take(l.xp, P * n * dsub * sizeof(float));
    take(l.xn, P * n * sizeof(float));
    take(l.dist, P * n * sizeof(float));
    take(l.assign, P * n);
    take(l.sums, P * ksub * dsub * sizeof(unsigned long long));
    take(l.counts, P * ksub * sizeof(std::uint32_t));
    take(l.amax, h * static_cast<std::size_t>(cfg.dim) * sizeof(std::uint32_t));
    take(l.part_obj, P * bpp_max * sizeof(double));
    take(l.hist, P * static_cast<std::size_t>(cfg.max_iter + 1) * sizeof(double));
    take(l.iters, P * sizeof(int));
    take(l.active, P * sizeof(int));
    take(l.rows, sub ? h * n * sizeof(std::int32_t) : 0);
    take(l.perm, sub ? h * t * sizeof(std::int32_t) : 0);
    take(l.flags, sub ? h * t * sizeof(std::int32_t) : 0);
    // k-means++: per problem the D^2 sums of groups of 16 rows, the last pick, a ticket counter
    bool const kpp = cfg.init == init_method::kmeans_plus_plus;
    std::size_t const groups = (n + pqkv::detail::kmeans_gpu::kpp_group - 1) / pqkv::detail::kmeans_gpu::kpp_group;
    take(l.kpp_sum, kpp ? P * groups * sizeof(double) : 0);
    take(l.kpp_pick, kpp ? P * sizeof(std::int32_t) : 0);
    take(l.kpp_ticket, kpp ? P * sizeof(std::uint32_t) : 0);
    l.total = at;
    return l;
  }
};

/// Throws unless `workspace` holds `need` bytes (a trainer's
/// `workspace_bytes()` is `capacity`), is non-null and 256-byte aligned.
inline void check_workspace(std::span<std::byte const> workspace, std::size_t need, std::size_t capacity,
                            char const* where)
{
  PQKV_EXPECTS(workspace.size() >= need, where, "workspace.size()=", workspace.size(), " < the ", need,
               " bytes this call needs (workspace_bytes()=", capacity, ")");
  PQKV_EXPECTS(workspace.data() != nullptr, where, "workspace.data() is null");
  PQKV_EXPECTS(reinterpret_cast<std::uintptr_t>(workspace.data()) % align == 0, where, "workspace.data() is not ",
               align, "-byte aligned");
}

/// The host report of one call from what it left on the device, read back:
/// its header, per-problem objective histories [problems][hdr.max_iter + 1],
/// iteration counts and still-active flags.
inline kmeans_report assemble_report(pqkv::detail::kmeans_gpu::header const& hdr, index_t problems,
                                     std::span<double const> hist, std::span<int const> iters,
                                     std::span<int const> active)
{
  kmeans_report r;
  r.converged = true;
  for (index_t p = 0; p < problems; ++p) {
    r.iterations = std::max(r.iterations, iters[static_cast<std::size_t>(p)]);
    if (active[static_cast<std::size_t>(p)] != 0 && hdr.small == 0) { r.converged = false; }
  }
  r.objective.assign(static_cast<std::size_t>(r.iterations) + 1, 0.0);
  for (index_t p = 0; p < problems; ++p) {
    double const* h = hist.data() + p * (hdr.max_iter + 1);
    int const last = iters[static_cast<std::size_t>(p)];
    for (std::size_t i = 0; i < r.objective.size(); ++i) {
      r.objective[i] += h[std::min<std::size_t>(i, static_cast<std::size_t>(last))];
    }
  }
  for (auto& v : r.objective) { v /= static_cast<double>(hdr.heads * hdr.n); }
  r.mse = r.objective.back();
  return r;
}

}  // namespace detail_kmeans


/// Bytes of workspace a `kmeans_trainer` call on keys [heads, tokens, dim] needs.
[[nodiscard]] inline std::size_t kmeans_workspace_size(pq_config const& cfg, index_t heads, index_t tokens)
{
  return detail_kmeans::layout::make(cfg, heads, tokens).total;
}

/// GPU k-means trainer of PQ codebooks; models
/// `pqkv::Trainer<kmeans_trainer, Key, std::span<std::byte>, cudaStream_t>`.
/// Lives on the device current at construction; calls from another device
/// throw.
class kmeans_trainer {
 public:
  /// Validates the config and limits (dsub supported, max_train_points 0 or
  /// >= ksub) and raises the kernels' shared-memory
  /// limits on the current device; throws `pqkv::error`.
  kmeans_trainer(pq_config const& cfg, kmeans_limits const& limits, assign_tuning const& tuning = {})
      : cfg_{cfg}, limits_{limits}, tuning_{tuning}
  {
    constexpr char const* where = "gpu::kmeans_trainer";
    cfg_.validate(where);
    limits_.validate(where);
    PQKV_EXPECTS(cfg_.max_train_points == 0 || cfg_.max_train_points >= cfg_.ksub(), where,
                 "config.max_train_points=", cfg_.max_train_points, " must be 0 or >= config.ksub()=", cfg_.ksub());
    PQKV_EXPECTS(pqkv::detail::nearest_gpu::dsub_supported(cfg_.dsub()), where, "dim / m=", cfg_.dsub(),
                 " is not one of 4, 8, 16, 32, 64, 128");
    PQKV_EXPECTS(cfg_.dim <= 4096, where, "config.dim=", cfg_.dim, " exceeds 4096");
    int sms = 0, optin = 0;
    PQKV_CUDA_TRY(cudaGetDevice(&device_));
    PQKV_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device_));
    PQKV_CUDA_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device_));
    auto const smem = pqkv::detail::kmeans_gpu::assign_smem_bytes(static_cast<int>(cfg_.dsub()),
                                                                  static_cast<int>(cfg_.ksub()));
    PQKV_EXPECTS(smem <= static_cast<std::size_t>(optin), where, "dsub=", cfg_.dsub(), ", ksub=", cfg_.ksub(),
                 " need ", smem, " bytes of shared memory; the device allows ", optin);
    sms_ = sms > 0 ? sms : 132;
    pqkv::detail::kmeans_gpu::prepare_assign(static_cast<int>(cfg_.dsub()), static_cast<int>(cfg_.ksub()));
    slots_ = static_cast<index_t>(sms_) *
             pqkv::detail::kmeans_gpu::assign_occupancy(static_cast<int>(cfg_.dsub()), static_cast<int>(cfg_.ksub()));
    workspace_bytes_ = kmeans_workspace_size(cfg_, limits_.max_heads, limits_.max_tokens);
    tc_ = use_tensor_cores(tuning_, cfg_.dsub(), cfg_.ksub(), where);
    if (tuning_.fallback_counter != nullptr) {
      pqkv::detail::gpu_check::expect_device_pointer(tuning_.fallback_counter, where, "tuning.fallback_counter");
    }
    if (tc_) {
      namespace tc = pqkv::detail::assign_tc;
      PQKV_EXPECTS(tc::smem_bytes(static_cast<int>(cfg_.dsub())) <= static_cast<std::size_t>(optin), where,
                   "the tensor-core path needs ", tc::smem_bytes(static_cast<int>(cfg_.dsub())),
                   " bytes of shared memory; the device allows ", optin);
      tc::prepare<float, tc::chain::gemm, true>(static_cast<int>(cfg_.dsub()));
    }
  }

  [[nodiscard]] pq_config const& config() const noexcept { return cfg_; }
  [[nodiscard]] kmeans_limits const& limits() const noexcept { return limits_; }
  [[nodiscard]] assign_tuning const& tuning() const noexcept { return tuning_; }
  /// The device the trainer was built on (calls must run there).
  [[nodiscard]] int device() const noexcept { return device_; }
  /// Whether the assignment step runs on the tensor cores.
  [[nodiscard]] bool uses_tensor_cores() const noexcept { return tc_; }
  /// Bytes of workspace a call up to the limits needs (256-byte aligned start).
  [[nodiscard]] std::size_t workspace_bytes() const noexcept { return workspace_bytes_; }

  /// Trains centroids [heads, m, ksub, dsub] (device) from keys
  /// [heads, tokens, dim] (device). With init `provided`, training starts
  /// from the centroids passed in. Throws `pqkv::error` before any launch on
  /// a shape mismatch, a layer over the limits, a null or host pointer, or a
  /// small or misaligned workspace.
  template <class Key, class Layout, class Accessor>
    requires KvElement<std::remove_cv_t<Key>>
  void train(::cuda::std::mdspan<Key, extents<3>, Layout, Accessor> keys, centroids_view<float> centroids,
             std::span<std::byte> workspace, cudaStream_t stream) const
  {
    using element = std::remove_cv_t<Key>;
    run<element>(kv_view<element const>{keys}, centroids, nullptr, workspace, stream);
  }

  /// As above, and writes the final assignment of every token as codes
  /// [heads, tokens, m] (device), the CPU trainer's codes for equal
  /// centroids. Needs max_train_points == 0 or >= tokens (with a subsample,
  /// encode afterwards with `gpu::pq_encoder`, whose exact-form distance may
  /// break near-ties differently).
  template <class Key, class Layout, class Accessor>
    requires KvElement<std::remove_cv_t<Key>>
  void train(::cuda::std::mdspan<Key, extents<3>, Layout, Accessor> keys, centroids_view<float> centroids,
             codes_view<std::uint8_t> codes, std::span<std::byte> workspace, cudaStream_t stream) const
  {
    using element = std::remove_cv_t<Key>;
    run<element>(kv_view<element const>{keys}, centroids, &codes, workspace, stream);
  }

  /// The report of the last `train` that used `workspace` (as the CPU
  /// trainer's): copies the per-problem objectives back and synchronizes
  /// `stream`. Not for a decode path or a graph.
  [[nodiscard]] kmeans_report report(std::span<std::byte const> workspace, cudaStream_t stream) const
  {
    constexpr char const* where = "gpu::kmeans_trainer.report";
    pqkv::detail::gpu_check::expect_current_device(device_, where);
    PQKV_EXPECTS(workspace.size() >= sizeof(pqkv::detail::kmeans_gpu::header) && workspace.data() != nullptr, where,
                 "workspace is too small or null");
    pqkv::detail::kmeans_gpu::header hdr{};
    PQKV_CUDA_TRY(cudaMemcpyAsync(&hdr, workspace.data(), sizeof(hdr), cudaMemcpyDeviceToHost, stream));
    PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
    PQKV_EXPECTS(hdr.heads > 0 && hdr.heads <= limits_.max_heads && hdr.tokens > 0 && hdr.tokens <= limits_.max_tokens &&
                   hdr.n > 0 && hdr.n <= hdr.tokens && hdr.max_iter >= 0 && hdr.max_iter <= cfg_.max_iter,
                 where, "workspace holds no train result of this trainer");
    auto const l = detail_kmeans::layout::make(cfg_, hdr.heads, hdr.tokens);
    index_t const problems = hdr.heads * cfg_.m;
    std::vector<double> hist(static_cast<std::size_t>(problems * (hdr.max_iter + 1)));
    std::vector<int> iters(static_cast<std::size_t>(problems)), active(static_cast<std::size_t>(problems));
    PQKV_CUDA_TRY(cudaMemcpyAsync(hist.data(), workspace.data() + l.hist, hist.size() * sizeof(double),
                                  cudaMemcpyDeviceToHost, stream));
    PQKV_CUDA_TRY(cudaMemcpyAsync(iters.data(), workspace.data() + l.iters, iters.size() * sizeof(int),
                                  cudaMemcpyDeviceToHost, stream));
    PQKV_CUDA_TRY(cudaMemcpyAsync(active.data(), workspace.data() + l.active, active.size() * sizeof(int),
                                  cudaMemcpyDeviceToHost, stream));
    PQKV_CUDA_TRY(cudaStreamSynchronize(stream));
    return detail_kmeans::assemble_report(hdr, problems, hist, iters, active);
  }

 private:
  template <class Key>
  void run(kv_view<Key const> keys, centroids_view<float> centroids, codes_view<std::uint8_t> const* codes,
           std::span<std::byte> workspace, cudaStream_t stream) const
  {
    constexpr char const* where = "gpu::kmeans_trainer.train";
    pqkv::detail::gpu_check::expect_current_device(device_, where);
    namespace kern = pqkv::detail::kmeans_gpu;
    namespace ng = pqkv::detail::nearest_gpu;
    // ---- validation: everything before any launch ----
    index_t const heads = keys.extent(0), tokens = keys.extent(1);
    PQKV_EXPECTS(keys.extent(2) == cfg_.dim, where, "keys.extent(2)=", keys.extent(2), ", config.dim=", cfg_.dim);
    PQKV_EXPECTS(heads > 0, where, "keys.extent(0)=", heads, ": no heads to train");
    PQKV_EXPECTS(tokens > 0, where, "keys.extent(1)=", tokens, ": no tokens to train on");
    PQKV_EXPECTS(heads <= limits_.max_heads, where, "keys.extent(0)=", heads, " exceeds limits.max_heads=",
                 limits_.max_heads);
    PQKV_EXPECTS(tokens <= limits_.max_tokens, where, "keys.extent(1)=", tokens, " exceeds limits.max_tokens=",
                 limits_.max_tokens);
    check_centroids(centroids, cfg_, heads, where);
    PQKV_EXPECTS(keys.data_handle() != nullptr, where, "keys.data_handle() is null");
    PQKV_EXPECTS(centroids.data_handle() != nullptr, where, "centroids.data_handle() is null");
    index_t const n = (cfg_.max_train_points > 0 && cfg_.max_train_points < tokens) ? cfg_.max_train_points : tokens;
    bool const subsampled = n < tokens;
    if (codes != nullptr) {
      PQKV_EXPECTS(codes->extent(0) == heads, where, "codes.extent(0)=", codes->extent(0), ", heads=", heads);
      PQKV_EXPECTS(codes->extent(1) == tokens, where, "codes.extent(1)=", codes->extent(1), ", tokens=", tokens);
      PQKV_EXPECTS(codes->extent(2) == cfg_.m, where, "codes.extent(2)=", codes->extent(2), ", config.m=", cfg_.m);
      PQKV_EXPECTS(codes->data_handle() != nullptr, where, "codes.data_handle() is null");
      PQKV_EXPECTS(!subsampled, where, "codes with config.max_train_points=", cfg_.max_train_points,
                   " < tokens=", tokens, " are not produced on the GPU; encode with gpu::pq_encoder");
    }
    auto const l = detail_kmeans::layout::make(cfg_, heads, tokens);
    detail_kmeans::check_workspace(workspace, l.total, workspace_bytes_, where);
    using pqkv::detail::gpu_check::expect_device_pointer;
    expect_device_pointer(keys.data_handle(), where, "keys.data_handle()");
    expect_device_pointer(centroids.data_handle(), where, "centroids.data_handle()");
    expect_device_pointer(workspace.data(), where, "workspace.data()");
    if (codes != nullptr) { expect_device_pointer(codes->data_handle(), where, "codes.data_handle()"); }

    // ---- launches ----
    std::byte* const ws = workspace.data();
    bool const small = n < cfg_.ksub();
    kern::args a{};
    a.hdr = reinterpret_cast<kern::header*>(ws + l.hdr);
    a.xp = reinterpret_cast<float*>(ws + l.xp);
    a.xn = reinterpret_cast<float*>(ws + l.xn);
    a.dist = reinterpret_cast<float*>(ws + l.dist);
    a.assign = reinterpret_cast<std::uint8_t*>(ws + l.assign);
    a.sums = reinterpret_cast<unsigned long long*>(ws + l.sums);
    a.counts = reinterpret_cast<std::uint32_t*>(ws + l.counts);
    a.amax = reinterpret_cast<std::uint32_t*>(ws + l.amax);
    a.part_obj = reinterpret_cast<double*>(ws + l.part_obj);
    a.hist = reinterpret_cast<double*>(ws + l.hist);
    a.iters = reinterpret_cast<int*>(ws + l.iters);
    a.active = reinterpret_cast<int*>(ws + l.active);
    a.rows = subsampled ? reinterpret_cast<std::int32_t*>(ws + l.rows) : nullptr;
    a.perm = subsampled ? reinterpret_cast<std::int32_t*>(ws + l.perm) : nullptr;
    a.flags = subsampled ? reinterpret_cast<std::int32_t*>(ws + l.flags) : nullptr;
    a.c = centroids.data_handle();
    bool const kpp = cfg_.init == init_method::kmeans_plus_plus && !small;
    a.kpp_sum = kpp ? reinterpret_cast<double*>(ws + l.kpp_sum) : nullptr;
    a.kpp_pick = kpp ? reinterpret_cast<std::int32_t*>(ws + l.kpp_pick) : nullptr;
    a.kpp_ticket = kpp ? reinterpret_cast<std::uint32_t*>(ws + l.kpp_ticket) : nullptr;
    a.heads = heads;
    a.tokens = tokens;
    a.n = n;
    a.m = static_cast<int>(cfg_.m);
    a.dsub = static_cast<int>(cfg_.dsub());
    a.ksub = static_cast<int>(cfg_.ksub());
    a.dim = static_cast<int>(cfg_.dim);
    a.max_iter = small ? 0 : cfg_.max_iter;
    a.tol = cfg_.tol;
    a.seed = cfg_.seed;
    // Assign blocks: whole waves of resident blocks over all problems, each
    // block at most block_rows_max rows (the 32-bit shared sums' bound).
    index_t const problems = heads * cfg_.m;
    index_t const tiles = (n + ng::bm - 1) / ng::bm;
    index_t const blocks = ng::blocks_per_problem(problems, tiles, slots_, kern::block_rows_max / ng::bm);
    index_t const tiles_per_block = (tiles + blocks - 1) / blocks;
    a.rows_per_block = tiles_per_block * ng::bm;
    a.bpp = static_cast<int>((tiles + tiles_per_block - 1) / tiles_per_block);
    PQKV_EXPECTS(a.bpp <= 65535, where, "tokens=", tokens, " need ", a.bpp, " blocks per problem (> 65535)");
    PQKV_EXPECTS(!kpp || (n + kern::kpp_rows - 1) / kern::kpp_rows <= 65535, where, "init=kmeans_plus_plus on n=", n,
                 " training rows needs more than 65535 blocks per problem; set config.max_train_points");

    auto const grid1 = static_cast<unsigned>(std::min<index_t>(
      std::max<index_t>(problems * cfg_.ksub() * cfg_.dsub() / 256, 1), index_t{4} * sms_));
    kern::prologue_kernel<><<<grid1, 256, 0, stream>>>(a, small ? 1 : 0);
    PQKV_CUDA_CHECK_LAST();
    if (subsampled) {
      kern::subsample_kernel<><<<static_cast<unsigned>(heads), 1024, 0, stream>>>(a);
      PQKV_CUDA_CHECK_LAST();
    }
    kern::pack_kernel<Key><<<dim3(static_cast<unsigned>((n * cfg_.m + 255) / 256), static_cast<unsigned>(heads)), 256,
                             0, stream>>>(a, keys.data_handle(), keys.stride(0), keys.stride(1), keys.stride(2));
    PQKV_CUDA_CHECK_LAST();
    bool const random_sample = cfg_.init == init_method::random_sample;
    if (small || random_sample) {
      kern::init_kernel<><<<static_cast<unsigned>(problems), 32, 0, stream>>>(a, random_sample ? 1 : 0, small ? 1 : 0);
      PQKV_CUDA_CHECK_LAST();
    }
    if (kpp) {
      for (int k = 1; k < a.ksub; ++k) { kern::launch_kpp(a, k, stream); }
    }
    // The assignment step: on the tensor cores (exact candidates, then the
    // assign kernel only sums) or wholly on the FP32 tile engine.
    namespace tc = pqkv::detail::assign_tc;
    tc::args<float> ta{};
    if (tc_) {
      a.preassigned = 1;
      ta.x = a.xp;
      ta.s0 = static_cast<index_t>(a.m) * n * a.dsub;
      ta.ss = n * a.dsub;
      ta.s1 = a.dsub;
      ta.s2 = 1;
      ta.centroids = a.c;
      ta.n = n;
      ta.m = a.m;
      ta.ksub = a.ksub;
      ta.tiles_per_block = tc::tiles_per_block(problems, n, sms_);
      ta.assign = a.assign;
      ta.dist = a.dist;
      ta.xn = a.xn;
      ta.active = a.active;
      ta.fallbacks = tuning_.fallback_counter;
    }
    auto assign_step = [&] {
      if (tc_) { tc::launch<float, tc::chain::gemm, true>(ta, a.dsub, static_cast<int>(problems), stream); }
      kern::launch_assign(a, stream);
    };
    assign_step();
    for (int it = 1; it <= a.max_iter; ++it) {
      kern::step_kernel<><<<static_cast<unsigned>(problems), 256, 0, stream>>>(a, it);
      PQKV_CUDA_CHECK_LAST();
      assign_step();
    }
    kern::step_kernel<><<<static_cast<unsigned>(problems), 256, 0, stream>>>(a, a.max_iter + 1);
    PQKV_CUDA_CHECK_LAST();
    if (codes != nullptr) {
      dim3 const grid(static_cast<unsigned>((n * cfg_.m + 255) / 256), static_cast<unsigned>(heads));
      kern::codes_kernel<><<<grid, 256, 0, stream>>>(a, codes->data_handle());
      PQKV_CUDA_CHECK_LAST();
    }
  }

  pq_config cfg_;
  kmeans_limits limits_;
  assign_tuning tuning_;
  bool tc_ = false;
  int device_ = 0;       ///< current at construction: kernel limits and occupancy are its own
  int sms_ = 132;
  index_t slots_ = 132;  ///< resident assign blocks on the device
  std::size_t workspace_bytes_ = 0;
};

static_assert(Trainer<kmeans_trainer, float, std::span<std::byte>, cudaStream_t>);
#if defined(PQKV_HAS_HALF)
static_assert(Trainer<kmeans_trainer, __half, std::span<std::byte>, cudaStream_t>);
#endif
#if defined(PQKV_HAS_BF16)
static_assert(Trainer<kmeans_trainer, __nv_bfloat16, std::span<std::byte>, cudaStream_t>);
#endif

}  // namespace pqkv::gpu

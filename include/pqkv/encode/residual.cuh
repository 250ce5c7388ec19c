// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::gpu::rq_encoder`: residual codes of K or V rows on the GPU,
/// greedy or by beam search, for a whole prefill (`encode`) or a decode
/// step's new tokens (`append`, the write position given on the host or read
/// from device memory).
///
/// Contract: exactly that of `pqkv::cpu::rq_encoder` (encode/residual.hpp),
/// bit for bit. Split s of row (h, t) is x_i = float(keys(h, t, perm[s * dsub
/// + i])); the distance to a codeword is the float chain `d = 0; d = fma(r_i -
/// c_i, r_i - c_i, d)` over channels ascending (the subtraction rounded on its
/// own, `__fsub_rn`, never contracted); the residual update is `r_i - c_i`
/// rounded to float; greedy takes the lowest index among a stage's minima;
/// beam B keeps the B best partial tuples by (distance, tuple
/// lexicographically) and returns the first. Codes are [heads, tokens, splits
/// * stages], code n = s * stages + st, uint8 (bits <= 8) or uint16.
///
/// Memory and ordering: the caller owns keys, centroids and codes (device
/// memory). A call needs no scratch (`workspace_bytes()` is 0; the overloads
/// taking a workspace exist so the type models `Encoder<..., span<byte>,
/// cudaStream_t>`), allocates nothing, never synchronizes and launches one
/// kernel on `stream`, so it can be captured in a CUDA graph. `append` with a
/// device position can be replayed from a graph while the position grows; a
/// device position that would write past codes.extent(1) writes nothing.
///
/// Not checked (device memory): keys and centroids must be finite (the CPU
/// encoder throws on NaN/Inf; here such a row gets unspecified codes).
/// Supported shapes: dsub = dim / splits in {4, 8, 16, 32, 64, 128}.
/// Speed: greedy runs the exact float distances on the CUDA cores (no tensor
/// cores, which would change the codes): a prefill through 128-row tiles
/// with the codebook streamed through shared memory, a few rows (a decode
/// step) through a cluster of 8 blocks per row (`rq_encode_tuning`); beam
/// search is one warp per (row, split) and is meant for quality studies, not
/// for long prefills.

#include <pqkv/codebook/residual.hpp>
#include <pqkv/core/concepts.hpp>
#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/device_check.cuh>
#include <pqkv/core/dtype.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/detail/residual_gpu_kernels.cuh>
#include <pqkv/encode/residual.hpp>

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>

namespace pqkv::detail::rq_gpu {

/// Throws unless `p` is aligned to `bytes`.
inline void expect_aligned(void const* p, std::size_t bytes, char const* where, char const* what)
{
  PQKV_EXPECTS(reinterpret_cast<std::uintptr_t>(p) % bytes == 0, where, what, "=", p, " is not ", bytes,
               "-byte aligned");
}

}  // namespace pqkv::detail::rq_gpu

namespace pqkv::gpu {

/// Tuning of `rq_encoder` (the codes never depend on it).
struct rq_encode_tuning {
  /// Greedy calls of at most this many (row, split) items (heads * tokens *
  /// splits) give each item a cluster of 8 blocks that split the codewords
  /// (decode steps: latency); larger calls use the 128-row tile kernel
  /// (prefill: throughput). 0: always the tile kernel.
  index_t row_path_max = 2048;
};

/// GPU residual encoder for one `rq_config` (greedy when beam == 1, else
/// beam search; the file's contract); models `pqkv::Encoder` through the 4-D
/// centroids view, with `(cudaStream_t)` and `(std::span<std::byte>,
/// cudaStream_t)`.
class rq_encoder {
 public:
  /// Validates `config` (and that dsub is one the kernels are built for, and
  /// their shared memory fits the current device); throws `pqkv::error`.
  /// Calls must run on the device that was current here; each raises its
  /// kernel's shared-memory limit (a host-side call, allowed during capture),
  /// so only the key types actually encoded are compiled.
  explicit rq_encoder(rq_config config, rq_encode_tuning tuning = {}) : config_{std::move(config)}, tuning_{tuning}
  {
    constexpr char const* where = "gpu::rq_encoder";
    config_.validate(where);
    namespace kern = pqkv::detail::rq_gpu;
    PQKV_EXPECTS(pqkv::detail::nearest_gpu::dsub_supported(config_.dsub()), where, "dim / splits=", config_.dsub(),
                 " is not one of 4, 8, 16, 32, 64, 128");
    PQKV_EXPECTS(tuning_.row_path_max >= 0, where, "tuning.row_path_max=", tuning_.row_path_max, " must be >= 0");
    int const dsub = static_cast<int>(config_.dsub()), ksub = static_cast<int>(config_.ksub());
    int sms = 0, optin = 0;
    PQKV_CUDA_TRY(cudaGetDevice(&device_));
    PQKV_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device_));
    PQKV_CUDA_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device_));
    sms_ = sms > 0 ? sms : 132;
    if (config_.beam == 1) {
      PQKV_EXPECTS(kern::greedy_smem_bytes(dsub, ksub) <= static_cast<std::size_t>(optin), where, "dsub=", dsub,
                   ", ksub=", ksub, " need ", kern::greedy_smem_bytes(dsub, ksub),
                   " bytes of shared memory; the device allows ", optin);
      // The occupancy (for the grid size) of the float kernel, whose shared
      // memory matches the other key types'; launches set their own limits.
      kern::prepare_greedy<float>(dsub, ksub);
      slots_ = static_cast<index_t>(sms_) * kern::greedy_occupancy<float>(dsub, ksub);
    } else {
      std::size_t const bytes =
        kern::beam_warps * kern::beam_warp_bytes(config_.beam, dsub, static_cast<int>(config_.stages));
      PQKV_EXPECTS(bytes <= static_cast<std::size_t>(optin), where, "beam=", config_.beam, ", dsub=", dsub,
                   ", stages=", config_.stages, " need ", bytes, " bytes of shared memory; the device allows ", optin);
    }
  }

  [[nodiscard]] rq_config const& config() const noexcept { return config_; }
  [[nodiscard]] rq_encode_tuning const& tuning() const noexcept { return tuning_; }
  /// The device the encoder was built on (calls must run there).
  [[nodiscard]] int device() const noexcept { return device_; }
  /// Scratch a call needs: none.
  [[nodiscard]] static constexpr std::size_t workspace_bytes() noexcept { return 0; }

  /// codes [heads, tokens, splits * stages] of rows [heads, tokens, dim]
  /// (float, half or bf16; any strides), all in device memory. Throws
  /// `pqkv::error` before any launch on a shape mismatch, a code type too
  /// narrow for bits, a null, host or misaligned pointer.
  template <class Key, class Layout, class Accessor, RqCode Code>
    requires KvElement<std::remove_const_t<Key>>
  void encode(::cuda::std::mdspan<Key, extents<3>, Layout, Accessor> keys,  // [heads, tokens, dim], device
              rq_centroids_view<float const> centroids,  // [1|heads, splits, stages, ksub, dsub], device
              view<Code, 3> codes,                       // [heads, tokens, splits * stages], device
              cudaStream_t stream) const
  {
    kv_view<std::remove_const_t<Key> const> const k{keys};
    PQKV_EXPECTS(codes.extent(1) == k.extent(1), "gpu::rq_encoder.encode", "codes.extent(1)=", codes.extent(1),
                 ", keys.extent(1)=", k.extent(1));
    run(k, centroids, codes, 0, nullptr, stream, "gpu::rq_encoder.encode");
  }

  /// As above; `workspace` is not used (any span, may be empty).
  template <class Key, class Layout, class Accessor, RqCode Code>
    requires KvElement<std::remove_const_t<Key>>
  void encode(::cuda::std::mdspan<Key, extents<3>, Layout, Accessor> keys, rq_centroids_view<float const> centroids,
              view<Code, 3> codes, std::span<std::byte> /*workspace*/, cudaStream_t stream) const
  {
    encode(keys, centroids, codes, stream);
  }

  /// As `encode`, with centroids seen as [1|heads, splits * stages, ksub, dsub].
  template <class Key, class Layout, class Accessor, RqCode Code>
    requires KvElement<std::remove_const_t<Key>>
  void encode(::cuda::std::mdspan<Key, extents<3>, Layout, Accessor> keys, centroids_view<float const> centroids,
              view<Code, 3> codes, cudaStream_t stream) const
  {
    encode(keys, as_rq_centroids(centroids, config_, "gpu::rq_encoder.encode"), codes, stream);
  }

  /// As above; `workspace` is not used.
  template <class Key, class Layout, class Accessor, RqCode Code>
    requires KvElement<std::remove_const_t<Key>>
  void encode(::cuda::std::mdspan<Key, extents<3>, Layout, Accessor> keys, centroids_view<float const> centroids,
              view<Code, 3> codes, std::span<std::byte> /*workspace*/, cudaStream_t stream) const
  {
    encode(keys, as_rq_centroids(centroids, config_, "gpu::rq_encoder.encode"), codes, stream);
  }

  /// Encodes a decode step's rows keys_new [heads, t, dim] into code rows
  /// [position, position + t) of codes [heads, capacity, splits * stages];
  /// other rows are left as they are. Throws if position is outside [0,
  /// capacity - t]. Appending token by token gives the codes of one `encode`.
  template <class Key, class Layout, class Accessor, RqCode Code>
    requires KvElement<std::remove_const_t<Key>>
  void append(::cuda::std::mdspan<Key, extents<3>, Layout, Accessor> keys_new,  // [heads, t, dim], device
              rq_centroids_view<float const> centroids,  // [1|heads, splits, stages, ksub, dsub], device
              view<Code, 3> codes,                       // [heads, capacity, splits * stages], device
              index_t position, cudaStream_t stream) const
  {
    constexpr char const* where = "gpu::rq_encoder.append";
    kv_view<std::remove_const_t<Key> const> const k{keys_new};
    PQKV_EXPECTS(position >= 0, where, "position=", position, " must be >= 0");
    PQKV_EXPECTS(position <= codes.extent(1) - k.extent(1), where, "position=", position, " + keys_new.extent(1)=",
                 k.extent(1), " exceeds codes.extent(1)=", codes.extent(1));
    run(k, centroids, codes, position, nullptr, stream, where);
  }

  /// As above with the position read on the device from `position[0]`
  /// (int64), so a captured graph can be replayed as the sequence grows. A
  /// position outside [0, capacity - t] writes nothing.
  template <class Key, class Layout, class Accessor, RqCode Code>
    requires KvElement<std::remove_const_t<Key>>
  void append(::cuda::std::mdspan<Key, extents<3>, Layout, Accessor> keys_new,  // [heads, t, dim], device
              rq_centroids_view<float const> centroids,  // [1|heads, splits, stages, ksub, dsub], device
              view<Code, 3> codes,                       // [heads, capacity, splits * stages], device
              std::span<index_t const> position,         // [1], device
              cudaStream_t stream) const
  {
    constexpr char const* where = "gpu::rq_encoder.append";
    kv_view<std::remove_const_t<Key> const> const k{keys_new};
    PQKV_EXPECTS(position.size() == 1, where, "position.size()=", position.size(), " must be 1");
    PQKV_EXPECTS(position.data() != nullptr, where, "position.data() is null");
    PQKV_EXPECTS(k.extent(1) <= codes.extent(1), where, "keys_new.extent(1)=", k.extent(1),
                 " exceeds codes.extent(1)=", codes.extent(1));
    pqkv::detail::gpu_check::expect_device_pointer(position.data(), where, "position.data()");
    run(k, centroids, codes, 0, position.data(), stream, where);
  }

  /// `append` with centroids seen as [1|heads, splits * stages, ksub, dsub].
  template <class Key, class Layout, class Accessor, RqCode Code>
    requires KvElement<std::remove_const_t<Key>>
  void append(::cuda::std::mdspan<Key, extents<3>, Layout, Accessor> keys_new, centroids_view<float const> centroids,
              view<Code, 3> codes, index_t position, cudaStream_t stream) const
  {
    append(keys_new, as_rq_centroids(centroids, config_, "gpu::rq_encoder.append"), codes, position, stream);
  }

 private:
  template <class Key, class Code>
  void run(kv_view<Key const> keys, rq_centroids_view<float const> centroids, view<Code, 3> codes, index_t position,
           index_t const* position_dev, cudaStream_t stream, char const* where) const
  {
    namespace kern = pqkv::detail::rq_gpu;
    index_t const heads = keys.extent(0), tokens = keys.extent(1), dim = config_.dim;
    pqkv::detail::rq::check_code_type<Code>(config_.bits, where);
    PQKV_EXPECTS(keys.extent(2) == dim, where, "keys.extent(2)=", keys.extent(2), ", config.dim=", dim);
    PQKV_EXPECTS(codes.extent(0) == heads, where, "codes.extent(0)=", codes.extent(0), ", keys.extent(0)=", heads);
    PQKV_EXPECTS(codes.extent(2) == config_.codes_per_row(), where, "codes.extent(2)=", codes.extent(2),
                 ", config.splits * config.stages=", config_.codes_per_row());
    check_rq_centroids(centroids, config_, heads, where, false);  // device memory: finiteness is not checked
    pqkv::detail::gpu_check::expect_current_device(device_, where);
    if (heads == 0 || tokens == 0) { return; }
    PQKV_EXPECTS(keys.data_handle() != nullptr, where, "keys.data_handle() is null");
    PQKV_EXPECTS(codes.data_handle() != nullptr, where, "codes.data_handle() is null");
    pqkv::detail::gpu_check::expect_device_pointer(keys.data_handle(), where, "keys.data_handle()");
    pqkv::detail::gpu_check::expect_device_pointer(centroids.data_handle(), where, "centroids.data_handle()");
    pqkv::detail::gpu_check::expect_device_pointer(codes.data_handle(), where, "codes.data_handle()");
    kern::expect_aligned(centroids.data_handle(), 16, where, "centroids.data_handle()");

    kern::encode_args<Key> a{};
    a.keys = keys.data_handle();
    a.s0 = keys.stride(0);
    a.s1 = keys.stride(1);
    a.s2 = keys.stride(2);
    a.centroids = centroids.data_handle();
    a.codes = codes.data_handle();
    a.code_bytes = static_cast<int>(sizeof(Code));
    a.heads = heads;
    a.tokens = tokens;
    a.capacity = codes.extent(1);
    a.position = position;
    a.position_dev = position_dev;
    a.splits = config_.splits;
    a.stages = config_.stages;
    a.ksub = static_cast<int>(config_.ksub());
    a.dsub = static_cast<int>(config_.dsub());
    a.beam = config_.beam;
    a.shared = centroids.extent(0) == 1;
    a.map = kern::make_channel_map(config_);
    if (config_.beam > 1) {
      index_t const blocks = (heads * tokens * config_.splits + kern::beam_warps - 1) / kern::beam_warps;
      PQKV_EXPECTS(blocks <= 0x7fffffff, where, "heads * tokens * splits=", heads * tokens * config_.splits,
                   " is too many rows for one launch");
      kern::launch_beam(a, stream);
      return;
    }
    index_t const items = heads * tokens * config_.splits;
    if (items <= tuning_.row_path_max) {
      PQKV_EXPECTS(items * kern::row_cluster <= 0x7fffffff, where, "heads * tokens * splits=", items,
                   " is too many rows for one launch");
      kern::launch_greedy_rows(a, stream);
      return;
    }
    // Whole waves of resident blocks over the (head, split) problems; each
    // block takes whole 128-row tiles.
    index_t const problems = heads * config_.splits;
    index_t const tiles = (tokens + kern::bm - 1) / kern::bm;
    index_t const blocks = pqkv::detail::nearest_gpu::blocks_per_problem(problems, tiles, slots_, tiles);
    index_t const tiles_per_block = (tiles + blocks - 1) / blocks;
    a.rows_per_block = tiles_per_block * kern::bm;
    index_t const grid_y = (tiles + tiles_per_block - 1) / tiles_per_block;
    PQKV_EXPECTS(grid_y <= 65535, where, "tokens=", tokens, " need ", grid_y, " blocks per problem (> 65535)");
    kern::launch_greedy(a, static_cast<int>(grid_y), stream);
  }

  rq_config config_;
  rq_encode_tuning tuning_{};
  int device_ = 0;
  int sms_ = 132;
  index_t slots_ = 264;  ///< resident greedy blocks on the device
};

static_assert(Encoder<rq_encoder, float, cudaStream_t>);
static_assert(Encoder<rq_encoder, float, std::span<std::byte>, cudaStream_t>);
#if defined(PQKV_HAS_HALF)
static_assert(Encoder<rq_encoder, __half, cudaStream_t>);
#endif
#if defined(PQKV_HAS_BF16)
static_assert(Encoder<rq_encoder, __nv_bfloat16, std::span<std::byte>, cudaStream_t>);
#endif

}  // namespace pqkv::gpu

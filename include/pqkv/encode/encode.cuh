// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::gpu::pq_encoder`: nearest-centroid assignment of keys to PQ
/// codes on the GPU, for a whole prefill (`encode`) or a decode step's new
/// tokens (`append`, with the write position read from device memory).
///
/// Contract: exactly that of `pqkv::cpu::pq_encoder` (encode/encode.hpp), bit
/// for bit: the distance of sub-vector x to centroid c is the float chain
/// `d = 0; d = fma(x_i - c_i, x_i - c_i, d)` over channels ascending, the code
/// is the lowest index among the minima. The GPU evaluates the same chain, so
/// codes equal the CPU encoder's for the same keys and centroids.
///
/// Memory and ordering: the caller owns keys, centroids and codes (device
/// memory). A call needs no scratch (`workspace_bytes()` is 0; the overloads
/// with a workspace exist so the type models `Encoder<..., span<byte>,
/// cudaStream_t>`), allocates nothing, never synchronizes and launches one
/// kernel on `stream`, so it can be captured in a CUDA graph. `append` with a
/// device position can be replayed from a graph while the position grows; a
/// device position that would write past codes.extent(1) writes nothing.
///
/// Not checked (device memory): keys and centroids must be finite (the CPU
/// encoder throws on NaN/Inf; here such a key yields an unspecified code).
/// Supported shapes: dsub = dim / m in {4, 8, 16, 32, 64, 128} (m = 1..32 at
/// d = 128), nbits 1..8.

#include <pqkv/codebook/codebook.hpp>
#include <pqkv/core/concepts.hpp>
#include <pqkv/core/config.hpp>
#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/dtype.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/detail/encode_gpu_kernels.cuh>

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>

namespace pqkv::detail::gpu_check {

/// Throws unless `p` (non-null) is memory a kernel of the current device can
/// read: device, managed or registered/mapped host memory. A host call that
/// does not touch any stream, so it is legal while a graph is captured.
inline void expect_device_pointer(void const* p, char const* where, char const* what)
{
  cudaPointerAttributes attr{};
  cudaError_t const st = cudaPointerGetAttributes(&attr, p);
  if (st != cudaSuccess) {
    cudaGetLastError();
    PQKV_EXPECTS(false, where, what, " is not a pointer the CUDA runtime knows (", cudaGetErrorName(st), ")");
  }
  PQKV_EXPECTS(attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged ||
                 (attr.type == cudaMemoryTypeHost && attr.devicePointer != nullptr),
               where, what, " is not device-accessible memory (pageable host memory?)");
}

}  // namespace pqkv::detail::gpu_check

namespace pqkv::gpu {

/// GPU PQ encoder for one `pq_config`; models `pqkv::Encoder` with
/// `(cudaStream_t)` and with `(std::span<std::byte>, cudaStream_t)`.
class pq_encoder {
 public:
  /// Validates `config` (and that dsub is one the kernels are built for) and
  /// raises the kernels' shared-memory limit on the current device; throws
  /// `pqkv::error`. Calls must run on the device that was current here.
  explicit pq_encoder(pq_config const& config) : config_{config}
  {
    constexpr char const* where = "gpu::pq_encoder";
    config_.validate(where);
    PQKV_EXPECTS(pqkv::detail::nearest_gpu::dsub_supported(config_.dsub()), where, "dim / m=", config_.dsub(),
                 " is not one of 4, 8, 16, 32, 64, 128");
    namespace kern = pqkv::detail::nearest_gpu;
    int const dsub = static_cast<int>(config_.dsub()), ksub = static_cast<int>(config_.ksub());
    int device = 0, sms = 0, optin = 0;
    PQKV_CUDA_TRY(cudaGetDevice(&device));
    PQKV_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    PQKV_CUDA_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    PQKV_EXPECTS(kern::encode_smem_bytes(dsub, ksub) <= static_cast<std::size_t>(optin), where, "dsub=", dsub,
                 ", ksub=", ksub, " need ", kern::encode_smem_bytes(dsub, ksub),
                 " bytes of shared memory; the device allows ", optin);
    sms_ = sms > 0 ? sms : 132;
    kern::prepare_encode<float>(dsub, ksub);
    slots_ = static_cast<index_t>(sms_) * kern::encode_occupancy<float>(dsub, ksub);
#if defined(PQKV_HAS_HALF)
    kern::prepare_encode<__half>(dsub, ksub);
#endif
#if defined(PQKV_HAS_BF16)
    kern::prepare_encode<__nv_bfloat16>(dsub, ksub);
#endif
  }

  [[nodiscard]] pq_config const& config() const noexcept { return config_; }
  /// Scratch a call needs: none.
  [[nodiscard]] static constexpr std::size_t workspace_bytes() noexcept { return 0; }

  /// codes [heads, tokens, m] for keys [heads, tokens, dim] (float, half or
  /// bf16; any strides), all in device memory. Throws `pqkv::error` before
  /// any launch on a shape mismatch or a null / host pointer.
  template <class Key, class Layout, class Accessor>
    requires KvElement<std::remove_const_t<Key>>
  void encode(::cuda::std::mdspan<Key, extents<3>, Layout, Accessor> keys,  // [heads, tokens, dim], device
              centroids_view<float const> centroids,                        // [heads, m, ksub, dsub], device
              codes_view<std::uint8_t> codes,                               // [heads, tokens, m], device
              cudaStream_t stream) const
  {
    kv_view<std::remove_const_t<Key> const> const k{keys};
    PQKV_EXPECTS(codes.extent(1) == k.extent(1), "gpu::pq_encoder.encode", "codes.extent(1)=", codes.extent(1),
                 ", keys.extent(1)=", k.extent(1));
    run(k, centroids, codes, 0, nullptr, stream, "gpu::pq_encoder.encode");
  }

  /// As above; `workspace` is not used (any span, may be empty).
  template <class Key, class Layout, class Accessor>
    requires KvElement<std::remove_const_t<Key>>
  void encode(::cuda::std::mdspan<Key, extents<3>, Layout, Accessor> keys, centroids_view<float const> centroids,
              codes_view<std::uint8_t> codes, std::span<std::byte> /*workspace*/, cudaStream_t stream) const
  {
    encode(keys, centroids, codes, stream);
  }

  /// Encodes a decode step's keys_new [heads, t, dim] into code rows
  /// [position, position + t) of codes [heads, capacity, m]; other rows are
  /// left as they are. Throws if position is outside [0, capacity - t].
  template <class Key, class Layout, class Accessor>
    requires KvElement<std::remove_const_t<Key>>
  void append(::cuda::std::mdspan<Key, extents<3>, Layout, Accessor> keys_new,  // [heads, t, dim], device
              centroids_view<float const> centroids,                            // [heads, m, ksub, dsub], device
              codes_view<std::uint8_t> codes,                                   // [heads, capacity, m], device
              index_t position, cudaStream_t stream) const
  {
    constexpr char const* where = "gpu::pq_encoder.append";
    kv_view<std::remove_const_t<Key> const> const k{keys_new};
    PQKV_EXPECTS(position >= 0, where, "position=", position, " must be >= 0");
    PQKV_EXPECTS(position <= codes.extent(1) - k.extent(1), where, "position=", position, " + keys_new.extent(1)=",
                 k.extent(1), " exceeds codes.extent(1)=", codes.extent(1));
    run(k, centroids, codes, position, nullptr, stream, where);
  }

  /// As above with the position read on the device from `position[0]`
  /// (int64), so a captured graph can be replayed as the sequence grows. A
  /// position outside [0, capacity - t] writes nothing.
  template <class Key, class Layout, class Accessor>
    requires KvElement<std::remove_const_t<Key>>
  void append(::cuda::std::mdspan<Key, extents<3>, Layout, Accessor> keys_new,  // [heads, t, dim], device
              centroids_view<float const> centroids,                            // [heads, m, ksub, dsub], device
              codes_view<std::uint8_t> codes,                                   // [heads, capacity, m], device
              std::span<index_t const> position,                               // [1], device
              cudaStream_t stream) const
  {
    constexpr char const* where = "gpu::pq_encoder.append";
    kv_view<std::remove_const_t<Key> const> const k{keys_new};
    PQKV_EXPECTS(position.size() == 1, where, "position.size()=", position.size(), " must be 1");
    PQKV_EXPECTS(position.data() != nullptr, where, "position.data() is null");
    PQKV_EXPECTS(k.extent(1) <= codes.extent(1), where, "keys_new.extent(1)=", k.extent(1),
                 " exceeds codes.extent(1)=", codes.extent(1));
    pqkv::detail::gpu_check::expect_device_pointer(position.data(), where, "position.data()");
    run(k, centroids, codes, 0, position.data(), stream, where);
  }

 private:
  template <class Key>
  void run(kv_view<Key const> keys, centroids_view<float const> centroids, codes_view<std::uint8_t> codes,
           index_t position, index_t const* position_dev, cudaStream_t stream, char const* where) const
  {
    namespace kern = pqkv::detail::nearest_gpu;
    index_t const heads = keys.extent(0), tokens = keys.extent(1), m = config_.m;
    PQKV_EXPECTS(keys.extent(2) == config_.dim, where, "keys.extent(2)=", keys.extent(2), ", config.dim=",
                 config_.dim);
    PQKV_EXPECTS(codes.extent(0) == heads, where, "codes.extent(0)=", codes.extent(0), ", keys.extent(0)=", heads);
    PQKV_EXPECTS(codes.extent(2) == m, where, "codes.extent(2)=", codes.extent(2), ", config.m=", m);
    check_centroids(centroids, config_, heads, where);
    if (heads == 0 || tokens == 0) { return; }
    PQKV_EXPECTS(keys.data_handle() != nullptr, where, "keys.data_handle() is null");
    PQKV_EXPECTS(codes.data_handle() != nullptr, where, "codes.data_handle() is null");
    PQKV_EXPECTS(centroids.data_handle() != nullptr, where, "centroids.data_handle() is null");
    pqkv::detail::gpu_check::expect_device_pointer(keys.data_handle(), where, "keys.data_handle()");
    pqkv::detail::gpu_check::expect_device_pointer(centroids.data_handle(), where, "centroids.data_handle()");
    pqkv::detail::gpu_check::expect_device_pointer(codes.data_handle(), where, "codes.data_handle()");

    kern::encode_args<Key> a{};
    a.keys = keys.data_handle();
    a.s0 = keys.stride(0);
    a.s1 = keys.stride(1);
    a.s2 = keys.stride(2);
    a.centroids = centroids.data_handle();
    a.codes = codes.data_handle();
    a.tokens = tokens;
    a.capacity = codes.extent(1);
    a.position = position;
    a.position_dev = position_dev;
    a.m = static_cast<int>(m);
    a.ksub = static_cast<int>(config_.ksub());
    // One wave of resident blocks over all problems; each block loads its
    // problem's centroids once and takes whole 128-row tiles.
    index_t const problems = heads * m;
    index_t const tiles = (tokens + kern::bm - 1) / kern::bm;
    index_t const blocks = kern::blocks_per_problem(problems, tiles, slots_, tiles);
    index_t const tiles_per_block = (tiles + blocks - 1) / blocks;
    a.rows_per_block = tiles_per_block * kern::bm;
    index_t const grid_y = (tiles + tiles_per_block - 1) / tiles_per_block;
    PQKV_EXPECTS(grid_y <= 65535, where, "tokens=", tokens, " need ", grid_y, " blocks per problem (> 65535)");
    kern::launch_encode(a, static_cast<int>(config_.dsub()), static_cast<int>(problems), static_cast<int>(grid_y),
                        stream);
  }

  pq_config config_;
  int sms_ = 132;
  index_t slots_ = 132;  ///< resident encode blocks on the device
};

static_assert(Encoder<pq_encoder, float, cudaStream_t>);
static_assert(Encoder<pq_encoder, float, std::span<std::byte>, cudaStream_t>);
#if defined(PQKV_HAS_HALF)
static_assert(Encoder<pq_encoder, __half, cudaStream_t>);
#endif
#if defined(PQKV_HAS_BF16)
static_assert(Encoder<pq_encoder, __nv_bfloat16, std::span<std::byte>, cudaStream_t>);
#endif

}  // namespace pqkv::gpu

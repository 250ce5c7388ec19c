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
///
/// Paths: the FP32 (SIMT) tile engine evaluates every distance with the
/// reference's chain; the tensor-core path (detail/assign_tc_kernels.cuh)
/// finds candidates with BF16 MMAs under a rigorous error bound and
/// re-checks them with the same chain, so both give the same codes. `auto`
/// keeps the FP32 path (measured faster so far; detail/assign_tc_kernels.cuh
/// says where); `assign_tuning` forces either.

#include <pqkv/codebook/codebook.hpp>
#include <pqkv/core/concepts.hpp>
#include <pqkv/core/config.hpp>
#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/device_check.cuh>
#include <pqkv/core/dtype.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/detail/assign_tc_kernels.cuh>
#include <pqkv/detail/encode_gpu_kernels.cuh>

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>


namespace pqkv::gpu {

/// Which nearest-centroid engine a GPU encoder or trainer uses.
enum class assign_path {
  automatic,    ///< tensor cores where they pay (measured: nowhere yet), FP32 otherwise
  simt,         ///< FP32 units: every distance by the reference's chain
  tensor_core,  ///< BF16 candidates + exact re-check (throws where unsupported)
};

/// Tuning of the assignment step (`pq_encoder`, `kmeans_trainer`).
struct assign_tuning {
  assign_path path = assign_path::automatic;
  /// Optional device counter: the tensor-core path adds the number of rows
  /// that took its exact fallback scan (too many near-tied candidates).
  unsigned long long* fallback_counter = nullptr;
};

/// Whether `t` selects the tensor-core path for (dsub, ksub); throws where it is forced but unsupported.
[[nodiscard]] inline bool use_tensor_cores(assign_tuning const& t, index_t dsub, index_t ksub, char const* where)
{
  namespace tc = pqkv::detail::assign_tc;
  if (t.path == assign_path::tensor_core) {
    PQKV_EXPECTS(tc::supported(dsub, ksub), where, "assign_path::tensor_core needs dsub in {16, 32, 64, 128} and ",
                 "ksub in [16, 256]; dsub=", dsub, ", ksub=", ksub);
    return true;
  }
  return t.path == assign_path::automatic && tc::pays(dsub, ksub);
}

/// GPU PQ encoder for one `pq_config`; models `pqkv::Encoder` with
/// `(cudaStream_t)` and with `(std::span<std::byte>, cudaStream_t)`. Lives on
/// the device current at construction; calls from another device throw.
class pq_encoder {
 public:
  /// Validates `config` (and that dsub is one the kernels are built for) and
  /// raises the kernels' shared-memory limit on the current device; throws
  /// `pqkv::error`. Calls must run on the device that was current here.
  explicit pq_encoder(pq_config const& config, assign_tuning const& tuning = {}) : config_{config}, tuning_{tuning}
  {
    constexpr char const* where = "gpu::pq_encoder";
    config_.validate(where);
    PQKV_EXPECTS(pqkv::detail::nearest_gpu::dsub_supported(config_.dsub()), where, "dim / m=", config_.dsub(),
                 " is not one of 4, 8, 16, 32, 64, 128");
    tc_ = use_tensor_cores(tuning_, config_.dsub(), config_.ksub(), where);
    if (tuning_.fallback_counter != nullptr) {
      pqkv::detail::gpu_check::expect_device_pointer(tuning_.fallback_counter, where, "tuning.fallback_counter");
    }
    namespace kern = pqkv::detail::nearest_gpu;
    int const dsub = static_cast<int>(config_.dsub()), ksub = static_cast<int>(config_.ksub());
    int sms = 0, optin = 0;
    PQKV_CUDA_TRY(cudaGetDevice(&device_));
    PQKV_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device_));
    PQKV_CUDA_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device_));
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
    if (tc_) {
      namespace tc = pqkv::detail::assign_tc;
      PQKV_EXPECTS(tc::smem_bytes(dsub) <= static_cast<std::size_t>(optin), where, "the tensor-core path needs ",
                   tc::smem_bytes(dsub), " bytes of shared memory; the device allows ", optin);
      tc::prepare<float, tc::chain::exact, false>(dsub);
#if defined(PQKV_HAS_HALF)
      tc::prepare<__half, tc::chain::exact, false>(dsub);
#endif
#if defined(PQKV_HAS_BF16)
      tc::prepare<__nv_bfloat16, tc::chain::exact, false>(dsub);
#endif
    }
  }

  [[nodiscard]] pq_config const& config() const noexcept { return config_; }
  [[nodiscard]] assign_tuning const& tuning() const noexcept { return tuning_; }
  /// The device the encoder was built on (calls must run there).
  [[nodiscard]] int device() const noexcept { return device_; }
  /// Whether a call of `tokens` rows per head takes the tensor-core path.
  [[nodiscard]] bool uses_tensor_cores(index_t tokens) const noexcept
  {
    return tc_ && (tuning_.path == assign_path::tensor_core || tokens >= tc_min_tokens);
  }
  /// Scratch a call needs: none.
  [[nodiscard]] static constexpr std::size_t workspace_bytes() noexcept { return 0; }

  /// codes [heads, tokens, m] for keys [heads, tokens, dim] (float, half or
  /// bf16; any strides), all in device memory. The codes may hold more rows
  /// than the keys (a buffer sized for the whole context): the first `tokens`
  /// rows of each head are written, the others left as they are. Throws `pqkv::error` before
  /// any launch on a shape mismatch or a null / host pointer.
  template <class Key, class Layout, class Accessor>
    requires KvElement<std::remove_const_t<Key>>
  void encode(::cuda::std::mdspan<Key, extents<3>, Layout, Accessor> keys,  // [heads, tokens, dim], device
              centroids_view<float const> centroids,                        // [heads, m, ksub, dsub], device
              codes_view<std::uint8_t> codes,                               // [heads, >= tokens, m], device
              cudaStream_t stream) const
  {
    kv_view<std::remove_const_t<Key> const> const k{keys};
    PQKV_EXPECTS(codes.extent(1) >= k.extent(1), "gpu::pq_encoder.encode", "codes.extent(1)=", codes.extent(1),
                 " < keys.extent(1)=", k.extent(1));
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
    pqkv::detail::gpu_check::expect_current_device(device_, where);
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

    if (uses_tensor_cores(tokens)) {
      namespace tc = pqkv::detail::assign_tc;
      tc::args<Key> t{};
      t.x = keys.data_handle();
      t.s0 = keys.stride(0);
      t.s1 = keys.stride(1);
      t.s2 = keys.stride(2);
      t.ss = config_.dsub() * keys.stride(2);
      t.centroids = centroids.data_handle();
      t.n = tokens;
      t.m = static_cast<int>(m);
      t.ksub = static_cast<int>(config_.ksub());
      t.tiles_per_block = tc::tiles_per_block(heads * m, tokens, sms_);
      t.codes = codes.data_handle();
      t.capacity = codes.extent(1);
      t.position = position;
      t.position_dev = position_dev;
      t.fallbacks = tuning_.fallback_counter;
      index_t const grid_y = ((tokens + tc::rows - 1) / tc::rows + t.tiles_per_block - 1) / t.tiles_per_block;
      PQKV_EXPECTS(grid_y <= 65535 && heads * m <= 2147483647, where, "tokens=", tokens, " need ", grid_y,
                   " blocks per problem (> 65535)");
      tc::launch<Key, tc::chain::exact, false>(t, static_cast<int>(config_.dsub()), static_cast<int>(heads * m),
                                                stream);
      return;
    }
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

  static constexpr index_t tc_min_tokens = 64;  ///< `automatic`: fewer rows per head stay on the FP32 path

  pq_config config_;
  assign_tuning tuning_;
  bool tc_ = false;
  int device_ = 0;       ///< current at construction: kernel limits and occupancy are its own
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

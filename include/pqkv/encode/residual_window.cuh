// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::gpu::rq_window`: the KV cache of one layer as VQKV keeps it
/// -- the first `sink` tokens and the latest `local` ones in 16 bits, every
/// token between them as residual codes of K and V -- with the tokens that
/// leave the window encoded on the device as decoding goes on.
///
/// Contract, for n tokens held (rows 0..n-1 of each KV head):
/// - `coded_count(n)` = 0 while n <= sink + local, else
///   floor((n - sink - local) / chunk) * chunk: tokens leave the window a
///   whole chunk at a time, so between `local` and `local + chunk - 1` of the
///   latest tokens stay in 16 bits (chunk = 1: exactly `local`).
/// - Key and value code row r (r < coded_count(n)) is token sink + r, encoded
///   by `gpu::rq_encoder` from its stored T values: the codes of one
///   `rq_encoder::encode` of rows [sink, sink + coded) bit for bit, however
///   the tokens arrived (prefill or appends of any sizes).
/// - Token p < sink is row p of the sink buffers; token p >= sink + coded is
///   slot (p - sink) % (local + chunk) of the ring buffers. Slots of other
///   tokens hold stale rows.
/// - `length()` and `coded()` are device int64 values (e.g. the device length
///   of `gpu::code_attention`, which reads code rows [0, coded)).
///
/// A step (`append` of t <= chunk tokens) is four launches on `stream`: stage
/// the chunk leaving the window (if any), encode its keys, its values, then
/// store the new rows and publish the length. It reads the length on the
/// device, allocates nothing and never synchronizes, so one captured step can
/// be replayed as the sequence grows. An append past `capacity` writes
/// nothing and counts one overflow (`overflows()`); the length stays.
///
/// Memory: the window owns its device buffers (allocated at construction):
/// per KV head, sink + local + 2 chunk rows of K and V in T, and
/// (capacity - sink) code rows of each. The centroids are viewed, not owned.

#include <pqkv/codebook/residual.hpp>
#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/device_buffer.cuh>
#include <pqkv/core/device_check.cuh>
#include <pqkv/core/dtype.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/detail/residual_window_kernels.cuh>
#include <pqkv/encode/residual.cuh>
#include <pqkv/encode/residual.hpp>
#include <pqkv/encode/residual_window.hpp>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <span>
#include <type_traits>

namespace pqkv::gpu {

/// A layer's KV cache as sink + residual codes + local window (the file's
/// contract). T: the 16-bit storage type (`__half`, `__nv_bfloat16`; float
/// also works); KCode, VCode: uint8 for bits <= 8, else uint16.
template <KvElement T, RqCode KCode = std::uint8_t, RqCode VCode = KCode>
class rq_window {
 public:
  /// Validates the shape, both configs (dim equal to the shape's) against the
  /// code types, and the centroid views ([1 | kv_heads, ...], device, 16-byte
  /// aligned); allocates the buffers and zeroes the state. Throws
  /// `pqkv::error`.
  rq_window(rq_window_shape const& shape, rq_config key_config, rq_centroids_view<float const> key_centroids,
            rq_config value_config, rq_centroids_view<float const> value_centroids, rq_encode_tuning tuning = {})
    : shape_{(shape.validate("gpu::rq_window"), shape)},
      key_enc_{std::move(key_config), tuning},
      value_enc_{std::move(value_config), tuning},
      key_centroids_{key_centroids},
      value_centroids_{value_centroids}
  {
    constexpr char const* where = "gpu::rq_window";
    pqkv::detail::rq::check_code_type<KCode>(key_enc_.config().bits, where);
    pqkv::detail::rq::check_code_type<VCode>(value_enc_.config().bits, where);
    check_side(key_enc_.config(), key_centroids, "key");
    check_side(value_enc_.config(), value_centroids, "value");
    auto const rows = [&](index_t r) { return static_cast<std::size_t>(shape_.kv_heads * r * shape_.dim); };
    k_sink_ = device_buffer<T>(rows(shape_.sink));
    v_sink_ = device_buffer<T>(rows(shape_.sink));
    k_ring_ = device_buffer<T>(rows(shape_.ring()));
    v_ring_ = device_buffer<T>(rows(shape_.ring()));
    k_stage_ = device_buffer<T>(rows(shape_.chunk));
    v_stage_ = device_buffer<T>(rows(shape_.chunk));
    k_codes_ = device_buffer<KCode>(
      static_cast<std::size_t>(shape_.kv_heads * shape_.code_rows() * key_enc_.config().codes_per_row()));
    v_codes_ = device_buffer<VCode>(
      static_cast<std::size_t>(shape_.kv_heads * shape_.code_rows() * value_enc_.config().codes_per_row()));
    state_ = device_buffer<pqkv::detail::rq_window::state>(1);
    PQKV_CUDA_TRY(cudaGetDevice(&device_));
    PQKV_CUDA_TRY(cudaMemset(state_.data(), 0, sizeof(pqkv::detail::rq_window::state)));
  }

  [[nodiscard]] rq_window_shape const& shape() const noexcept { return shape_; }
  [[nodiscard]] rq_config const& key_config() const noexcept { return key_enc_.config(); }
  [[nodiscard]] rq_config const& value_config() const noexcept { return value_enc_.config(); }
  [[nodiscard]] int device() const noexcept { return device_; }

  /// Replaces the contents with the n tokens of k, v [kv_heads, n, dim]
  /// (device, any strides): sink and window rows copied, the rows between
  /// encoded. Throws `pqkv::error` before any launch on a shape mismatch, n
  /// over capacity, a null or host pointer.
  template <class LK, class AK, class LV, class AV>
  void prefill(::cuda::std::mdspan<T const, extents<3>, LK, AK> keys,
               ::cuda::std::mdspan<T const, extents<3>, LV, AV> values, cudaStream_t stream)
  {
    constexpr char const* where = "gpu::rq_window.prefill";
    kv_view<T const> const k{keys}, v{values};
    check_rows(k, v, where);
    index_t const n = k.extent(1);
    PQKV_EXPECTS(n <= shape_.capacity, where, "keys.extent(1)=", n, " exceeds capacity=", shape_.capacity);
    namespace kern = pqkv::detail::rq_window;
    if (n == 0) {
      reset(stream);
      return;
    }
    kern::prefill_kernel<T><<<kern::grid_for(shape_.kv_heads * n * shape_.dim), kern::threads, 0, stream>>>(
      buffers(), shape_, k.data_handle(), v.data_handle(), k.stride(0), k.stride(1), k.stride(2), v.stride(0),
      v.stride(1), v.stride(2), n);
    PQKV_CUDA_CHECK_LAST();
    index_t const e = shape_.coded_count(n);
    if (e == 0) { return; }
    auto const middle = [&](kv_view<T const> x) {
      return make_strided_view<T const, 3>(x.data_handle() + shape_.sink * x.stride(1), {x.extent(0), e, x.extent(2)},
                                           {x.stride(0), x.stride(1), x.stride(2)});
    };
    key_enc_.append(middle(k), key_centroids_, key_codes_mut(), 0, stream);
    value_enc_.append(middle(v), value_centroids_, value_codes_mut(), 0, stream);
  }

  /// Appends t = k_new.extent(1) tokens (1 <= t <= chunk) of k_new, v_new
  /// [kv_heads, t, dim] (device, any strides) at the device-side length
  /// (graph-capturable; the file's step). Throws `pqkv::error` before any
  /// launch on a shape mismatch, t outside [1, chunk], a null or host pointer.
  template <class LK, class AK, class LV, class AV>
  void append(::cuda::std::mdspan<T const, extents<3>, LK, AK> keys_new,
              ::cuda::std::mdspan<T const, extents<3>, LV, AV> values_new, cudaStream_t stream)
  {
    constexpr char const* where = "gpu::rq_window.append";
    kv_view<T const> const k{keys_new}, v{values_new};
    check_rows(k, v, where);
    index_t const t = k.extent(1);
    PQKV_EXPECTS(t >= 1 && t <= shape_.chunk, where, "keys_new.extent(1)=", t, " is outside [1, chunk=", shape_.chunk,
                 "]");
    namespace kern = pqkv::detail::rq_window;
    auto const b = buffers();
    kern::plan_kernel<T><<<kern::grid_for(shape_.kv_heads * shape_.chunk * shape_.dim), kern::threads, 0, stream>>>(
      b, shape_, t);
    PQKV_CUDA_CHECK_LAST();
    std::span<index_t const> const at{&state_.data()->encode_at, 1};
    auto const stage = [&](T const* p) { return make_view<T const>(p, shape_.kv_heads, shape_.chunk, shape_.dim); };
    key_enc_.append(stage(b.k_stage), key_centroids_, key_codes_mut(), at, stream);
    value_enc_.append(stage(b.v_stage), value_centroids_, value_codes_mut(), at, stream);
    kern::store_kernel<T><<<kern::grid_for(shape_.kv_heads * t * shape_.dim), kern::threads, 0, stream>>>(
      b, shape_, k.data_handle(), v.data_handle(), k.stride(0), k.stride(1), k.stride(2), v.stride(0),
      v.stride(1), v.stride(2), t);
    PQKV_CUDA_CHECK_LAST();
  }

  /// Empties the window (length, coded and the overflow count to 0).
  void reset(cudaStream_t stream)
  {
    pqkv::detail::gpu_check::expect_current_device(device_, "gpu::rq_window.reset");
    PQKV_CUDA_TRY(cudaMemsetAsync(state_.data(), 0, sizeof(pqkv::detail::rq_window::state), stream));
  }

  /// Tokens held, coded tokens and refused appends: one device int64 each.
  [[nodiscard]] std::span<index_t const> length() const noexcept { return {&state_.data()->length, 1}; }
  [[nodiscard]] std::span<index_t const> coded() const noexcept { return {&state_.data()->coded, 1}; }
  [[nodiscard]] std::span<index_t const> overflows() const noexcept { return {&state_.data()->overflows, 1}; }

  /// [kv_heads, sink, dim] and [kv_heads, local + chunk, dim] (device).
  [[nodiscard]] view<T const, 3> sink_keys() const noexcept { return rows_view(k_sink_.data(), shape_.sink); }
  [[nodiscard]] view<T const, 3> sink_values() const noexcept { return rows_view(v_sink_.data(), shape_.sink); }
  [[nodiscard]] view<T const, 3> ring_keys() const noexcept { return rows_view(k_ring_.data(), shape_.ring()); }
  [[nodiscard]] view<T const, 3> ring_values() const noexcept { return rows_view(v_ring_.data(), shape_.ring()); }
  /// [kv_heads, capacity - sink, splits * stages] (device); rows [0, coded) are live.
  [[nodiscard]] view<KCode const, 3> key_codes() const noexcept { return pqkv::as_const(key_codes_mut()); }
  [[nodiscard]] view<VCode const, 3> value_codes() const noexcept { return pqkv::as_const(value_codes_mut()); }

 private:
  void check_side(rq_config const& cfg, rq_centroids_view<float const> c, char const* side) const
  {
    constexpr char const* where = "gpu::rq_window";
    PQKV_EXPECTS(cfg.dim == shape_.dim, where, side, "_config.dim=", cfg.dim, ", shape.dim=", shape_.dim);
    check_rq_centroids(c, cfg, shape_.kv_heads, where, false);
    PQKV_EXPECTS(c.data_handle() != nullptr, where, side, "_centroids is null");
    pqkv::detail::gpu_check::expect_device_pointer(c.data_handle(), where, side);
    pqkv::detail::rq_gpu::expect_aligned(c.data_handle(), 16, where, side);
  }

  void check_rows(kv_view<T const> k, kv_view<T const> v, char const* where) const
  {
    pqkv::detail::gpu_check::expect_current_device(device_, where);
    PQKV_EXPECTS(k.extent(0) == shape_.kv_heads && k.extent(2) == shape_.dim, where, "keys extents (", k.extent(0),
                 ", ", k.extent(1), ", ", k.extent(2), ") differ from (kv_heads=", shape_.kv_heads,
                 ", t, dim=", shape_.dim, ")");
    PQKV_EXPECTS(v.extent(0) == k.extent(0) && v.extent(1) == k.extent(1) && v.extent(2) == k.extent(2), where,
                 "values extents (", v.extent(0), ", ", v.extent(1), ", ", v.extent(2), ") differ from the keys' (",
                 k.extent(0), ", ", k.extent(1), ", ", k.extent(2), ")");
    if (k.extent(1) == 0) { return; }
    PQKV_EXPECTS(k.data_handle() != nullptr && v.data_handle() != nullptr, where, "keys or values data is null");
    pqkv::detail::gpu_check::expect_device_pointer(k.data_handle(), where, "keys.data_handle()");
    pqkv::detail::gpu_check::expect_device_pointer(v.data_handle(), where, "values.data_handle()");
  }

  [[nodiscard]] pqkv::detail::rq_window::buffers<T> buffers() const noexcept
  {
    return {k_sink_.data(), v_sink_.data(), k_ring_.data(), v_ring_.data(), k_stage_.data(), v_stage_.data(),
            state_.data()};
  }
  [[nodiscard]] view<T const, 3> rows_view(T const* p, index_t rows) const noexcept
  {
    return make_view<T const>(p, shape_.kv_heads, rows, shape_.dim);
  }
  [[nodiscard]] view<KCode, 3> key_codes_mut() const noexcept
  {
    return make_view<KCode>(k_codes_.data(), shape_.kv_heads, shape_.code_rows(), key_enc_.config().codes_per_row());
  }
  [[nodiscard]] view<VCode, 3> value_codes_mut() const noexcept
  {
    return make_view<VCode>(v_codes_.data(), shape_.kv_heads, shape_.code_rows(),
                            value_enc_.config().codes_per_row());
  }

  rq_window_shape shape_;
  rq_encoder key_enc_, value_enc_;
  rq_centroids_view<float const> key_centroids_, value_centroids_;
  device_buffer<T> k_sink_, v_sink_, k_ring_, v_ring_, k_stage_, v_stage_;
  device_buffer<KCode> k_codes_;
  device_buffer<VCode> v_codes_;
  device_buffer<pqkv::detail::rq_window::state> state_;
  int device_ = 0;
};

}  // namespace pqkv::gpu

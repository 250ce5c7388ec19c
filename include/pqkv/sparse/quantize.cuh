// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::gpu::center_quantize`: the GPU version of
/// `pqkv::cpu::center_quantize` (sparse/quantize.hpp). Same contract, same
/// bits: codes, scales and means equal the CPU's for every input.
///
/// How the bits are kept: the mean is the reference's ascending double sum.
/// The GPU adds per-slice double sums in another order, which gives the same
/// double whenever no partial sum rounds (checked per channel on the device:
/// every value a multiple of 2^L and sum |x| < 2^(L+53); always so for bf16
/// and half rows of realistic range); otherwise that channel repeats the
/// ascending loop in one thread (slow, exact). amax is an order-free max; the
/// scale, inverse and code are the contract's IEEE float operations
/// (`__fsub_rn`, `__fmul_rn`, `__fdiv_rn`, `roundf`), so nothing is contracted
/// into an FMA.
///
/// Memory and ordering: the caller owns everything; the call allocates
/// nothing, never synchronizes and reads no device memory on the host
/// (capturable in a CUDA graph). cu_seqlens live on the device and are not
/// checked there: they must start at 0, not decrease and end at tokens.

#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/views.hpp>
#include <pqkv/detail/sale_kernels.cuh>
#include <pqkv/sparse/quantize.hpp>

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <type_traits>

namespace pqkv::gpu {

/// An upper bound on `quant_group_count` for `batch` sequences of `tokens`
/// tokens in all, whatever their lengths: (tokens + batch (group - 1)) / group.
[[nodiscard]] constexpr index_t quant_group_bound(index_t tokens, index_t batch, index_t group) noexcept
{
  return (tokens + batch * (group - 1)) / group;
}

/// Bytes of scratch `center_quantize` needs for `heads` heads of dim `dim`
/// over `batch` sequences (16-byte aligned start).
[[nodiscard]] constexpr std::size_t center_quantize_workspace_bytes(index_t heads, index_t batch, index_t dim) noexcept
{
  auto const slots = static_cast<std::size_t>(batch * heads * pqkv::detail::sale_gpu::mean_splits * dim);
  auto const up = [](std::size_t b) { return (b + 255) / 256 * 256; };
  return up(slots * sizeof(double)) * 2 + up(slots * sizeof(int)) + up(static_cast<std::size_t>(batch + 1) * 4);
}

namespace detail {

/// Device strides of a kv_view as the kernels' accessor.
template <class T>
pqkv::detail::strided3<T> accessor(kv_view<T const> x)
{
  return {x.data_handle(), x.mapping().stride(0), x.mapping().stride(1), x.mapping().stride(2)};
}

/// Workspace pieces of the mean kernels.
struct quantize_scratch {
  double* psum;
  double* pabs;
  int* plow;
  std::int32_t* goff;
};

inline quantize_scratch carve_quantize(std::byte* base, index_t heads, index_t batch, index_t dim)
{
  auto const slots = static_cast<std::size_t>(batch * heads * pqkv::detail::sale_gpu::mean_splits * dim);
  auto const up = [](std::size_t b) { return (b + 255) / 256 * 256; };
  quantize_scratch s{};
  s.psum = reinterpret_cast<double*>(base);
  s.pabs = reinterpret_cast<double*>(base + up(slots * sizeof(double)));
  s.plow = reinterpret_cast<int*>(base + 2 * up(slots * sizeof(double)));
  s.goff = reinterpret_cast<std::int32_t*>(base + 2 * up(slots * sizeof(double)) + up(slots * sizeof(int)));
  return s;
}

/// The launches of one center_quantize (arguments already checked).
/// row_scale [heads, tokens] (each row's group scale) is optional (null).
template <class T>
void launch_center_quantize(kv_view<T const> x, std::int32_t const* cu, index_t batch, quant_config const& cfg,
                            std::int8_t* codes, float* scales, index_t scale_stride, float* means, float* row_scale,
                            quantize_scratch const& ws, cudaStream_t stream)
{
  namespace k = pqkv::detail::sale_gpu;
  index_t const heads = x.extent(0), tokens = x.extent(1), dim = x.extent(2);
  if (heads == 0 || batch == 0) { return; }
  auto const acc = accessor(x);
  k::seq_setup_kernel<><<<1, 32, 0, stream>>>(cu, ws.goff, static_cast<int>(batch), static_cast<int>(cfg.group));
  PQKV_CUDA_CHECK_LAST();
  dim3 const pgrid(k::mean_splits, static_cast<unsigned>(heads), static_cast<unsigned>(batch));
  k::mean_part_kernel<T><<<pgrid, k::mean_threads, 0, stream>>>(acc, cu, static_cast<int>(heads),
                                                                 static_cast<int>(dim), ws.psum, ws.pabs, ws.plow);
  PQKV_CUDA_CHECK_LAST();
  auto const channels = static_cast<unsigned>(batch * heads * dim);
  k::mean_final_kernel<T><<<(channels + 127) / 128, 128, 0, stream>>>(acc, cu, static_cast<int>(batch),
                                                                      static_cast<int>(heads), static_cast<int>(dim),
                                                                      ws.psum, ws.pabs, ws.plow, means);
  PQKV_CUDA_CHECK_LAST();
  index_t const bound = quant_group_bound(tokens, batch, cfg.group);
  if (bound == 0) { return; }
  dim3 const qgrid(static_cast<unsigned>((bound * 32 + 255) / 256), static_cast<unsigned>(heads));
  k::quantize_kernel<T><<<qgrid, 256, 0, stream>>>(acc, cu, ws.goff, static_cast<int>(batch), static_cast<int>(heads),
                                                   static_cast<int>(dim), static_cast<int>(cfg.group),
                                                   quant_max(cfg.grid), static_cast<int>(scale_stride), means, codes,
                                                   scales, row_scale, static_cast<int>(tokens));
  PQKV_CUDA_CHECK_LAST();
}

/// Shape and pointer checks shared by the GPU quantize and mask calls.
template <class T>
void check_device_rows(kv_view<T const> x, char const* name, char const* where)
{
  PQKV_EXPECTS(x.data_handle() != nullptr || element_count(x) == 0, where, name, ".data_handle() is null");
  PQKV_EXPECTS(x.extent(1) <= index_t{std::numeric_limits<std::int32_t>::max() / 2}, where, name, ".extent(1)=",
               x.extent(1), " exceeds the int32 token range");
  PQKV_EXPECTS(x.extent(2) > 0 && 256 % x.extent(2) == 0, where, name, ".extent(2)=", x.extent(2),
               " must divide 256 (head_dim 64, 128 or 256)");
}

}  // namespace detail

/// Centres and quantizes x [heads, tokens, dim] (device, any strides) per
/// sequence of cu_seqlens [batch + 1] (device) exactly as
/// `pqkv::cpu::center_quantize`: codes [heads, tokens, dim], scales [heads,
/// >= quant_group_bound(tokens, batch, group)] (the first
/// quant_group_count(cu_seqlens, group) per head are written), means [batch,
/// heads, dim]. Throws `pqkv::error` before any launch on a bad config, a
/// head_dim that does not divide 256, a shape mismatch, a null pointer or a
/// workspace smaller than `center_quantize_workspace_bytes`. Values must be
/// finite (not checked on the device).
template <class T>
  requires KvElement<std::remove_const_t<T>>
void center_quantize(kv_view<T const> x,                      // [heads, tokens, dim], device
                     std::span<std::int32_t const> cu_seqlens,  // [batch + 1], device
                     quant_config const& cfg,
                     view<std::int8_t, 3> codes,                // [heads, tokens, dim], device
                     view<float, 2> scales,                     // [heads, >= group bound], device
                     view<float, 3> means,                      // [batch, heads, dim], device
                     std::span<std::byte> workspace,            // device
                     cudaStream_t stream)
{
  constexpr char const* where = "gpu::center_quantize";
  cfg.validate(where);
  index_t const heads = x.extent(0), tokens = x.extent(1), dim = x.extent(2);
  PQKV_EXPECTS(cu_seqlens.size() >= 2 && cu_seqlens.data() != nullptr, where, "cu_seqlens.size()=",
               cu_seqlens.size(), " must be batch + 1 >= 2 (device pointer, not null)");
  auto const batch = static_cast<index_t>(cu_seqlens.size()) - 1;
  PQKV_EXPECTS(batch <= 65535 && heads <= 65535, where, "batch=", batch, " or heads=", heads, " exceeds 65535");
  detail::check_device_rows(x, "x", where);
  PQKV_EXPECTS(codes.extent(0) == heads && codes.extent(1) == tokens && codes.extent(2) == dim, where,
               "codes extents (", codes.extent(0), ", ", codes.extent(1), ", ", codes.extent(2),
               ") differ from x's (", heads, ", ", tokens, ", ", dim, ")");
  index_t const bound = quant_group_bound(tokens, batch, cfg.group);
  PQKV_EXPECTS(scales.extent(0) == heads && scales.extent(1) >= bound, where, "scales extents (", scales.extent(0),
               ", ", scales.extent(1), ") are smaller than (heads, quant_group_bound)=(", heads, ", ", bound, ")");
  PQKV_EXPECTS(means.extent(0) == batch && means.extent(1) == heads && means.extent(2) == dim, where,
               "means extents (", means.extent(0), ", ", means.extent(1), ", ", means.extent(2),
               ") differ from (batch, heads, dim)=(", batch, ", ", heads, ", ", dim, ")");
  PQKV_EXPECTS((codes.data_handle() != nullptr || element_count(codes) == 0) &&
                   (scales.data_handle() != nullptr || element_count(scales) == 0) &&
                   (means.data_handle() != nullptr || element_count(means) == 0),
               where, "codes, scales or means data_handle() is null");
  std::size_t const need = center_quantize_workspace_bytes(heads, batch, dim);
  PQKV_EXPECTS(workspace.size() >= need && (workspace.data() != nullptr || need == 0), where, "workspace.size()=",
               workspace.size(), " is smaller than center_quantize_workspace_bytes=", need);
  PQKV_EXPECTS(reinterpret_cast<std::uintptr_t>(workspace.data()) % 16 == 0, where,
               "workspace is not 16-byte aligned");
  using E = std::remove_const_t<T>;
  detail::launch_center_quantize<E>(kv_view<E const>{x}, cu_seqlens.data(), batch, cfg, codes.data_handle(),
                                    scales.data_handle(), scales.extent(1), means.data_handle(), nullptr,
                                    detail::carve_quantize(workspace.data(), heads, batch, dim), stream);
}

}  // namespace pqkv::gpu

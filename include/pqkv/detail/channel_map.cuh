// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file The channel permutation of an `rq_config` in the form kernels take
/// it: a kernel parameter (no device memory), read as `map(i)` = the source
/// channel of permuted channel i. Shared by the residual kernels and the
/// residual scorer's LUT. Users never name this header.

#include <pqkv/codebook/residual.hpp>
#include <pqkv/core/views.hpp>

#include <cstdint>

namespace pqkv::detail::rq_gpu {

/// Largest dim a kernel's channel permutation holds: 4 splits of 128 channels.
inline constexpr int max_dim = 512;

/// The permutation of a config, as kernel-parameter data (identity when empty).
struct channel_map {
  std::int16_t perm[max_dim];

  [[nodiscard]] __host__ __device__ __forceinline__ int operator()(int i) const { return perm[i]; }
};

/// The kernel form of a config's permutation (cfg.dim <= max_dim).
inline channel_map make_channel_map(rq_config const& cfg)
{
  channel_map m{};
  for (index_t i = 0; i < cfg.dim; ++i) { m.perm[i] = static_cast<std::int16_t>(cfg.channel(i)); }
  return m;
}

}  // namespace pqkv::detail::rq_gpu

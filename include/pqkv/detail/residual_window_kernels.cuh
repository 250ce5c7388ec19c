// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Kernels of `pqkv::gpu::rq_window` (encode/residual_window.cuh): the
/// bookkeeping around the encoder calls of one step. A step is
///   plan (reads the length; stages the chunk leaving the window) ->
///   encode K -> encode V (the encoder reads the position `plan` wrote) ->
///   store (writes the new rows, publishes the new length).
/// `plan` only reads `length` and `store` only reads `prior_length`, so no
/// kernel reads a field another thread of the same kernel writes.

#include <pqkv/core/config.hpp>
#include <pqkv/core/dtype.hpp>
#include <pqkv/core/macros.hpp>
#include <pqkv/encode/residual_window.hpp>

#include <cuda_runtime.h>

namespace pqkv::detail::rq_window {

inline constexpr int threads = 256;

/// The device state of a window (int64 fields; `length` and `coded` are
/// what callers read).
struct state {
  index_t length;        ///< tokens held
  index_t coded;         ///< leading tokens after the sink held as codes
  index_t prior_length;  ///< the length before the step in flight
  index_t encode_at;     ///< code row of the chunk the step encodes; -1: none
  index_t overflows;     ///< appends refused for lack of capacity
};

template <class T>
struct buffers {
  T *k_sink, *v_sink;    // [heads, sink, dim]
  T *k_ring, *v_ring;    // [heads, ring, dim]; token p >= sink lives in slot (p - sink) % ring
  T *k_stage, *v_stage;  // [heads, chunk, dim]: the chunk being encoded
  state* st;
};

/// Grid-stride over heads x chunk x dim: when appending t tokens makes a
/// chunk leave the window, copies its rows to the staging buffers and sets
/// encode_at to its first code row; else encode_at = -1 (the encoder then
/// writes nothing). An append that does not fit encodes nothing.
template <class T>
__global__ void __launch_bounds__(threads) plan_kernel(buffers<T> const b, rq_window_shape const s, index_t t)
{
  index_t const n = b.st->length;
  bool const fits = n + t <= s.capacity;
  index_t const e = s.coded_count(n), e_next = fits ? s.coded_count(n + t) : e;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    b.st->prior_length = n;
    b.st->encode_at = e_next > e ? e : -1;
  }
  if (e_next == e) { return; }
  index_t const ring = s.ring(), elements = s.kv_heads * s.chunk * s.dim;
  for (index_t x = static_cast<index_t>(blockIdx.x) * threads + threadIdx.x; x < elements;
       x += static_cast<index_t>(gridDim.x) * threads) {
    index_t const i = x % s.dim, j = x / s.dim % s.chunk, h = x / (s.dim * s.chunk);
    index_t const from = (h * ring + (e + j) % ring) * s.dim + i;
    b.k_stage[x] = b.k_ring[from];
    b.v_stage[x] = b.v_ring[from];
  }
}

/// Row p of the window buffers: the sink below `sink`, else its ring slot.
template <class T>
__device__ __forceinline__ index_t row_offset(rq_window_shape const& s, index_t h, index_t p)
{
  return p < s.sink ? (h * s.sink + p) * s.dim : (h * s.ring() + (p - s.sink) % s.ring()) * s.dim;
}

/// Grid-stride over heads x t x dim: writes the new rows at positions
/// prior_length + j and publishes the new length (or counts an overflow and
/// writes nothing).
template <class T>
__global__ void __launch_bounds__(threads)
  store_kernel(buffers<T> const b, rq_window_shape const s, T const* k_new, T const* v_new, index_t s0, index_t s1, index_t s2,
               index_t vs0, index_t vs1, index_t vs2, index_t t)
{
  index_t const n = b.st->prior_length;
  bool const fits = n + t <= s.capacity;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    if (fits) {
      b.st->length = n + t;
      b.st->coded = s.coded_count(n + t);
    } else {
      b.st->overflows += 1;
    }
  }
  if (!fits) { return; }
  index_t const elements = s.kv_heads * t * s.dim;
  for (index_t x = static_cast<index_t>(blockIdx.x) * threads + threadIdx.x; x < elements;
       x += static_cast<index_t>(gridDim.x) * threads) {
    index_t const i = x % s.dim, j = x / s.dim % t, h = x / (s.dim * t), p = n + j;
    index_t const at = row_offset<T>(s, h, p) + i;
    (p < s.sink ? b.k_sink : b.k_ring)[at] = k_new[h * s0 + j * s1 + i * s2];
    (p < s.sink ? b.v_sink : b.v_ring)[at] = v_new[h * vs0 + j * vs1 + i * vs2];
  }
}

/// A prefill of n tokens: the sink rows and the rows after the coded ones go
/// to the window buffers (the coded rows are encoded straight from the
/// input); the state is set to length n.
template <class T>
__global__ void __launch_bounds__(threads)
  prefill_kernel(buffers<T> const b, rq_window_shape const s, T const* k, T const* v, index_t s0, index_t s1, index_t s2,
                 index_t vs0, index_t vs1, index_t vs2, index_t n)
{
  index_t const e = s.coded_count(n);
  if (blockIdx.x == 0 && threadIdx.x == 0) { *b.st = state{n, e, n, -1, 0}; }
  index_t const elements = s.kv_heads * n * s.dim;
  for (index_t x = static_cast<index_t>(blockIdx.x) * threads + threadIdx.x; x < elements;
       x += static_cast<index_t>(gridDim.x) * threads) {
    index_t const i = x % s.dim, p = x / s.dim % n, h = x / (s.dim * n);
    if (p >= s.sink && p < s.sink + e) { continue; }
    index_t const at = row_offset<T>(s, h, p) + i;
    (p < s.sink ? b.k_sink : b.k_ring)[at] = k[h * s0 + p * s1 + i * s2];
    (p < s.sink ? b.v_sink : b.v_ring)[at] = v[h * vs0 + p * vs1 + i * vs2];
  }
}

/// Grid size for a grid-stride loop over `elements`.
[[nodiscard]] inline unsigned grid_for(index_t elements) noexcept
{
  index_t const blocks = (elements + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks > 1024 ? 1024 : blocks);
}

}  // namespace pqkv::detail::rq_window

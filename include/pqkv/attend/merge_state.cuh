// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::gpu::merge_state`, `merge_state_in_place`, `merge_states`: the
/// GPU merge of partial attention states, for batches of rows (tokens or
/// sequences). Attention over disjoint token sets (the resident sink, window
/// and cache hits; the fetched misses) runs separately, each part giving an
/// output v [rows, heads, dim] and the natural-log log-sum-exp of its scaled
/// logits lse [rows, heads] (float); the merge gives the attention over the
/// union.
///
/// Contract: that of `pqkv::cpu::merge_states` (attend/merge_state.hpp),
/// applied to every (row, head) with v read as float (`to_float`): the
/// same float operations in the same order (max of the non-empty lse; weights
/// `expf(lse_s - M)`; Z summed over non-empty states ascending; `fmaf` chain
/// over non-empty states ascending from 0; one IEEE division; `M + logf(Z)`),
/// each rounded on its own (no contraction, no fast-math intrinsics). The
/// output is then rounded to T (`from_float`, nearest even). So:
/// - where one state of a (row, head) is non-empty (w = Z = 1) or all are
///   empty (v = 0, lse = -inf), the result equals the CPU reference bit for bit;
/// - otherwise only `expf` / `logf` differ from the host's (CUDA's are within
///   2 and 1 ulp): with float v, |v - v_cpu| <= 2e-6 * max_s |v_s| and
///   |lse - lse_cpu| <= 2e-6 * max(1, |lse|); with half / bf16 v the float
///   result then rounds to T, so it may differ from the rounded reference by
///   one ulp of T;
/// - `merge_state(a, b)` equals `merge_states` over the pair (a, b) bit for bit.
///
/// An lse of -inf marks an empty state: its v is never read. lse and v live in
/// device memory and are not checked: an lse of NaN or +inf, or a non-finite v
/// in a non-empty state, gives unspecified (non-finite) outputs, where the CPU
/// reference throws.
///
/// Views: any strides in elements (so a states-major buffer [S, rows, heads,
/// dim] is passed to `merge_states` as [rows, S, heads, dim] with its strides
/// permuted), with a unit stride along dim. Loads and stores are 16 bytes wide
/// when every v view's base and outer strides allow it (else one element).
/// Aliasing: `merge_state`'s outputs may be a's or b's arrays exactly (same
/// pointer and strides), as `merge_state_in_place` does; any other overlap of
/// an output with an input, and any overlap in `merge_states`, throws.
///
/// Memory and ordering: nothing allocated, no host sync, one launch on the
/// caller's stream (none when rows * heads = 0); capturable in a CUDA graph.
/// Validation (shapes, null pointers, unit dim stride, aliasing) happens
/// before the launch and throws `pqkv::error`.

#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/dtype.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/views.hpp>

#include <cuda/std/limits>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace pqkv::detail::merge_gpu {

/// Threads of a block; a (row, head) is merged by a group of up to 32 lanes of one warp.
inline constexpr int block_threads = 256;

/// Strided addressing of one v operand: element (r, s, h, d) at
/// base + r*sr + s*ss + h*sh + d (s unused for two-state calls).
template <class T>
struct v_ref {
  T* base = nullptr;
  index_t sr = 0, ss = 0, sh = 0;
  __device__ __forceinline__ T* at(index_t r, index_t s, index_t h) const { return base + r * sr + s * ss + h * sh; }
};

template <class F>
struct lse_ref {
  F* base = nullptr;
  index_t sr = 0, ss = 0, sh = 0;
  __device__ __forceinline__ F* at(index_t r, index_t s, index_t h) const { return base + r * sr + s * ss + h * sh; }
};

/// Arguments of one launch: `states` inputs at s = 0 .. states-1 of `in` /
/// `in_lse` when `pair` is false; else state 0 is `in`, state 1 is `in_b`.
template <class T>
struct args {
  v_ref<T const> in, in_b;
  lse_ref<float const> in_lse, in_lse_b;
  v_ref<T> out;
  lse_ref<float> out_lse;
  index_t rows = 0, heads = 0, dim = 0, states = 0;
  bool pair = false;
};

/// `Vec` consecutive elements of T moved as one access (16 bytes when Vec*sizeof(T) == 16).
template <class T, int Vec>
struct alignas(sizeof(T) * Vec) packet {
  T x[Vec];
};

template <class T, int Vec>
__device__ __forceinline__ void load(T const* p, float (&f)[Vec])
{
  packet<T, Vec> const pk = *reinterpret_cast<packet<T, Vec> const*>(p);
#pragma unroll
  for (int i = 0; i < Vec; ++i) { f[i] = pqkv::to_float(pk.x[i]); }
}

template <class T, int Vec>
__device__ __forceinline__ void store(T* p, float const (&f)[Vec])
{
  packet<T, Vec> pk;
#pragma unroll
  for (int i = 0; i < Vec; ++i) { pk.x[i] = pqkv::from_float<T>(f[i]); }
  *reinterpret_cast<packet<T, Vec>*>(p) = pk;
}

template <class T>
__device__ __forceinline__ T const* state_v(args<T> const& a, index_t r, index_t s, index_t h)
{
  return a.pair ? (s == 0 ? a.in.at(r, 0, h) : a.in_b.at(r, 0, h)) : a.in.at(r, s, h);
}

template <class T>
__device__ __forceinline__ float state_lse(args<T> const& a, index_t r, index_t s, index_t h)
{
  return a.pair ? (s == 0 ? *a.in_lse.at(r, 0, h) : *a.in_lse_b.at(r, 0, h)) : *a.in_lse.at(r, s, h);
}

/// Each group of `Group` lanes merges one (row, head): every lane evaluates
/// the contract's M and Z itself (the same operations, so the same values),
/// then the lanes stride over dim in `Vec`-element packets. The lse is
/// written after a warp barrier, once every lane of the group has read the
/// inputs, so an output that aliases an input lse is safe.
template <class T, int Vec, int Group>
__global__ void __launch_bounds__(block_threads) merge_kernel(args<T> a)
{
  constexpr int groups_per_block = block_threads / Group;
  constexpr float neg_inf = -::cuda::std::numeric_limits<float>::infinity();
  int const lane = static_cast<int>(threadIdx.x) % Group;
  int const local = static_cast<int>(threadIdx.x) / Group;
  index_t const total = a.rows * a.heads;
  // The loop bound is the same for every thread of a block, so the warp
  // barrier below is reached by whole warps.
  for (index_t first = static_cast<index_t>(blockIdx.x) * groups_per_block; first < total;
       first += static_cast<index_t>(gridDim.x) * groups_per_block) {
    index_t const task = first + local;
    bool const active = task < total;
    index_t const r = active ? task / a.heads : 0, h = active ? task % a.heads : 0;
    float mx = neg_inf;
    if (active) {
      for (index_t s = 0; s < a.states; ++s) {
        float const x = state_lse(a, r, s, h);
        mx = x > mx ? x : mx;
      }
    }
    float z = 0.f;
    if (active && mx != neg_inf) {
      for (index_t s = 0; s < a.states; ++s) {
        float const x = state_lse(a, r, s, h);
        if (x != neg_inf) { z = __fadd_rn(z, expf(__fsub_rn(x, mx))); }
      }
    }
    if (active) {
      T* out = a.out.at(r, 0, h);
      for (index_t d = static_cast<index_t>(lane) * Vec; d < a.dim; d += static_cast<index_t>(Group) * Vec) {
        float acc[Vec];
#pragma unroll
        for (int i = 0; i < Vec; ++i) { acc[i] = 0.f; }
        if (mx != neg_inf) {
          for (index_t s = 0; s < a.states; ++s) {
            float const x = state_lse(a, r, s, h);
            if (x == neg_inf) { continue; }
            float const w = expf(__fsub_rn(x, mx));
            float v[Vec];
            load<T, Vec>(state_v(a, r, s, h) + d, v);
#pragma unroll
            for (int i = 0; i < Vec; ++i) { acc[i] = fmaf(w, v[i], acc[i]); }
          }
#pragma unroll
          for (int i = 0; i < Vec; ++i) { acc[i] = __fdiv_rn(acc[i], z); }
        }
        store<T, Vec>(out + d, acc);
      }
    }
    __syncwarp();
    if (active && lane == 0) { *a.out_lse.at(r, 0, h) = mx == neg_inf ? neg_inf : __fadd_rn(mx, logf(z)); }
  }
}

template <class T, int Vec>
void launch_group(args<T> const& a, int sms, cudaStream_t stream)
{
  // Enough lanes to cover dim in one pass when it is short, a whole warp otherwise.
  index_t const packets = (a.dim + Vec - 1) / Vec;
  auto go = [&](auto group_tag) {
    constexpr int group = decltype(group_tag)::value;
    constexpr int per_block = block_threads / group;
    index_t const blocks = (a.rows * a.heads + per_block - 1) / per_block;
    auto const grid = static_cast<unsigned>(std::min<index_t>(blocks, static_cast<index_t>(sms) * 16));
    merge_kernel<T, Vec, group><<<grid, block_threads, 0, stream>>>(a);
  };
  if (packets <= 4) {
    go(std::integral_constant<int, 4>{});
  } else if (packets <= 8) {
    go(std::integral_constant<int, 8>{});
  } else if (packets <= 16) {
    go(std::integral_constant<int, 16>{});
  } else {
    go(std::integral_constant<int, 32>{});
  }
  PQKV_CUDA_CHECK_LAST();
}

/// Multiprocessors of the current device, queried once per device (a
/// device attribute query per call would be wasted work in a decode step).
inline int device_sms()
{
  int device = 0;
  PQKV_CUDA_TRY(cudaGetDevice(&device));
  static std::array<std::atomic<int>, 64> cache{};
  auto const slot = static_cast<std::size_t>(device);
  if (slot < cache.size()) {
    int const known = cache[slot].load(std::memory_order_relaxed);
    if (known > 0) { return known; }
  }
  int sms = 0;
  PQKV_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  sms = sms > 0 ? sms : 1;
  if (slot < cache.size()) { cache[slot].store(sms, std::memory_order_relaxed); }
  return sms;
}

/// 16-byte packets when every v base and outer stride is a multiple of 16
/// bytes and dim a multiple of the packet; else one element.
template <class T>
void launch(args<T> const& a, bool vector_ok, cudaStream_t stream)
{
  int const sms = device_sms();
  constexpr int vec = static_cast<int>(16 / sizeof(T));
  if (vector_ok && a.dim % vec == 0) {
    launch_group<T, vec>(a, sms, stream);
  } else {
    launch_group<T, 1>(a, sms, stream);
  }
}

/// True when `p` and every stride (in elements of T) keep 16-byte alignment.
template <class T, class... Strides>
bool aligned16(T const* p, Strides... strides)
{
  bool ok = reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
  ((ok = ok && (static_cast<std::size_t>(strides) * sizeof(T)) % 16 == 0), ...);
  return ok;
}

/// [first, last) byte range a view spans (empty when it has no element).
struct byte_range {
  std::uintptr_t first = 0, last = 0;
  [[nodiscard]] bool empty() const noexcept { return first == last; }
  [[nodiscard]] bool overlaps(byte_range const& o) const noexcept
  {
    return !empty() && !o.empty() && first < o.last && o.first < last;
  }
};

template <class V>
byte_range span_of(V const& v)
{
  using element = typename V::element_type;
  if (element_count(v) == 0 || v.data_handle() == nullptr) { return {}; }
  index_t hi = 0;
  for (std::size_t r = 0; r < V::rank(); ++r) { hi += (v.extent(r) - 1) * v.stride(r); }
  auto const base = reinterpret_cast<std::uintptr_t>(v.data_handle());
  return {base, base + static_cast<std::uintptr_t>(hi + 1) * sizeof(element)};
}

/// Same pointer, extents and strides.
template <class A, class B>
bool same_mapping(A const& a, B const& b)
{
  if (static_cast<void const*>(a.data_handle()) != static_cast<void const*>(b.data_handle())) { return false; }
  for (std::size_t r = 0; r < A::rank(); ++r) {
    if (a.extent(r) != b.extent(r) || a.stride(r) != b.stride(r)) { return false; }
  }
  return true;
}

/// Throws when `out` overlaps `in` other than as the very same array.
template <class Out, class In>
void check_alias(Out const& out, In const& in, bool exact_ok, char const* out_name, char const* in_name,
                 char const* where)
{
  if (exact_ok && same_mapping(out, in)) { return; }
  PQKV_EXPECTS(!span_of(out).overlaps(span_of(in)), where, out_name, " overlaps ", in_name,
               exact_ok ? " without being the same array (same pointer and strides)" : " (outputs may not alias inputs)");
}

template <class V>
void check_unit_dim(V const& v, char const* name, char const* where)
{
  constexpr std::size_t last = V::rank() - 1;
  PQKV_EXPECTS(v.extent(last) <= 1 || v.stride(last) == 1, where, name, ".stride(", last, ")=", v.stride(last),
               " must be 1 (dim is read in packets)");
}

template <class V>
void check_data(V const& v, char const* name, char const* where)
{
  PQKV_EXPECTS(v.data_handle() != nullptr || element_count(v) == 0, where, name, ".data_handle() is null");
}

}  // namespace pqkv::detail::merge_gpu

namespace pqkv::gpu {

/// Merges (v_a, lse_a) and (v_b, lse_b) into (v_out, lse_out), a first (the
/// file's contract with S = 2). The outputs may be a's or b's arrays exactly.
/// Throws `pqkv::error` before the launch on differing extents, a null
/// pointer, a non-unit dim stride or a partial overlap.
template <KvElement T>
void merge_state(strided_view<T const, 3> v_a, strided_view<float const, 2> lse_a,  // [rows, heads, dim], [rows, heads]
                 strided_view<T const, 3> v_b, strided_view<float const, 2> lse_b,  // [rows, heads, dim], [rows, heads]
                 strided_view<T, 3> v_out, strided_view<float, 2> lse_out,          // [rows, heads, dim], [rows, heads]
                 cudaStream_t stream)
{
  constexpr char const* where = "gpu::merge_state";
  namespace k = pqkv::detail::merge_gpu;
  index_t const rows = v_a.extent(0), heads = v_a.extent(1), dim = v_a.extent(2);
  auto check_v = [&](auto const& v, char const* name) {
    PQKV_EXPECTS(v.extent(0) == rows && v.extent(1) == heads && v.extent(2) == dim, where, name, " extents (",
                 v.extent(0), ", ", v.extent(1), ", ", v.extent(2), ") differ from v_a's (rows, heads, dim)=(", rows,
                 ", ", heads, ", ", dim, ")");
    k::check_data(v, name, where);
    k::check_unit_dim(v, name, where);
  };
  auto check_lse = [&](auto const& l, char const* name) {
    PQKV_EXPECTS(l.extent(0) == rows && l.extent(1) == heads, where, name, " extents (", l.extent(0), ", ",
                 l.extent(1), ") differ from (rows, heads)=(", rows, ", ", heads, ")");
    k::check_data(l, name, where);
  };
  check_v(v_a, "v_a");
  check_v(v_b, "v_b");
  check_v(v_out, "v_out");
  check_lse(lse_a, "lse_a");
  check_lse(lse_b, "lse_b");
  check_lse(lse_out, "lse_out");
  k::check_alias(v_out, v_a, true, "v_out", "v_a", where);
  k::check_alias(v_out, v_b, true, "v_out", "v_b", where);
  k::check_alias(lse_out, lse_a, true, "lse_out", "lse_a", where);
  k::check_alias(lse_out, lse_b, true, "lse_out", "lse_b", where);
  k::check_alias(v_out, lse_a, false, "v_out", "lse_a", where);
  k::check_alias(v_out, lse_b, false, "v_out", "lse_b", where);
  k::check_alias(lse_out, v_a, false, "lse_out", "v_a", where);
  k::check_alias(lse_out, v_b, false, "lse_out", "v_b", where);
  k::check_alias(lse_out, v_out, false, "lse_out", "v_out", where);
  if (rows * heads == 0) { return; }

  k::args<T> a{};
  a.in = {v_a.data_handle(), v_a.stride(0), 0, v_a.stride(1)};
  a.in_b = {v_b.data_handle(), v_b.stride(0), 0, v_b.stride(1)};
  a.in_lse = {lse_a.data_handle(), lse_a.stride(0), 0, lse_a.stride(1)};
  a.in_lse_b = {lse_b.data_handle(), lse_b.stride(0), 0, lse_b.stride(1)};
  a.out = {v_out.data_handle(), v_out.stride(0), 0, v_out.stride(1)};
  a.out_lse = {lse_out.data_handle(), lse_out.stride(0), 0, lse_out.stride(1)};
  a.rows = rows;
  a.heads = heads;
  a.dim = dim;
  a.states = 2;
  a.pair = true;
  bool const vector_ok = k::aligned16(v_a.data_handle(), v_a.stride(0), v_a.stride(1)) &&
                         k::aligned16(v_b.data_handle(), v_b.stride(0), v_b.stride(1)) &&
                         k::aligned16(v_out.data_handle(), v_out.stride(0), v_out.stride(1));
  k::launch(a, vector_ok, stream);
}

/// (v, lse) <- the merge of (v, lse) and (v_other, lse_other), (v, lse)
/// first: `merge_state` written over the first state. Folding parts in one
/// by one gives the left fold of pairwise merges, which may differ from
/// `merge_states` over all parts in the last bits (as on the CPU).
template <KvElement T>
void merge_state_in_place(strided_view<T, 3> v, strided_view<float, 2> lse,                           // [rows, heads, dim], [rows, heads]
                          strided_view<T const, 3> v_other, strided_view<float const, 2> lse_other,  // [rows, heads, dim], [rows, heads]
                          cudaStream_t stream)
{
  merge_state<T>(as_const(v), as_const(lse), v_other, lse_other, v, lse, stream);
}

/// Merges the S states of every row, v [rows, S, heads, dim] and lse
/// [rows, S, heads], into v_out [rows, heads, dim] and lse_out [rows, heads]
/// (the file's contract; S = 0 gives v_out = 0, lse_out = -inf). Outputs may
/// not overlap inputs. Throws `pqkv::error` before the launch on differing
/// extents, a null pointer, a non-unit dim stride or an overlap.
template <KvElement T>
void merge_states(strided_view<T const, 4> v,        // [rows, S, heads, dim]
                  strided_view<float const, 3> lse,  // [rows, S, heads]
                  strided_view<T, 3> v_out,          // [rows, heads, dim]
                  strided_view<float, 2> lse_out,    // [rows, heads]
                  cudaStream_t stream)
{
  constexpr char const* where = "gpu::merge_states";
  namespace k = pqkv::detail::merge_gpu;
  index_t const rows = v.extent(0), states = v.extent(1), heads = v.extent(2), dim = v.extent(3);
  PQKV_EXPECTS(lse.extent(0) == rows && lse.extent(1) == states && lse.extent(2) == heads, where, "lse extents (",
               lse.extent(0), ", ", lse.extent(1), ", ", lse.extent(2), ") differ from v's (rows, S, heads)=(", rows,
               ", ", states, ", ", heads, ")");
  PQKV_EXPECTS(v_out.extent(0) == rows && v_out.extent(1) == heads && v_out.extent(2) == dim, where,
               "v_out extents (", v_out.extent(0), ", ", v_out.extent(1), ", ", v_out.extent(2),
               ") differ from (rows, heads, dim)=(", rows, ", ", heads, ", ", dim, ")");
  PQKV_EXPECTS(lse_out.extent(0) == rows && lse_out.extent(1) == heads, where, "lse_out extents (", lse_out.extent(0),
               ", ", lse_out.extent(1), ") differ from (rows, heads)=(", rows, ", ", heads, ")");
  PQKV_EXPECTS(states <= index_t{std::numeric_limits<std::int32_t>::max()}, where, "v.extent(1)=", states,
               " exceeds the int32 range");
  k::check_data(v, "v", where);
  k::check_data(lse, "lse", where);
  k::check_data(v_out, "v_out", where);
  k::check_data(lse_out, "lse_out", where);
  k::check_unit_dim(v, "v", where);
  k::check_unit_dim(v_out, "v_out", where);
  k::check_alias(v_out, v, false, "v_out", "v", where);
  k::check_alias(v_out, lse, false, "v_out", "lse", where);
  k::check_alias(lse_out, v, false, "lse_out", "v", where);
  k::check_alias(lse_out, lse, false, "lse_out", "lse", where);
  k::check_alias(lse_out, v_out, false, "lse_out", "v_out", where);
  if (rows * heads == 0) { return; }

  k::args<T> a{};
  a.in = {v.data_handle(), v.stride(0), v.stride(1), v.stride(2)};
  a.in_lse = {lse.data_handle(), lse.stride(0), lse.stride(1), lse.stride(2)};
  a.out = {v_out.data_handle(), v_out.stride(0), 0, v_out.stride(1)};
  a.out_lse = {lse_out.data_handle(), lse_out.stride(0), 0, lse_out.stride(1)};
  a.rows = rows;
  a.heads = heads;
  a.dim = dim;
  a.states = states;
  a.pair = false;
  bool const vector_ok = k::aligned16(v.data_handle(), v.stride(0), v.stride(1), v.stride(2)) &&
                         k::aligned16(v_out.data_handle(), v_out.stride(0), v_out.stride(1));
  k::launch(a, vector_ok, stream);
}

}  // namespace pqkv::gpu

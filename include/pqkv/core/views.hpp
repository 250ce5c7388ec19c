// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Non-owning multi-dimensional views used at every API boundary.
///
/// All views are `cuda::std::mdspan` (from libcu++, usable by g++ without nvcc).
/// Row-major (`view`) is the canonical layout; `strided_view` accepts what an
/// engine hands over as it is, e.g. keys in NHD order seen as [heads, tokens, dim].
/// A row-major view converts implicitly to the strided view of the same rank.
///
/// Canonical shapes:
///   keys / values  [heads, tokens, dim]        float, half or bf16
///   queries        [q_heads, dim]
///   centroids      [heads, m, ksub, dsub]      float
///   codes          [heads, tokens, m]          uint8 (nbits <= 8)
///   selection      [kv_heads, k]               int32 token indices, -1 padded

#include <cuda/std/mdspan>

#include <cstddef>
#include <cstdint>

namespace pqkv {

/// Index type of every view: 64-bit, since heads x tokens x dim exceeds 2^31
/// at a million tokens.
using index_t = std::int64_t;

template <std::size_t Rank>
using extents = ::cuda::std::dextents<index_t, Rank>;

/// Row-major (C order) view.
template <class T, std::size_t Rank>
using view = ::cuda::std::mdspan<T, extents<Rank>, ::cuda::std::layout_right>;

/// View with arbitrary (non-negative) strides, in elements.
template <class T, std::size_t Rank>
using strided_view = ::cuda::std::mdspan<T, extents<Rank>, ::cuda::std::layout_stride>;

/// Keys or values [heads, tokens, dim], strided so NHD and HND both fit.
template <class T>
using kv_view = strided_view<T, 3>;

/// Queries of one decode step [q_heads, dim].
template <class T>
using query_view = strided_view<T, 2>;

/// PQ centroids [heads, m, ksub, dsub].
template <class T = float>
using centroids_view = view<T, 4>;

/// PQ codes [heads, tokens, m].
template <class T = std::uint8_t>
using codes_view = view<T, 3>;

/// Selected token indices [kv_heads, k], -1 padded.
template <class T = std::int32_t>
using selection_view = view<T, 2>;

/// A row-major view over `data` with the given extents.
template <class T, class... Extents>
[[nodiscard]] constexpr auto make_view(T* data, Extents... exts) noexcept
{
  return view<T, sizeof...(Extents)>{data, static_cast<index_t>(exts)...};
}

/// A strided view: `exts` and `strides` in elements, outermost first.
template <class T, std::size_t Rank>
[[nodiscard]] constexpr auto make_strided_view(T* data, ::cuda::std::array<index_t, Rank> exts,
                                               ::cuda::std::array<index_t, Rank> strides) noexcept
{
  using mapping = typename ::cuda::std::layout_stride::template mapping<extents<Rank>>;
  return strided_view<T, Rank>{data, mapping{extents<Rank>{exts}, strides}};
}

/// The const view of the same data and mapping.
template <class T, class E, class L, class A>
[[nodiscard]] constexpr auto as_const(::cuda::std::mdspan<T, E, L, A> v) noexcept
{
  return ::cuda::std::mdspan<T const, E, L>{v.data_handle(), v.mapping()};
}

/// Number of elements a view spans (product of its extents).
template <class V>
[[nodiscard]] constexpr index_t element_count(V const& v) noexcept
{
  index_t n = 1;
  for (std::size_t r = 0; r < V::rank(); ++r) { n *= v.extent(r); }
  return n;
}

}  // namespace pqkv

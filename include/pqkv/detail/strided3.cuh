// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file The element accessor the sparse kernels read Q, K and V through: a
/// strided [heads, tokens, dim] device tensor, converted to float. Users
/// never name this header.

#include <pqkv/core/dtype.hpp>
#include <pqkv/core/views.hpp>

namespace pqkv::detail {

/// Read-only [heads, tokens, dim] strided device tensor, converted to float.
template <class T>
struct strided3 {
  T const* p;
  index_t s0, s1, s2;
  __device__ __forceinline__ float operator()(index_t h, index_t t, index_t c) const
  {
    return to_float(p[h * s0 + t * s1 + c * s2]);
  }
};

}  // namespace pqkv::detail

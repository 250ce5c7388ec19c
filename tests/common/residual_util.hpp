// SPDX-License-Identifier: Apache-2.0
#pragma once
// Configurations shared by the residual-code tests (CPU and CUDA).

#include <pqkv/codebook/residual.hpp>
#include <pqkv/core/views.hpp>

#include <algorithm>
#include <vector>

namespace pqkv::test {

/// A RoPE-pair-like channel grouping (i, i + dim / 2), reversed: every
/// channel moves, and pairs stay in one split.
inline std::vector<index_t> reversed_pairs(index_t dim)
{
  std::vector<index_t> p;
  for (index_t i = 0; i < dim / 2; ++i) {
    p.push_back(i);
    p.push_back(i + dim / 2);
  }
  std::reverse(p.begin(), p.end());
  return p;
}

/// Channel i <- (5 i + 3) mod dim: a permutation for a power-of-two dim (5 is
/// odd) that scatters neighbours across splits.
inline std::vector<index_t> stride_permutation(index_t dim)
{
  std::vector<index_t> p;
  for (index_t i = 0; i < dim; ++i) { p.push_back((i * 5 + 3) % dim); }
  return p;
}

/// An rq_config of (dim, splits, stages, bits), other fields default; with
/// `permute`, the reversed-pairs permutation.
inline rq_config rq_test_config(index_t dim, int splits, int stages, int bits, bool permute = false)
{
  rq_config c;
  c.dim = dim;
  c.splits = splits;
  c.stages = stages;
  c.bits = bits;
  if (permute) { c.permutation = reversed_pairs(dim); }
  return c;
}

}  // namespace pqkv::test

// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file GQA aggregation policies: how the query heads of one GQA group turn
/// their per-token scores into the KV head's score. Each models
/// `pqkv::GqaAggregation`: `init()`, then `combine(acc, x)` once per q head in
/// head order (the group's lowest q head first), then `finish(acc)`.
///
/// The policies are plain float arithmetic with no contraction opportunity, so
/// a GPU kernel that combines in the same head order gets the same bits.

#include <pqkv/core/concepts.hpp>
#include <pqkv/core/macros.hpp>

#include <cuda/std/limits>

namespace pqkv::gqa {

/// Sum of the group's logits: `((0 + x_0) + x_1) + ...`.
struct sum {
  static constexpr bool needs_softmax = false;
  PQKV_HD float init() const { return 0.f; }
  PQKV_HD float combine(float acc, float x) const { return acc + x; }
  PQKV_HD float finish(float acc) const { return acc; }
};

/// Largest logit of the group. A NaN input never replaces the running value
/// (`x > acc` is false), so the result is NaN only if no input is a number.
struct max {
  static constexpr bool needs_softmax = false;
  PQKV_HD float init() const { return -::cuda::std::numeric_limits<float>::infinity(); }
  PQKV_HD float combine(float acc, float x) const { return x > acc ? x : acc; }
  PQKV_HD float finish(float acc) const { return acc; }
};

/// PQCache's rule: each q head's logits go through a softmax over the
/// candidate tokens first, then the group's probabilities are summed in head
/// order: `((0 + p_0) + p_1) + ...`. How the softmax is evaluated is part of
/// the scorer's contract (see `score/adc_topk.hpp`).
struct softmax_sum {
  static constexpr bool needs_softmax = true;
  PQKV_HD float init() const { return 0.f; }
  PQKV_HD float combine(float acc, float x) const { return acc + x; }
  PQKV_HD float finish(float acc) const { return acc; }
};

static_assert(GqaAggregation<sum> && GqaAggregation<max> && GqaAggregation<softmax_sum>);

}  // namespace pqkv::gqa

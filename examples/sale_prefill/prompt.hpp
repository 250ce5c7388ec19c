// SPDX-License-Identifier: Apache-2.0
#pragma once
// The example's synthetic prompt: Q, K and V of one layer with Llama-3.1-8B
// attention shapes, from the repository's generator (tests/common/keygen.hpp,
// docs/synthetic_keys.md): RoPE'd (theta 500000, Llama 3.1 scaling), low-rank
// keys with a large mean and outlier channels, attention sinks, recurring
// topic clumps and planted needle tokens. Query row t is the generator's
// query of step t / span issued at position t (RoPE'd there), so a
// `needle_frac` share of the steps aim at one of their KV group's earlier
// needles (`keygen::query_target`). The generator draws each step's content,
// topic and needle afresh; span > 1 makes runs of consecutive rows ask about
// the same thing, as the tokens of one passage do.

#include <pqkv/core/host_tensor.hpp>
#include <pqkv/core/parallel.hpp>

#include "common/keygen.hpp"

#include <cuda_bf16.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace sp {

using pqkv::index_t;
using bf16 = __nv_bfloat16;

inline constexpr index_t kv_heads = 8, q_per_kv = 4, q_heads = kv_heads * q_per_kv, head_dim = 128;

/// A query row that aims at a planted needle: row `row` of every q head of
/// KV group `group` gives the needle key at `pos` (< row) a large logit.
struct needle_row {
  index_t row = 0, group = 0, pos = 0;
};

/// Q [q_heads, tokens, d], K and V [kv_heads, tokens, d], bf16 on the host,
/// and the needle rows in ascending row order.
struct prompt {
  pqkv::test::keygen_config cfg;
  std::vector<bf16> q, k, v;
  std::vector<needle_row> needles;
};

/// The generator's configuration: its Llama-3-8B-like defaults, with the
/// prompt length, seed, needle count and the share of needle-aimed rows.
inline pqkv::test::keygen_config prompt_config(index_t tokens, std::uint64_t seed, index_t needles,
                                               double needle_frac)
{
  pqkv::test::keygen_config c;
  c.kv_heads = kv_heads;
  c.q_per_kv = q_per_kv;
  c.dim = head_dim;
  c.tokens = tokens;
  c.seed = seed;
  c.needles = needles;
  c.needle_query_fraction = needle_frac;
  c.validate("sale_prefill prompt");
  return c;
}

namespace detail {

/// Converts float rows to bf16 (round to nearest even), in parallel.
inline void to_bf16(float const* src, bf16* dst, std::size_t n)
{
  constexpr std::size_t chunk = std::size_t{1} << 20;
  pqkv::cpu::parallel_for(static_cast<index_t>((n + chunk - 1) / chunk), [&](index_t c) {
    std::size_t const i1 = std::min(n, (static_cast<std::size_t>(c) + 1) * chunk);
    for (std::size_t i = static_cast<std::size_t>(c) * chunk; i < i1; ++i) { dst[i] = __float2bfloat16_rn(src[i]); }
  });
}

}  // namespace detail

/// Builds the prompt on the host's threads, `span` consecutive query rows per
/// generator step. Every value is a pure function of (config, head, position),
/// so the result does not depend on the thread count.
inline prompt make_prompt(pqkv::test::keygen_config const& cfg, index_t span = 1)
{
  index_t const n = cfg.tokens, d = cfg.dim;
  prompt p{cfg, std::vector<bf16>(static_cast<std::size_t>(q_heads * n * d)),
           std::vector<bf16>(static_cast<std::size_t>(kv_heads * n * d)),
           std::vector<bf16>(static_cast<std::size_t>(kv_heads * n * d)), {}};
  {
    auto const kv = pqkv::test::make_kv(cfg);  // float [kv_heads, tokens, d]
    detail::to_bf16(kv.keys.data(), p.k.data(), p.k.size());
    detail::to_bf16(kv.values.data(), p.v.data(), p.v.size());
  }
  // Queries row by row (the generator makes one position's q heads at a
  // time), written straight into the [q_heads, tokens, d] layout; each chunk
  // of rows keeps its needle rows, joined in chunk order afterwards.
  constexpr index_t rows_per_chunk = 256;
  index_t const chunks = (n + rows_per_chunk - 1) / rows_per_chunk;
  std::vector<std::vector<needle_row>> found(static_cast<std::size_t>(chunks));
  pqkv::cpu::parallel_for(chunks, [&](index_t c) {
    pqkv::host_tensor<float, 2> step(q_heads, d);
    index_t const t1 = std::min(n, (c + 1) * rows_per_chunk);
    for (index_t t = c * rows_per_chunk; t < t1; ++t) {
      pqkv::test::make_queries(cfg, t / span, t, step.view());
      for (index_t h = 0; h < q_heads; ++h) {
        bf16* const dst = p.q.data() + (h * n + t) * d;
        for (index_t i = 0; i < d; ++i) { dst[i] = __float2bfloat16_rn(step.view()(h, i)); }
      }
      for (index_t g = 0; g < kv_heads; ++g) {
        if (index_t const pos = pqkv::test::query_target(cfg, t / span, t, g); pos >= 0) {
          found[static_cast<std::size_t>(c)].push_back({t, g, pos});
        }
      }
    }
  });
  for (auto const& f : found) { p.needles.insert(p.needles.end(), f.begin(), f.end()); }
  return p;
}

}  // namespace sp

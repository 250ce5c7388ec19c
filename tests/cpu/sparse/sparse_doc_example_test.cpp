// SPDX-License-Identifier: Apache-2.0
// The example of docs/sparse.md, compiled and run.
#include <pqkv/core/host_tensor.hpp>
#include <pqkv/sparse/block_sparse_attention.hpp>
#include <pqkv/sparse/sale_mask.hpp>

#include "sparse_test_util.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <vector>

TEST_CASE("docs/sparse.md: build a SALE mask and its FlexAttention BlockMask")
{
  auto const b = pqkv::test::make_batch(4, 2, 64, {0, 200, 330}, 3);
  auto const& q = b.q;
  auto const& k = b.k;
  std::vector<std::int32_t> const& cu_seqlens = b.cu;
  // example-begin
  pqkv::sparse_config const cfg{};                     // Bq 64, Bk 32, sink 32, local 128
  pqkv::cpu::sale_estimator const est{q.const_view(), k.const_view(), cu_seqlens, cfg};
  auto const m = est.shape();
  pqkv::host_tensor<std::uint32_t, 4> bits(m.batch, m.q_heads, m.q_blocks, m.words);
  std::vector<float> const tau(static_cast<std::size_t>(m.q_heads), 0.01f);
  std::vector<double> density(static_cast<std::size_t>(m.q_heads));
  pqkv::cpu::build_mask(est, tau, bits.view(), density);
  // FlexAttention BlockMask at 128 x 128
  auto const bm = pqkv::make_block_mask_shape(m, cfg, 128, 128);
  pqkv::host_tensor<std::int32_t, 3> kv_num_blocks(bm.batch, bm.q_heads, bm.q_blocks);
  pqkv::host_tensor<std::int32_t, 4> kv_indices(bm.batch, bm.q_heads, bm.q_blocks, bm.k_blocks);
  pqkv::cpu::bitmask_to_block_mask(bits.const_view(), m, cfg, 128, 128, kv_num_blocks.view(), kv_indices.view());
  // example-end
  CHECK(m.q_blocks == 4);
  CHECK(bm.q_blocks == 2);
  for (double d : density) {
    CHECK(d > 0.0);
    CHECK(d <= 1.0);
  }
  CHECK(*std::min_element(density.begin(), density.end()) < 1.0);
  CHECK(kv_num_blocks.view()(0, 0, 1) >= 1);
}

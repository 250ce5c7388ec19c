// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Umbrella header: every pqkv component that builds without nvcc.

#include <pqkv/core/concepts.hpp>
#include <pqkv/core/config.hpp>
#include <pqkv/core/dtype.hpp>
#include <pqkv/core/error.hpp>
#include <pqkv/core/host_tensor.hpp>
#include <pqkv/core/parallel.hpp>
#include <pqkv/core/views.hpp>

#include <pqkv/codebook/codebook.hpp>
#include <pqkv/codebook/kmeans.hpp>
#include <pqkv/codebook/residual.hpp>

#include <pqkv/encode/encode.hpp>
#include <pqkv/decode/reconstruct.hpp>
#include <pqkv/decode/residual_reconstruct.hpp>
#include <pqkv/encode/residual.hpp>
#include <pqkv/encode/residual_window.hpp>

#include <pqkv/score/adc_topk.hpp>
#include <pqkv/score/page_list.hpp>
#include <pqkv/score/paged_codes.hpp>
#include <pqkv/score/exact.hpp>
#include <pqkv/score/gqa.hpp>
#include <pqkv/score/lut.hpp>
#include <pqkv/score/residual_scorer.hpp>
#include <pqkv/score/topk.hpp>

#include <pqkv/attend/code_attention.hpp>
#include <pqkv/attend/dense.hpp>
#include <pqkv/attend/merge_state.hpp>
#include <pqkv/attend/metrics.hpp>

#include <pqkv/sparse/block_sparse_attention.hpp>
#include <pqkv/sparse/calibrate.hpp>
#include <pqkv/sparse/quantize.hpp>
#include <pqkv/sparse/sale_mask.hpp>

#include <pqkv/cache/block_lfu.hpp>
#include <pqkv/cache/policy.hpp>
#include <pqkv/cache/slot_table.hpp>

#include <pqkv/schedule/host_pool.hpp>

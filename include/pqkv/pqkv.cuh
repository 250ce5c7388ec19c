// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Umbrella header: everything in pqkv.hpp plus the CUDA components.

#include <pqkv/pqkv.hpp>

#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/device_buffer.cuh>
#include <pqkv/core/device_check.cuh>

#include <pqkv/attend/code_attention.cuh>
#include <pqkv/attend/merge_state.cuh>
#include <pqkv/cache/gpu_cache.cuh>
#include <pqkv/codebook/kmeans.cuh>
#include <pqkv/codebook/residual.cuh>
#include <pqkv/decode/residual_reconstruct.cuh>
#include <pqkv/encode/encode.cuh>
#include <pqkv/encode/residual.cuh>
#include <pqkv/encode/residual_window.cuh>
#include <pqkv/offload/gather.cuh>
#include <pqkv/offload/kv_store.cuh>
#include <pqkv/schedule/device_guard.cuh>
#include <pqkv/schedule/event.cuh>
#include <pqkv/schedule/host_task.cuh>
#include <pqkv/schedule/layer_pipeline.cuh>
#include <pqkv/schedule/stream_set.cuh>
#include <pqkv/score/adc_topk.cuh>
#include <pqkv/score/page_list.cuh>
#include <pqkv/score/residual_scorer.cuh>
#include <pqkv/sparse/block_sparse_attention.cuh>
#include <pqkv/sparse/calibrate.cuh>
#include <pqkv/sparse/quantize.cuh>
#include <pqkv/sparse/sale_mask.cuh>

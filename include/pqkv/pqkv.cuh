// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Umbrella header: everything in pqkv.hpp plus the CUDA components.

#include <pqkv/pqkv.hpp>

#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/device_buffer.cuh>

#include <pqkv/score/adc_topk.cuh>

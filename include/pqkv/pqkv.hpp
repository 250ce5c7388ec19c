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

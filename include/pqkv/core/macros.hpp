// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file The few macros every header uses.

#if defined(__CUDACC__) || defined(__HIPCC__)
/// A function callable from host and device code (plain `inline` without nvcc).
#  define PQKV_HD __host__ __device__ __forceinline__
#  define PQKV_HOST_DEVICE __host__ __device__
#else
#  define PQKV_HD inline
#  define PQKV_HOST_DEVICE
#endif

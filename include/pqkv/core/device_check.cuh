// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Host-side checks that a pointer handed to a GPU call is memory a
/// kernel can read, and that a GPU object is used on the device it was built
/// on. Users never name this header.

#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/error.hpp>

#include <cuda_runtime_api.h>

namespace pqkv::detail::gpu_check {

/// Throws unless `p` (non-null) is memory a kernel of the current device can
/// read: device, managed or registered/mapped host memory. A host call that
/// does not touch any stream, so it is legal while a graph is captured.
inline void expect_device_pointer(void const* p, char const* where, char const* what)
{
  cudaPointerAttributes attr{};
  cudaError_t const st = cudaPointerGetAttributes(&attr, p);
  if (st != cudaSuccess) {
    cudaGetLastError();
    PQKV_EXPECTS(false, where, what, " is not a pointer the CUDA runtime knows (", cudaGetErrorName(st), ")");
  }
  PQKV_EXPECTS(attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged ||
                 (attr.type == cudaMemoryTypeHost && attr.devicePointer != nullptr),
               where, what, " is not device-accessible memory (pageable host memory?)");
}

/// Throws unless the current device is `device`, the one a GPU object was
/// built on (its kernels' attributes, device memory and events belong to that
/// device; multi-GPU engines keep one object per device). A host call that
/// touches no stream, so it is legal while a graph is captured.
inline void expect_current_device(int device, char const* where)
{
  int current = 0;
  PQKV_CUDA_TRY(cudaGetDevice(&current));
  PQKV_EXPECTS(current == device, where, "called on device ", current, "; the object was built on device ", device);
}

}  // namespace pqkv::detail::gpu_check

// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `pqkv::gpu::device_guard`: makes a device current for a scope and
/// restores the previous one, so components that own state on a recorded
/// device never assume device 0 or leave the caller's current device changed.

#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/error.hpp>

#include <cuda_runtime_api.h>

namespace pqkv::gpu {

/// The current device, as `cudaGetDevice` reports it.
[[nodiscard]] inline int current_device()
{
  int device = 0;
  PQKV_CUDA_TRY(cudaGetDevice(&device));
  return device;
}

/// Throws `pqkv::error` unless `device` names a present device.
inline void check_device(int device, char const* where)
{
  int count = 0;
  PQKV_CUDA_TRY(cudaGetDeviceCount(&count));
  PQKV_EXPECTS(device >= 0 && device < count, where, "device=", device, " is outside [0, ", count, ")");
}

/// Sets `device` current for the guard's lifetime (no call when it already is).
class device_guard {
 public:
  explicit device_guard(int device) : previous_{current_device()}
  {
    if (device != previous_) { PQKV_CUDA_TRY(cudaSetDevice(device)); }
    changed_ = device != previous_;
  }
  device_guard(device_guard const&) = delete;
  device_guard& operator=(device_guard const&) = delete;
  ~device_guard()
  {
    if (changed_) { (void)cudaSetDevice(previous_); }
  }

 private:
  int previous_;
  bool changed_ = false;
};

}  // namespace pqkv::gpu

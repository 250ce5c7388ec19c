// SPDX-License-Identifier: Apache-2.0
#pragma once
// GPU test helpers: every CUDA test case starts with PQKV_REQUIRE_GPU(), which
// skips the case with a message on machines without a usable GPU; cases that
// call an object from another device use other_device() and device_scope.

#include <cuda_runtime_api.h>
#include <doctest/doctest.h>

namespace pqkv::test {

/// True when at least one CUDA device is usable.
inline bool gpu_available()
{
  int count = 0;
  bool const ok = cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
  cudaGetLastError();  // clear the sticky "no device" error
  return ok;
}

/// A device other than the current one (1, or 0 when 1 is current), or -1
/// when the machine has fewer than two: cross-device checks need two GPUs.
inline int other_device()
{
  int count = 0, current = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count < 2 || cudaGetDevice(&current) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return current == 1 ? 0 : 1;
}

/// Makes `device` current for a scope and restores the previous one, so a
/// failing check inside cannot leave later cases on the wrong device.
class device_scope {
 public:
  explicit device_scope(int device)
  {
    cudaGetDevice(&previous_);
    cudaSetDevice(device);
  }
  device_scope(device_scope const&) = delete;
  device_scope& operator=(device_scope const&) = delete;
  ~device_scope() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};

}  // namespace pqkv::test

#define PQKV_REQUIRE_GPU()                                                    \
  do {                                                                        \
    if (!::pqkv::test::gpu_available()) {                                     \
      MESSAGE("skipped: no CUDA device on this machine");                     \
      return;                                                                 \
    }                                                                         \
  } while (0)

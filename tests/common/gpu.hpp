// SPDX-License-Identifier: Apache-2.0
#pragma once
// GPU test helpers: every CUDA test case starts with PQKV_REQUIRE_GPU(), which
// skips the case with a message on machines without a usable GPU.

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

}  // namespace pqkv::test

#define PQKV_REQUIRE_GPU()                                                    \
  do {                                                                        \
    if (!::pqkv::test::gpu_available()) {                                     \
      MESSAGE("skipped: no CUDA device on this machine");                     \
      return;                                                                 \
    }                                                                         \
  } while (0)

// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file `PQKV_CUDA_TRY`: check every CUDA runtime call. Needs the CUDA runtime
/// headers (not nvcc): host code compiled by g++ may use it too.

#include <pqkv/core/error.hpp>

#include <cuda_runtime_api.h>

#include <sstream>

namespace pqkv::detail {

[[noreturn]] inline void throw_cuda_error(cudaError_t status, char const* call, char const* file, int line)
{
  std::ostringstream os;
  os << "pqkv::cuda_error: " << call << " returned " << cudaGetErrorName(status) << " ("
     << cudaGetErrorString(status) << ") (" << short_path(file) << ':' << line << ')';
  throw cuda_error(os.str(), static_cast<int>(status));
}

}  // namespace pqkv::detail

/// Evaluates `call` (a `cudaError_t` expression) once and throws
/// `pqkv::cuda_error` when it is not `cudaSuccess`.
#define PQKV_CUDA_TRY(call)                                                        \
  do {                                                                             \
    cudaError_t const pqkv_status_ = (call);                                       \
    if (pqkv_status_ != cudaSuccess) [[unlikely]] {                                \
      ::pqkv::detail::throw_cuda_error(pqkv_status_, #call, __FILE__, __LINE__);   \
    }                                                                              \
  } while (0)

/// Checks the last kernel launch without synchronizing.
#define PQKV_CUDA_CHECK_LAST() PQKV_CUDA_TRY(cudaGetLastError())

// SPDX-License-Identifier: Apache-2.0
#pragma once
/// @file Small owning buffers in device and pinned host memory, for examples,
/// tests and users who want them. Kernels never require them: they take views
/// and caller-provided workspace.

#include <pqkv/core/cuda_try.hpp>
#include <pqkv/core/error.hpp>

#include <cuda_runtime_api.h>

#include <cstddef>
#include <span>
#include <utility>

namespace pqkv {

namespace detail {
struct device_memory {
  static void* allocate(std::size_t bytes)
  {
    void* p = nullptr;
    PQKV_CUDA_TRY(cudaMalloc(&p, bytes));
    return p;
  }
  static void release(void* p) noexcept { cudaFree(p); }
};
struct pinned_memory {
  static void* allocate(std::size_t bytes)
  {
    void* p = nullptr;
    // Portable: usable by every device's context; mapped: kernels may read it
    // directly (zero-copy) through the same address under unified addressing.
    PQKV_CUDA_TRY(cudaHostAlloc(&p, bytes, cudaHostAllocPortable | cudaHostAllocMapped));
    return p;
  }
  static void release(void* p) noexcept { cudaFreeHost(p); }
};

/// Move-only owner of `size` elements of T allocated by Memory.
template <class T, class Memory>
class owning_buffer {
 public:
  owning_buffer() = default;
  explicit owning_buffer(std::size_t size) : size_{size}
  {
    if (size > 0) { data_ = static_cast<T*>(Memory::allocate(size * sizeof(T))); }
  }
  owning_buffer(owning_buffer&& o) noexcept
    : data_{std::exchange(o.data_, nullptr)}, size_{std::exchange(o.size_, 0)} {}
  owning_buffer& operator=(owning_buffer&& o) noexcept
  {
    if (this != &o) {
      reset();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  owning_buffer(owning_buffer const&) = delete;
  owning_buffer& operator=(owning_buffer const&) = delete;
  ~owning_buffer() { reset(); }

  [[nodiscard]] T* data() const noexcept { return data_; }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] std::size_t size_bytes() const noexcept { return size_ * sizeof(T); }
  [[nodiscard]] std::span<T> span() const noexcept { return {data_, size_}; }

 private:
  void reset() noexcept
  {
    if (data_ != nullptr) { Memory::release(data_); }
    data_ = nullptr;
    size_ = 0;
  }
  T* data_ = nullptr;
  std::size_t size_ = 0;
};
}  // namespace detail

/// Device memory from `cudaMalloc`, uninitialized.
template <class T>
using device_buffer = detail::owning_buffer<T, detail::device_memory>;

/// Pinned, portable, mapped host memory from `cudaHostAlloc`, uninitialized.
template <class T>
using pinned_buffer = detail::owning_buffer<T, detail::pinned_memory>;

}  // namespace pqkv
